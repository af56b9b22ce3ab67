"""Pruning and search quality over seeds: python benchmarks/search.py [--seeds 5] [--trials 12] [--rows 96]

Parts 3 and 4 of the suite (docs/performance.md). For each seed, four runs of MiniLM on the first ``--rows`` rows of the
quickstart's intent data (3 epochs, 2 evaluations per epoch, the 96 eval rows), all with
``studies/quickstart.yaml``'s search space (its ``enqueue:`` left out, so the searches start cold):

* ``tpe+median``: TPE and the median pruner, as ``studies/quickstart.yaml`` sets them;
* ``tpe``: the same search without pruning;
* ``random``: random search, no pruning, the same number of trials;
* ``rule of thumb``: one run of the quickstart's ``enqueue:`` (lr 2e-5, batch 32, weight decay 0.01,
  dropout 0.1), 3 epochs.

The sampler seed and the training seed are the seed. Pruning is scored in optimizer steps: the
steps the pruned search spends until a completed trial comes within 2% of the unpruned search's best
eval loss, as a share of the steps the unpruned search spent in all (and of the steps it needed to
come within 2% of its own best). The eval set both picks and scores the configurations, for every
runner alike. Seeds run two at a time, each process on one thread (step counts and losses do not
depend on it). Prints a table per seed and the summary; ``--json PATH`` writes the numbers and every
trial's value and steps.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "studies" / "data" / "intents"
EPOCHS = 3
ARMS = {  # name: (sampler, pruner, trials: None = --trials)
    "tpe+median": ({"name": "tpe", "n_startup_trials": 4}, {"name": "median", "n_startup_trials": 3}, None),
    "tpe": ({"name": "tpe", "n_startup_trials": 4}, {"name": "none"}, None),
    "random": ({"name": "random"}, {"name": "none"}, None),
    "rule of thumb": ({"name": "random"}, {"name": "none"}, 1),
}
WITHIN = 0.02


def run_seed(seed: int, trials: int, rows: int, folder: Path) -> dict:
    """Every arm for one seed, in this process: {arm: [{"value", "steps", "state"} per trial]}."""
    from optuna.trial import TrialState
    from rich.console import Console

    from hpo import load_study
    from hpo.study.loop import run_study

    quickstart = yaml.safe_load((ROOT / "studies" / "quickstart.yaml").read_text())
    space, rule = quickstart["search_space"], quickstart["enqueue"][0]
    out = {}
    for arm, (sampler, pruner, n) in ARMS.items():
        path = folder / f"{arm.replace(' ', '_').replace('+', '_')}-{seed}.yaml"
        path.write_text(
            yaml.safe_dump(
                {
                    "study": path.stem,
                    "model": "sentence-transformers/all-MiniLM-L6-v2",
                    "data": {
                        "train": str(DATA / "train.csv"),
                        "eval": str(DATA / "eval.csv"),
                        "max_length": 64,
                        "max_train_rows": rows,
                    },
                    "train": {"num_train_epochs": EPOCHS, "seed": seed},
                    "eval_every": 0.5,
                    "search_space": space,
                    "enqueue": [rule] if n == 1 else [],
                    "sampler": {**sampler, "seed": seed},
                    "pruner": pruner,
                    "n_trials": n or trials,
                    "storage": f"sqlite:///{folder / 'search.db'}",
                },
                sort_keys=False,
            )
        )
        study = run_study(load_study(path), Console(quiet=True))
        out[arm] = [
            {
                "value": t.value,
                "steps": t.user_attrs.get("optimizer_steps", 0),
                "state": t.state.name,
                "accuracy": t.user_attrs.get("eval_accuracy"),
            }
            for t in sorted(study.trials, key=lambda t: t.number)
            if t.state != TrialState.FAIL
        ]
    return out


def steps_to_reach(trials: list[dict], target: float) -> int | None:
    """Optimizer steps spent until a completed trial's eval loss is <= target (None: never)."""
    spent = 0
    for t in trials:
        spent += t["steps"]
        if t["state"] == "COMPLETE" and t["value"] <= target:
            return spent
    return None


def best(trials: list[dict]) -> dict:
    return min((t for t in trials if t["state"] == "COMPLETE"), key=lambda t: t["value"])


def summarize(runs: dict[int, dict]) -> tuple[list[str], dict]:
    """The table's lines, and its numbers: per seed, the pruning shares and each runner's best."""
    lines = [
        "| seed | rule of thumb | random | tpe | tpe+median | pruned steps to within 2% of tpe's best "
        "/ tpe's total steps | / tpe's steps to within 2% of its own best |",
        "|---|---|---|---|---|---|---|",
    ]
    numbers = {"pruning_shares": [], "pruning_shares_own": [], "best": {arm: [] for arm in ARMS}}
    for seed, arms in runs.items():
        unpruned = arms["tpe"]
        target = best(unpruned)["value"] * (1 + WITHIN)
        reached = steps_to_reach(arms["tpe+median"], target)
        total = sum(t["steps"] for t in unpruned)
        own = steps_to_reach(unpruned, target)
        numbers["pruning_shares"].append(None if reached is None else reached / total)
        numbers["pruning_shares_own"].append(None if reached is None else reached / own)
        for arm in ARMS:
            numbers["best"][arm].append(best(arms[arm])["value"])
        cells = [f"{best(arms[a])['value']:.4f}" for a in ("rule of thumb", "random", "tpe", "tpe+median")]
        lines.append(
            f"| {seed} | {' | '.join(cells)} | "
            + (f"{reached} / {total} = {reached / total:.0%}" if reached else f"never / {total}")
            + " | "
            + (f"{reached} / {own} = {reached / own:.0%}" if reached else "never")
            + " |"
        )

    def mean(arm):
        values = numbers["best"][arm]
        return f"{statistics.mean(values):.4f} ± {statistics.stdev(values) if len(values) > 1 else 0:.4f}"

    def median_share(values):
        hit = [v for v in values if v is not None]
        return f"{statistics.median(hit):.0%} (reached in {len(hit)}/{len(values)} seeds)" if hit else "never reached"

    lines.append(
        f"| mean ± sd | {mean('rule of thumb')} | {mean('random')} | {mean('tpe')} | {mean('tpe+median')} "
        f"| median {median_share(numbers['pruning_shares'])} | median {median_share(numbers['pruning_shares_own'])} |"
    )
    return lines, numbers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--rows", type=int, default=96, help="training rows (of 384)")
    parser.add_argument("--json", type=Path, help="write the numbers and every trial's value and steps here")
    parser.add_argument("--seed", type=int, help=argparse.SUPPRESS)  # one seed, in this process
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.seed is not None:
        with tempfile.TemporaryDirectory() as tmp:
            print(json.dumps(run_seed(args.seed, args.trials, args.rows, Path(tmp))))
        return

    def one(seed: int) -> dict:
        out = subprocess.run(
            [sys.executable, __file__, "--seed", str(seed), "--trials", str(args.trials), "--rows", str(args.rows)],
            capture_output=True,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        if out.returncode:
            raise SystemExit(f"seed {seed} failed:\n{out.stderr[-3000:]}")
        return json.loads(out.stdout.strip().splitlines()[-1])

    with ThreadPoolExecutor(max(1, min(2, os.cpu_count() or 1))) as pool:
        runs = dict(zip(range(args.seeds), pool.map(one, range(args.seeds)), strict=False))
    print(
        f"best eval_loss per runner: MiniLM, {args.rows} rows x {EPOCHS} epochs, {args.trials} trials per search "
        f"(rule of thumb: 1 run), {args.seeds} seeds"
    )
    lines, numbers = summarize(runs)
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps({**numbers, "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
