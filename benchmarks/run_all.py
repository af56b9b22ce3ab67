"""Every benchmark of the suite in one run, then one table: python benchmarks/run_all.py [--out FILE]

Runs, one after another (each in its own process, so none inherits another's warm caches):
same_work.py (3 rounds), time_breakdown.py, search.py (5 seeds), trial_overhead.py,
control_plane.py (2 rounds), report_10k.py --html, and cuda_memory.py when a GPU is visible. Prints each
benchmark's own tables as it finishes, then the summary against the suite's targets (docs/performance.md).
About 27 min on this project's 2-core machine. ``--out FILE`` also writes everything printed, as Markdown.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PARTS = {  # name: the benchmark's command line (its --json comes on top)
    "same work": ["same_work.py", "--repeats", "3"],
    "where the time goes": ["time_breakdown.py"],
    "pruning and search quality": ["search.py"],
    "trial start and memory": ["trial_overhead.py"],
    "control plane": ["control_plane.py", "--rounds", "2"],
    "report of 10,000 trials": ["report_10k.py", "--html"],
    "GPU memory": ["cuda_memory.py"],
}


def gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def summary(r: dict) -> list[str]:
    """The table: one row per measure, against the suite's target where it sets one."""
    rows = []

    def row(part, measure, figure, target="", met=None):
        verdict = "" if met is None else ("met" if met else "missed")
        rows.append(f"| {part} | {measure} | {figure} | {target} | {verdict} |")

    if s := r.get("same work"):
        sec = s["seconds"]
        for name in ("hpo", "hpo --workers 2", "loop"):
            ratio = sec[name] / sec["hf"]
            row(
                "1 same work",
                f"`{name}` / `Trainer.hyperparameter_search` wall time",
                f"{ratio:.2f} ({sec[name]:.1f} s / {sec['hf']:.1f} s)",
                "≤ 0.70" if name == "hpo" else "",
                ratio <= 0.70 if name == "hpo" else None,
            )
    if t := r.get("where the time goes"):
        share = t["compute"] / t["wall"]
        row(
            "2 where the time goes",
            "model compute / study wall time",
            f"{share:.1%} of {t['wall']:.1f} s",
            "≥ 90%",
            share >= 0.90,
        )
    if p := r.get("pruning and search quality"):
        shares = [v for v in p["pruning_shares"] if v is not None]
        median = statistics.median(shares) if shares else None
        row(
            "3 pruning",
            "steps to within 2% of the unpruned best / the unpruned search's steps (median of seeds)",
            f"{median:.0%} (reached in {len(shares)}/{len(p['pruning_shares'])} seeds)" if shares else "never reached",
            "≤ 40%",
            median is not None and median <= 0.40,
        )
        best = p["best"]
        row(
            "4 search quality",
            "best eval_loss, mean ± sd over seeds: TPE / random / rule of thumb",
            " / ".join(
                f"{statistics.mean(best[a]):.3f} ± {statistics.stdev(best[a]) if len(best[a]) > 1 else 0:.3f}"
                for a in ("tpe", "random", "rule of thumb")
            ),
        )
    if o := r.get("trial start and memory"):
        later = statistics.median(o["first_step"][1:])
        row(
            "5 trial start",
            "seconds to first optimizer step: trial 0 / later trials (median)",
            f"{o['first_step'][0]:.2f} / {later:.2f}",
            "later ≤ 0.5 s",
            later <= 0.5,
        )
        growth = (o["rss_mb"][-1] - o["rss_mb"][0]) / o["rss_mb"][0]
        row(
            "6 memory",
            f"process RSS, after trial 0 → after trial {len(o['rss_mb']) - 1}",
            f"{o['rss_mb'][0]:.0f} → {o['rss_mb'][-1]:.0f} MB ({growth:+.1%})",
            "≤ +10%",
            growth <= 0.10,
        )
    if g := r.get("GPU memory"):
        back = all(b <= run["baseline_bytes"] for run in g["runs"].values() for b in run["after_each_trial_bytes"])
        row(
            "6 memory (CUDA)",
            f"allocated after each trial vs before the first, {g['device']}",
            "back to baseline after every trial" if back else "above baseline",
            "back to baseline",
            back,
        )
    else:
        row("6 memory (CUDA)", "allocated memory after each trial", "no GPU here: `python benchmarks/cuda_memory.py`")
    if c := r.get("control plane"):
        row(
            "7 control plane",
            "ms per no-op trial at 1,000 TPE trials on SQLite: hpo / plain Optuna",
            f"{c['hpo']:.1f} / {c['plain Optuna']:.1f} ({c['hpo'] / c['plain Optuna']:.2f}×)",
        )
    if h := r.get("report of 10,000 trials"):
        row("report", "`hpo report` of 10,000 trials, HTML included", f"{h['whole']:.1f} s", "≤ 5 s", h["whole"] <= 5)
    return ["| part | measure | figure | target | |", "|---|---|---|---|---|", *rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="also write everything printed here (Markdown)")
    parser.add_argument("--only", nargs="+", choices=PARTS, metavar="PART", help="run these parts only")
    args = parser.parse_args()
    printed: list[str] = []

    def say(text: str) -> None:
        print(text, flush=True)
        printed.append(text)

    results: dict[str, dict] = {}
    began = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for name, command in PARTS.items():
            if (args.only and name not in args.only) or (name == "GPU memory" and not gpu()):
                continue
            out = Path(tmp) / f"{command[0]}.json"
            start = time.perf_counter()
            proc = subprocess.run(
                [sys.executable, str(HERE / command[0]), *command[1:], "--json", str(out)],
                capture_output=True,
                text=True,
                cwd=HERE.parent,
            )
            if proc.returncode:
                say(f"## {name}: FAILED (exit {proc.returncode})\n\n```\n{proc.stderr[-3000:]}\n```\n")
                continue
            say(f"## {name} (`python benchmarks/{' '.join(command)}`, {time.perf_counter() - start:.0f} s)\n")
            say(proc.stdout.strip() + "\n")
            results[name] = json.loads(out.read_text())
    say(
        f"## Summary ({(time.perf_counter() - began) / 60:.1f} min on {os.cpu_count()} CPU cores"
        f"{', with a GPU' if gpu() else ''})\n"
    )
    say("\n".join(summary(results)))
    if args.out:
        args.out.write_text("\n".join(printed) + "\n")


if __name__ == "__main__":
    main()
