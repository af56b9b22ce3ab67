"""What ``hpo check`` prints: per corner of the search space, the measured peak memory beside its breakdown, the
time of a step, of a trial and of the study, and what ``--workers auto`` and ``resources.pack: auto`` would use."""

from __future__ import annotations

from hpo.trial.checkpoints import KEEP
from hpo.trial.preflight import CUDA_CONTEXT_MB, CheckReport, human_mb


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def print_report(console, report: CheckReport) -> None:
    """The table ``hpo check`` prints: per corner, the measured peak beside its breakdown (activations estimated,
    the rest counted), seconds per optimizer step and one full trial's time."""
    from rich.table import Table

    table = Table(title=f"{report.study} on {report.device}: {human_mb(report.budget_mb)} {report.budget_from}")
    table.add_column("corner")
    for column in ("peak", "weights", "grads", "optim.", "activ.~", "s/step", "trial"):
        table.add_column(column, justify="right")
    table.add_column("fits")
    for c in report.corners:
        b = c.breakdown_mb
        table.add_row(
            c.name,
            ">" * bool(c.ran_out) + human_mb(c.peak_mb),
            *(human_mb(b[k]) if k in b else "—" for k in ("weights", "gradients", "optimizer", "activations")),
            f"{c.seconds_per_step:.3f}" if c.seconds_per_step else "—",
            _duration(c.trial_seconds) if c.trial_seconds else "—",
            "[green]yes[/]" if c.fits else "[red]no[/]",
        )
    console.print(table)
    for c in report.corners:
        if c.ran_out:
            console.print(f"{c.name}: ran out of memory on this device: {c.ran_out}", markup=False)
        shown = " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in c.params.items())
        console.print(f"{c.name}: {shown}; micro-batch {c.micro_batch} × {c.rows_tokens} tokens", markup=False)
        if c.processes > 1:
            console.print(
                f"{c.name}: the trial's {c.processes} ranks measured in one process as {c.global_batch // c.micro_batch}"
                f" accumulation steps of {c.micro_batch}: the same global batch of {c.global_batch}, "
                f"{c.trial_steps} optimizer steps per trial; s/step and trial time are one device's for all ranks",
                markup=False,
            )
    low, high = report.study_seconds
    keep = 1 - report.pruned_share
    console.print(
        f"study: {report.n_trials} trials, {_duration(low)}–{_duration(high)} without pruning; "
        f"~{_duration(low * keep)}–{_duration(high * keep)} with it ({report.assumption})",
        markup=False,
    )
    if report.checkpoint_every and "checkpoint" in report.corners[0].breakdown_mb:
        size = report.corners[0].breakdown_mb["checkpoint"]
        console.print(
            f"checkpoints (checkpoint_every): ~{human_mb(size)} each, {KEEP} kept per running trial, removed when it ends",
            markup=False,
        )
    if (per_gpu := report.workers_per_gpu) is not None:
        each = f"the hungriest corner's peak and a {human_mb(CUDA_CONTEXT_MB)} CUDA context each"
        console.print(f"hpo run --workers auto: {per_gpu} worker(s) per GPU ({each})", markup=False)
    if report.pack is not None:
        console.print(f"resources.pack: auto trains {report.pack} trial(s) at once: {report.pack_why}", markup=False)
    if report.fits:
        console.print("[green]every corner fits[/]")
        return
    console.print(f"[red]the hungriest corner does not fit in {human_mb(report.budget_mb)}[/]; change one of:")
    for tip in report.advice:
        console.print(f"  - {tip}", markup=False)
