"""Pruners and eval subsamples replayed on recorded curves: python benchmarks/pruning.py POOL.json [POOL.json ...]

A pool (benchmarks/curves.py) holds full runs of random configurations, with the loss of every eval row at every
evaluation point. Each replayed study takes ``--trials`` of them in a seeded random order and feeds their curves,
point by point, to a real Optuna pruner (built by hpo, as a study file names it) in an in-memory study: the
pruner decides exactly as it would live, and a pruned trial costs the seconds it had run. Per setting, over
``--seeds`` orders:

* best: the best final eval loss among the trials that finished (the study's answer);
* cost: seconds (recorded training and evaluation time) and optimizer steps, as a share of running every trial;
* to 2%: seconds until a finished trial is within 2% of the best any trial of that order would have reached;
* mistakes: pruned trials that would have ended within 2% of that best (they would have won);
* pruned: how many, and how many of them had made fewer than 10 optimizer steps.

``--subsample`` replays the intermediate evaluations on a fixed stratified share of the eval rows (the last
one always on all of them, as hpo does) and charges evaluation time in proportion.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

import numpy as np
import optuna

ROOT = Path(__file__).resolve().parents[1]
WITHIN = 0.02
SETTINGS = {  # name: (pruner as a study file writes it, min optimizer steps before a trial may be pruned)
    "none": ({"name": "none"}, 0),
    "median, 5 startup (Optuna's default; hpo's until now)": ({"name": "median", "n_startup_trials": 5}, 0),
    "median, 3 startup": ({"name": "median", "n_startup_trials": 3}, 0),
    "median, 3 startup, warm-up 1/4 run": ({"name": "median", "n_startup_trials": 3, "n_warmup_steps": "quarter"}, 0),
    "median, 3 startup, min 3 opt. steps (hpo's default)": ({"name": "median", "n_startup_trials": 3}, 3),
    "median, 3 startup, min 10 opt. steps": ({"name": "median", "n_startup_trials": 3}, 10),
    "percentile 25, 3 startup": ({"name": "percentile", "percentile": 25.0, "n_startup_trials": 3}, 0),
    "percentile 25, 3 startup, min 5 opt. steps": (
        {"name": "percentile", "percentile": 25.0, "n_startup_trials": 3},
        5,
    ),
    "percentile 25, 3 startup, warm-up 1/4 run": (
        {"name": "percentile", "percentile": 25.0, "n_startup_trials": 3, "n_warmup_steps": "quarter"},
        0,
    ),
    "percentile 25, 3 startup, min 10 opt. steps": (
        {"name": "percentile", "percentile": 25.0, "n_startup_trials": 3},
        10,
    ),
    "successive halving": ({"name": "successive_halving"}, 0),
    "successive halving, min 10 opt. steps": ({"name": "successive_halving"}, 10),
    "hyperband": ({"name": "hyperband"}, 0),
    "hyperband, min 5 opt. steps": ({"name": "hyperband"}, 5),
    "patient(median, 3 startup), patience 2": (
        {"name": "patient", "patience": 2, "wrapped": {"name": "median", "n_startup_trials": 3}},
        0,
    ),
}


def make_pruner(spec: dict, first: int, last: int) -> optuna.pruners.BasePruner:
    from hpo.samplers import make_pruner as hpo_pruner

    args = {k: v for k, v in spec.items() if k != "name"}
    if args.get("n_warmup_steps") == "quarter":
        args["n_warmup_steps"] = last // 4
    return hpo_pruner(spec["name"], args, first, last)


def stratified(labels: list[int], share: float, rng: np.random.Generator) -> np.ndarray:
    """A share of the rows of every label (at least one each): the subsample hpo would evaluate on."""
    labels = np.asarray(labels)
    picked = []
    for y in np.unique(labels):
        rows = np.flatnonzero(labels == y)
        picked += list(rng.choice(rows, max(1, round(share * len(rows))), replace=False))
    return np.sort(np.asarray(picked))


def replay(pool: dict, order: list[int], spec: dict, min_steps: int, share: float, rng: np.random.Generator) -> dict:
    runs = [pool["runs"][i] for i in order]
    points = runs[0]["points"]
    first, last = points[0]["step"], points[-1]["step"]
    n_eval = len(pool["labels"])
    rows = stratified(pool["labels"], share, rng) if share < 1 else None
    finals = [r["points"][-1]["eval_loss"] for r in runs]
    oracle = min(finals)
    study = optuna.create_study(study_name="replay", pruner=make_pruner(spec, first, last))  # Hyperband hashes it
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    seconds = steps = full_seconds = full_steps = 0.0
    best, reached, pruned, early, mistakes = math.inf, math.nan, 0, 0, 0
    for run, final in zip(runs, finals, strict=True):
        trial = study.ask()
        start = run["seconds"] - sum(p["train_seconds"] + p["eval_seconds"] for p in run["points"])
        seconds += max(start, 0.0)
        full_seconds += max(start, 0.0) + sum(p["train_seconds"] + p["eval_seconds"] for p in run["points"])
        full_steps += run["points"][-1]["optimizer_steps"]
        stopped = False
        for i, p in enumerate(run["points"]):
            is_last = i == len(run["points"]) - 1
            value = p["eval_loss"] if rows is None or is_last else float(np.mean(np.asarray(p["rows"])[rows]))
            eval_share = 1.0 if rows is None or is_last else len(rows) / n_eval
            seconds += p["train_seconds"] + p["eval_seconds"] * eval_share
            steps = steps + p["optimizer_steps"] - (run["points"][i - 1]["optimizer_steps"] if i else 0)
            trial.report(value, p["step"])
            if not is_last and p["optimizer_steps"] >= min_steps and trial.should_prune():
                stopped = True
                pruned += 1
                early += p["optimizer_steps"] < 10
                mistakes += final <= oracle * (1 + WITHIN)
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                break
        if not stopped:
            study.tell(trial, final)
            best = min(best, final)
            if math.isnan(reached) and final <= oracle * (1 + WITHIN):
                reached = seconds
    return {
        "best": best,
        "oracle": oracle,
        "seconds": seconds,
        "cost": seconds / full_seconds,
        "steps": steps / full_steps,
        "to_quality": reached,
        "mistakes": mistakes,
        "pruned": pruned,
        "early": early,
    }


def table(pools: list[dict], settings: dict, shares: list[float], seeds: int, trials: int) -> list[str]:
    out = [
        "| data | setting | eval rows at pruning points | best eval loss (mean) | best/oracle | cost (time) | cost (steps) "
        "| s to within 2% (median) | pruned | pruned before 10 opt. steps | mistakes |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for pool in pools:
        label = f"{Path(pool['data']).name}, {pool['n_train']} rows"
        n = min(trials, len(pool["runs"]))
        for name, (spec, min_steps) in settings.items():
            for share in shares:
                rs = []
                for seed in range(seeds):
                    rng = np.random.default_rng(seed)
                    order = list(rng.permutation(len(pool["runs"]))[:n])
                    rs.append(replay(pool, order, spec, min_steps, share, rng))
                reached = [r["to_quality"] for r in rs if not math.isnan(r["to_quality"])]
                out.append(
                    f"| {label} | {name} | {'all' if share >= 1 else f'{share:.0%}'} "
                    f"| {statistics.mean(r['best'] for r in rs):.4f} "
                    f"| {statistics.mean(r['best'] / r['oracle'] for r in rs):.3f} "
                    f"| {statistics.mean(r['cost'] for r in rs):.0%} | {statistics.mean(r['steps'] for r in rs):.0%} "
                    f"| {statistics.median(reached):.0f} ({len(reached)}/{seeds}) "
                    f"| {statistics.mean(r['pruned'] for r in rs):.1f} | {statistics.mean(r['early'] for r in rs):.1f} "
                    f"| {sum(r['mistakes'] for r in rs) / seeds:.2f} |"
                )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pools", type=Path, nargs="+")
    parser.add_argument("--seeds", type=int, default=50)
    parser.add_argument("--trials", type=int, default=12, help="trials per replayed study")
    parser.add_argument("--subsample", default="1", help="comma-separated shares of the eval rows, e.g. 1,0.5,0.25")
    parser.add_argument("--settings", help="setting names separated by ; (default: all)")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    pools = [json.loads(p.read_text()) for p in args.pools]
    chosen = SETTINGS if not args.settings else {k: SETTINGS[k] for k in args.settings.split(";")}
    shares = [float(x) for x in args.subsample.split(",")]
    print(f"{args.trials} trials per study, {args.seeds} random orders per setting")
    print("\n".join(table(pools, chosen, shares, args.seeds, args.trials)))


if __name__ == "__main__":
    main()
