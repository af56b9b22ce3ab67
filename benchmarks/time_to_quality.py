"""Time to a good model: python benchmarks/time_to_quality.py [STUDY.yaml ...] [--seeds 3] [--runners ...] [--same-wall]

What a user waits for: the time until the study holds a configuration as good as the best one they will
find. For each study file (default: the quickstart) and each seed, these runners take turns, each in a fresh
process timed from before its first import:

* hpo: ``hpo run`` of the study file as it is (its sampler and pruner), the sampler seeded;
* hpo --workers auto: the same with ``--workers auto``;
* hf: ``Trainer.hyperparameter_search(backend="optuna")`` the way the transformers docs show it (``model_init``,
  dynamic padding, TPE and Optuna's default median pruner, evaluating as often as the study file says) over the
  same search space, data, epochs and seed. Its ``model_init`` builds each trial's model as hpo does (the new
  head, ``dropout`` in the model config, LoRA adapters) and it reads hpo's tokenized rows and metrics, so the
  runners differ in the search and the training loop only; the study's objective is its ``compute_objective``;
* random: hpo with a random sampler and no pruner.

Each runner is seen two ways: the study as the file says (its first ``n_trials`` finished trials: their best
value and the seconds they took), and at the Trainer search's wall time (the best value among the trials that
had ended when the Trainer search of the same seed ended). ``--same-wall`` runs hf first in each seed and gives
the other runners its wall time as their ``timeout``, with no trial count, so they use all of it; their first
``n_trials`` trials are the same as without it (the sampler is seeded). A value is the study's objective (eval
loss on the classifiers), negated where the study maximizes, so lower is better everywhere.

Target: 2% of the way from where the studies start (the median value of every run's first trial) to the best
value any runner reached on that study, over all seeds (2% of the best loss itself is below run-to-run noise
where losses approach zero: on the quickstart's data the best is 0.008). Per runner: how many seeds reached it
by the Trainer search's wall time, and the seconds until they did (median). ``--from JSON`` prints the tables
of a saved run again.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WITHIN = 0.02
RUNNERS = ("hpo", "hpo --workers auto", "hf", "random")


def run_hpo(study: Path, seed: int, db: Path, out: Path, runner: str, timeout: float | None = None) -> None:
    from hpo import api

    overrides = {"storage": f"sqlite:///{db}", "sampler.seed": seed, "output_dir": str(out)}
    if timeout:  # the same study with a wall-clock budget instead of a trial count
        overrides.update({"timeout": timeout, "n_trials": 10_000})
    if runner == "random":
        overrides.update({"sampler": {"name": "random", "seed": seed}, "pruner": {"name": "none"}})
    api.run(study, overrides=overrides, workers="auto" if runner.endswith("auto") else 1, console=_quiet())


def _quiet():
    from rich.console import Console

    return Console(quiet=True)


def run_hf(study: Path, seed: int, db: Path, out: Path) -> None:
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
    from transformers import Trainer, TrainingArguments

    from hpo import load_study
    from hpo.tasks import TASKS
    from hpo.trial import metrics
    from hpo.trial.model import build_model, collator
    from hpo.trial.plan import make_plan
    from hpo.trial.workbench import prepare

    # The same tokenized rows, collator, model construction (new heads, dropout, LoRA adapters) and metrics as
    # hpo's trials: the runners differ in the search and the training loop only.
    cfg = load_study(study)
    bench = prepare(cfg)
    metric = cfg.objective.metric

    def model_init(trial):
        return build_model(bench, make_plan(cfg, {} if trial is None else trial.params))[0]

    def hp_space(trial):
        out = {}
        for name, d in cfg.distributions.items():
            if isinstance(d, CategoricalDistribution):
                out[name] = trial.suggest_categorical(name, d.choices)
            elif isinstance(d, IntDistribution):
                out[name] = trial.suggest_int(name, d.low, d.high, log=d.log, step=d.step)
            elif isinstance(d, FloatDistribution):
                out[name] = trial.suggest_float(name, d.low, d.high, log=d.log, step=d.step)
        return out

    def objective(m: dict) -> float:
        return math.exp(m["eval_loss"]) if metric == "eval_perplexity" else m[metric]

    epochs = float(cfg.train.get("num_train_epochs", 3))
    n_train = len(bench.train_rows)
    args = TrainingArguments(
        output_dir=str(out),
        num_train_epochs=epochs,
        seed=int(cfg.train.get("seed", 42)),
        eval_strategy="steps",
        eval_steps=cfg.eval_every.examples_between(n_train) / (epochs * n_train),  # a fraction of the run
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        logging_strategy="no",
    )
    trainer = Trainer(
        model_init=model_init,
        args=args,
        train_dataset=bench.train_rows,
        eval_dataset=bench.eval_rows,
        data_collator=collator(TASKS[cfg.task], bench.tokenizer),
        processing_class=bench.tokenizer,
        compute_metrics=metrics.COMPUTE[cfg.task](bench.labels) if cfg.task in metrics.COMPUTE else None,
    )
    trainer.hyperparameter_search(
        direction=cfg.objective.direction,
        backend="optuna",
        hp_space=hp_space,
        compute_objective=objective,
        n_trials=cfg.n_trials,
        sampler=optuna.samplers.TPESampler(seed=seed),
        storage=f"sqlite:///{db}",
        study_name="hf",
    )


def trials_of(db: Path, launched: float) -> list[dict]:
    """Each finished trial: seconds from launch to its end, its final value (negated where the study maximizes,
    so lower is better everywhere; None if pruned), its parameters and how many evaluations it reported."""
    import optuna

    out = []
    storage = f"sqlite:///{db}"
    for summary in optuna.get_all_study_summaries(storage):
        study = optuna.load_study(study_name=summary.study_name, storage=storage)
        sign = 1 if study.direction == optuna.study.StudyDirection.MINIMIZE else -1
        for t in study.trials:
            if t.datetime_complete is None or t.state.name not in ("COMPLETE", "PRUNED"):
                continue
            end = t.datetime_complete.timestamp() - launched
            value = sign * t.value if t.state.name == "COMPLETE" else None
            out.append({"end": end, "value": value, "params": t.params, "evaluations": len(t.intermediate_values)})
    return sorted(out, key=lambda t: t["end"])


def first_within(trials: list[dict], target: float) -> float:
    for t in trials:
        if t["value"] is not None and t["value"] <= target:
            return t["end"]
    return math.nan


def best_of(trials: list[dict]) -> float:
    return min((t["value"] for t in trials if t["value"] is not None), default=math.nan)


def print_table(name: str, runs: dict[str, list[dict]]) -> None:
    """Two views of each runner: its first ``n_trials`` finished trials (the study as the file says), and the
    trials that had ended when the Trainer search of the same seed ended (the same wall time)."""
    finals = [t["value"] for rs in runs.values() for r in rs for t in r["trials"] if t["value"] is not None]
    firsts = [
        r["trials"][0]["value"]
        for rs in runs.values()
        for r in rs
        if r["trials"] and r["trials"][0]["value"] is not None
    ]
    best, start = min(finals), statistics.median(firsts)
    target = best + WITHIN * (start - best)
    seeds = max(len(rs) for rs in runs.values())
    hf_wall = {r["seed"]: r["wall"] for r in runs.get("hf", [])}
    print(f"\n{name}: target value {target:.4f} (best {best:.4f}, first trials' median {start:.4f}), {seeds} seeds")
    print(
        "| runner | best value, the study's trials (mean; each seed) | s for them (median) "
        "| best value by the Trainer search's wall time (mean; each seed) | trials by then (median) "
        "| reached target by then | s to target (median) |\n|---|---|---|---|---|---|---|"
    )

    def each(values: list[float]) -> str:
        return f"{statistics.mean(values):.4f} ({' '.join(f'{v:.3f}' for v in values)})"

    for runner, rs in runs.items():
        study = [r["trials"][: r.get("n_trials", len(r["trials"]))] for r in rs]
        by_wall = [[t for t in r["trials"] if t["end"] <= hf_wall.get(r["seed"], math.inf)] for r in rs]
        hits = [s for s in (first_within(ts, target) for ts in by_wall) if not math.isnan(s)]
        print(
            f"| {runner} | {each([best_of(ts) for ts in study])} | {statistics.median(ts[-1]['end'] for ts in study if ts):.0f} "
            f"| {each([best_of(ts) for ts in by_wall])} | {statistics.median(len(ts) for ts in by_wall):.0f} "
            f"| {len(hits)}/{len(rs)} | {statistics.median(hits) if hits else math.nan:.0f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("studies", type=Path, nargs="*", default=[ROOT / "studies" / "quickstart.yaml"])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--runners", default=",".join(RUNNERS), help="comma-separated, of: " + ", ".join(RUNNERS))
    parser.add_argument("--json", type=Path, help="write every trial here")
    parser.add_argument("--from", dest="load", type=Path, help="print the tables of a run saved with --json")
    parser.add_argument("--runner", help=argparse.SUPPRESS)  # one runner, in this process
    parser.add_argument("--seed", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--db", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--timeout", type=float, help=argparse.SUPPRESS)
    parser.add_argument(
        "--reuse",
        type=Path,
        help="take the runs (runner and seed) that a run saved with --json holds instead of running them again",
    )
    parser.add_argument(
        "--same-wall",
        action="store_true",
        help="run hf first in each seed; the other runners then get its wall time as their timeout instead of "
        "the study's trial count",
    )
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.runner:
        with tempfile.TemporaryDirectory() as tmp:
            if args.runner == "hf":
                run_hf(args.studies[0], args.seed, args.db, Path(tmp))
            else:
                run_hpo(args.studies[0], args.seed, args.db, Path(tmp), args.runner, args.timeout)
        return
    from hpo import load_study

    began = time.perf_counter()
    results: dict = json.loads(args.load.read_text()) if args.load else {}
    reused: dict = json.loads(args.reuse.read_text()) if args.reuse else {}
    for study in [] if args.load else args.studies:
        names = args.runners.split(",")
        if args.same_wall:
            names = ["hf", *(r for r in names if r != "hf")]
        runs: dict[str, list[dict]] = {r: [] for r in names}
        # Each runner is deterministic per seed (up to the machine's speed): its saved runs can be reused. A file
        # of one study serves one study asked for under another path (data/larger vs /tmp/larger), never several.
        found = reused.get(str(study)) or (
            next(iter(reused.values())) if len(reused) == 1 and len(args.studies) == 1 else {}
        )
        saved = {(runner, r["seed"]): r for runner, rs in found.items() for r in rs}
        n_trials = load_study(study).n_trials  # with --same-wall, hpo's first n_trials are the study as written
        for seed in range(args.seeds):
            for runner in runs:  # they take turns: a slow spell of the machine hits every runner alike
                if (runner, seed) in saved:
                    runs[runner].append(saved[runner, seed])
                    continue
                with tempfile.TemporaryDirectory() as tmp:
                    db = Path(tmp) / "trials.db"
                    launched = time.time()
                    cmd = [
                        sys.executable,
                        __file__,
                        str(study),
                        "--runner",
                        runner,
                        "--seed",
                        str(seed),
                        "--db",
                        str(db),
                    ]
                    if args.same_wall and runner != "hf":
                        cmd += ["--timeout", str(runs["hf"][seed]["wall"])]
                    subprocess.run(cmd, check=True, capture_output=True)
                    runs[runner].append(
                        {
                            "seed": seed,
                            "wall": time.time() - launched,
                            "n_trials": n_trials,
                            "trials": trials_of(db, launched),
                        }
                    )
        results[str(study)] = runs
    if args.json:
        args.json.write_text(json.dumps(results))
    for study, runs in results.items():
        print_table(Path(study).name, runs)
    print(f"\n{time.perf_counter() - began:.0f} s in all")


if __name__ == "__main__":
    main()
