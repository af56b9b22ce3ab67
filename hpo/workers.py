"""Many trials at once on one machine: N ``hpo run`` worker processes that share the study's storage.

This is Optuna's own distributed design, local: every worker is an ordinary ``hpo run`` of the same
study that pulls its next trial from the storage. hpo only starts the processes, pins one GPU to
each, forwards Ctrl-C/SIGTERM and waits. Separate processes, not threads or a pool, so that a worker
that crashes or is killed by the OOM killer takes down only itself; its trial goes stale and another
worker retries it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Sequence

from rich.console import Console

from hpo.config import StudyConfig
from hpo.study import count_finished, mask_url, print_summary, sigterm_interrupts, start_study

STOP_WAIT_S = 60  # after Ctrl-C, how long workers get to end their trials before SIGKILL


def gpu_ids(gpus: str | None = None) -> list[str]:
    """The GPUs to spread workers over: ``"0,2"`` → ``["0", "2"]``; ``None`` → every visible CUDA device.

    >>> gpu_ids("0, 1")
    ['0', '1']
    """
    if gpus is not None:
        return [g.strip() for g in gpus.split(",") if g.strip()]
    if (visible := os.environ.get("CUDA_VISIBLE_DEVICES")) is not None:
        return [g.strip() for g in visible.split(",") if g.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def worker_env(k: int, n: int, gpus: Sequence[str]) -> dict[str, str]:
    """Worker ``k``'s environment: one GPU (round robin), or on CPU an equal share of the cores."""
    env = dict(os.environ)
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = gpus[k % len(gpus)]
    elif "OMP_NUM_THREADS" not in env:  # N workers × all cores each would oversubscribe the CPU
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // n))
    return env


def run_workers(cfg: StudyConfig, run_args: Sequence[str], n: int, gpus: Sequence[str],
                console: Console | None = None) -> int:
    """Run the study with ``n`` worker processes, each ``hpo run <run_args>``; return the exit code.

    The study is created (or loaded) here first, so a bad model, data or storage fails once, before
    any worker starts. Exit code: 0 when every worker ended normally or the study reached its target
    anyway; 1 when a worker crashed and the target was not reached.

    Raises:
        ConfigError: the model, the data or the storage cannot be loaded.
        KeyboardInterrupt: Ctrl-C or SIGTERM; the workers were stopped first (their trials end FAIL,
            ``fail_reason: interrupted``, and are queued for the next run).
    """
    console = console or Console()
    study = start_study(cfg)[0]  # the tokenized data is the workers' to hold, not this process's
    where = f"GPU {', '.join(gpus)}" if gpus else f"CPU, {worker_env(0, n, gpus).get('OMP_NUM_THREADS', '?')} thread(s) each"
    console.print(f"[bold]{cfg.study}[/]: {count_finished(study)} finished trial(s) in {mask_url(cfg.storage_url)}; "
                  f"target {cfg.n_trials}; {n} workers on {where}")
    # Each worker in its own session: Ctrl-C reaches only this process, which stops the workers once.
    procs = [subprocess.Popen([sys.executable, "-m", "hpo.cli", "run", *run_args, "--worker-id", str(k)],
                              env=worker_env(k, n, gpus), start_new_session=True) for k in range(n)]
    try:
        with sigterm_interrupts():
            codes = [p.wait() for p in procs]
    except KeyboardInterrupt:
        _stop(procs)
        raise
    crashed = {k: code for k, code in enumerate(codes) if code != 0}
    for k, code in crashed.items():
        how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
        console.print(f"[red]worker w{k} {how}[/]; the other workers went on")
    print_summary(console, cfg, study)
    return 1 if crashed and count_finished(study) < cfg.n_trials else 0


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)  # each worker ends its trial as interrupted, like Ctrl-C
    for p in procs:
        try:
            p.wait(timeout=STOP_WAIT_S)
        except subprocess.TimeoutExpired:
            p.kill()
