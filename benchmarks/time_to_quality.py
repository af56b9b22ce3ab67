"""Time to a good model: python benchmarks/time_to_quality.py [STUDY.yaml ...] [--seeds 3] [--runners ...]

What a user waits for: the time until the study holds a configuration as good as the best one they will
find. For each study file (default: the quickstart) and each seed, these runners take turns, each in a fresh
process timed from before its first import:

* hpo: ``hpo run`` of the study file as it is (its sampler and pruner), the sampler seeded;
* hpo --workers auto: the same with ``--workers auto``;
* hf: ``Trainer.hyperparameter_search(backend="optuna")`` the way the transformers docs show it (``model_init``,
  dynamic padding, TPE and Optuna's default median pruner, evaluating as often as the study file says) over the
  same search space, data, epochs and seed (``dropout`` goes to the model config in ``model_init``);
* random: hpo with a random sampler and no pruner.

Target: within 2% of the way from where the studies start (the median value of every run's first trial)
to the best final eval loss any runner reached on that study, over all seeds. (2% of the best loss itself is
below run-to-run noise where losses approach zero: on the quickstart's data the best is 0.008.) Per runner:
the median (and each seed's) seconds and optimizer steps until a finished trial reaches the target, how many
seeds reached it, the best eval loss after all trials (mean), and the whole run's seconds. ``--from JSON``
prints the tables of a saved run again.
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


def run_hpo(study: Path, seed: int, db: Path, out: Path, runner: str) -> None:
    from hpo import api

    overrides = {"storage": f"sqlite:///{db}", "sampler.seed": seed, "output_dir": str(out)}
    if runner == "random":
        overrides.update({"sampler": {"name": "random", "seed": seed}, "pruner": {"name": "none"}})
    api.run(study, overrides=overrides, workers="auto" if runner.endswith("auto") else 1, console=_quiet())


def _quiet():
    from rich.console import Console

    return Console(quiet=True)


def run_hf(study: Path, seed: int, db: Path, out: Path) -> None:
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
    )

    from hpo import load_study
    from hpo.data import load_examples
    from hpo.workbench import resolve_model

    cfg = load_study(study)
    assert cfg.task == "sequence-classification", "the hf runner fine-tunes classifiers"
    model = resolve_model(cfg.model.name, cfg.root)
    tokenizer = AutoTokenizer.from_pretrained(model)
    data = load_examples(cfg)  # (text, label id) rows, read as hpo reads them
    label = data.labels

    def encode(rows):
        enc = tokenizer([text for text, _ in rows], truncation=True, max_length=cfg.data.max_length)
        return [{**{k: v[i] for k, v in enc.items()}, "labels": y} for i, (_, y) in enumerate(rows)]

    train, dev = encode(data.train), encode(data.eval)
    epochs = float(cfg.train.get("num_train_epochs", 3))

    def model_init(trial):
        dropout = {} if trial is None or "dropout" not in trial.params else trial.params["dropout"]
        extra = {} if dropout == {} else {"hidden_dropout_prob": dropout, "attention_probs_dropout_prob": dropout}
        return AutoModelForSequenceClassification.from_pretrained(model, num_labels=len(label), **extra)

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

    args = TrainingArguments(
        output_dir=str(out),
        num_train_epochs=epochs,
        seed=int(cfg.train.get("seed", 42)),
        eval_strategy="steps",
        eval_steps=cfg.eval_every.examples_between(len(train)) / (epochs * len(train)),  # a fraction of the run
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        logging_strategy="no",
    )
    trainer = Trainer(
        model_init=model_init,
        args=args,
        train_dataset=train,
        eval_dataset=dev,
        data_collator=DataCollatorWithPadding(tokenizer),
        processing_class=tokenizer,
    )
    trainer.hyperparameter_search(
        direction="minimize",
        backend="optuna",
        hp_space=hp_space,
        n_trials=cfg.n_trials,
        sampler=optuna.samplers.TPESampler(seed=seed),
        storage=f"sqlite:///{db}",
        study_name="hf",
    )


def trials_of(db: Path, launched: float) -> list[dict]:
    """Each finished trial: seconds from launch to its end, its final value, its optimizer steps."""
    import optuna

    out = []
    storage = f"sqlite:///{db}"
    for summary in optuna.get_all_study_summaries(storage):
        for t in optuna.load_study(study_name=summary.study_name, storage=storage).trials:
            if t.datetime_complete is None or t.state.name not in ("COMPLETE", "PRUNED"):
                continue
            steps = t.user_attrs.get("optimizer_steps") or max(t.intermediate_values, default=0)
            out.append(
                {
                    "end": t.datetime_complete.timestamp() - launched,
                    "value": t.value if t.state.name == "COMPLETE" else None,
                    "steps": steps,
                }
            )
    return sorted(out, key=lambda t: t["end"])


def first_within(trials: list[dict], target: float) -> tuple[float, float]:
    steps = 0
    for t in trials:
        steps += t["steps"]
        if t["value"] is not None and t["value"] <= target:
            return t["end"], steps
    return math.nan, math.nan


def print_table(name: str, runs: dict[str, list[dict]]) -> None:
    finals = [t["value"] for rs in runs.values() for r in rs for t in r["trials"] if t["value"] is not None]
    firsts = [r["trials"][0]["value"] for rs in runs.values() for r in rs if r["trials"] and r["trials"][0]["value"]]
    best, start = min(finals), statistics.median(firsts)
    target = best + WITHIN * (start - best)
    seeds = max(len(rs) for rs in runs.values())
    print(f"\n{name}: target eval loss {target:.4f} (best {best:.4f}, first trials' median {start:.4f}), {seeds} seeds")
    print(
        "| runner | s to target (median; each seed) | opt. steps to target (median) | reached | best eval loss (mean; "
        "each seed) | whole run s (median) | vs hf (s to target) |\n|---|---|---|---|---|---|---|"
    )
    rows = {}
    for runner, rs in runs.items():
        hits = [first_within(r["trials"], target) for r in rs]
        best_each = [min((t["value"] for t in r["trials"] if t["value"] is not None), default=math.nan) for r in rs]
        reached = [s for s, _ in hits if not math.isnan(s)]
        rows[runner] = (hits, best_each, statistics.median(reached) if reached else math.nan, rs)
    hf = rows["hf"][2] if "hf" in rows else math.nan
    for runner, (hits, best_each, median, rs) in rows.items():
        steps = [n for _, n in hits if not math.isnan(n)]
        each = " ".join("-" if math.isnan(s) else f"{s:.0f}" for s, _ in hits)
        print(
            f"| {runner} | {median:.0f} ({each}) | {statistics.median(steps) if steps else math.nan:.0f} "
            f"| {len(steps)}/{len(rs)} | {statistics.mean(best_each):.4f} ({' '.join(f'{b:.3f}' for b in best_each)}) "
            f"| {statistics.median(r['wall'] for r in rs):.0f} | {median / hf:.2f} |"
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
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.runner:
        with tempfile.TemporaryDirectory() as tmp:
            if args.runner == "hf":
                run_hf(args.studies[0], args.seed, args.db, Path(tmp))
            else:
                run_hpo(args.studies[0], args.seed, args.db, Path(tmp), args.runner)
        return
    began = time.perf_counter()
    results: dict = json.loads(args.load.read_text()) if args.load else {}
    for study in [] if args.load else args.studies:
        runs: dict[str, list[dict]] = {r: [] for r in args.runners.split(",")}
        for seed in range(args.seeds):
            for runner in runs:  # they take turns: a slow spell of the machine hits every runner alike
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
                    subprocess.run(cmd, check=True, capture_output=True)
                    runs[runner].append(
                        {"seed": seed, "wall": time.time() - launched, "trials": trials_of(db, launched)}
                    )
        results[str(study)] = runs
    if args.json:
        args.json.write_text(json.dumps(results))
    for study, runs in results.items():
        print_table(Path(study).name, runs)
    print(f"\n{time.perf_counter() - began:.0f} s in all")


if __name__ == "__main__":
    main()
