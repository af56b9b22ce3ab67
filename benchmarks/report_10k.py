"""Report speed on a synthetic 10,000-trial study: python benchmarks/report_10k.py [--trials N] [--html]

Builds the study in memory with optuna.trial.create_trial (realistic params and
user attrs, 30% pruned), then times hpo.results.tables' tables, Z-scores and CSV
export, and optionally the HTML report. Prints seconds per stage.
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import optuna
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState, create_trial

from hpo.results import tables as report
from hpo.results.html import write_html

optuna.logging.set_verbosity(optuna.logging.WARNING)


def synthetic_study(n: int, seed: int = 0) -> optuna.Study:
    rng = np.random.default_rng(seed)
    dists = {
        "learning_rate": FloatDistribution(1e-5, 1e-3, log=True),
        "per_device_train_batch_size": CategoricalDistribution([8, 16, 32]),
        "weight_decay": FloatDistribution(0.0, 0.1),
    }
    study = optuna.create_study(study_name="synthetic", direction="minimize")
    study.set_user_attr("config", {"objective": {"metric": "eval_loss"}})
    trials = []
    for _i in range(n):
        lr = float(np.exp(rng.uniform(np.log(1e-5), np.log(1e-3))))
        loss = abs(np.log10(lr) + 3.7) + rng.normal(0, 0.05) + 0.05
        pruned = rng.random() < 0.3
        steps = 12 if pruned else 96
        attrs = {
            "best_eval_loss": loss,
            "last_eval_loss": loss,
            "eval_accuracy": float(1 - loss / 3),
            "eval_f1_macro": float(1 - loss / 2.8),
            "optimizer_steps": steps,
            "planned_steps": 96,
            "examples_seen": steps * 8,
            "train_seconds": steps * 0.1,
            "samples_per_second": 80.0,
            "peak_memory_mb": 1000.0,
        }
        trials.append(
            create_trial(
                state=TrialState.PRUNED if pruned else TrialState.COMPLETE,
                value=loss,
                params={
                    "learning_rate": lr,
                    "per_device_train_batch_size": int(rng.choice([8, 16, 32])),
                    "weight_decay": float(rng.uniform(0, 0.1)),
                },
                distributions=dists,
                user_attrs=attrs,
                intermediate_values={96: loss},
            )
        )
    study.add_trials(trials)
    return study


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=10_000)
    parser.add_argument("--html", action="store_true", help="also time the HTML report")
    parser.add_argument("--json", type=Path, help="write the numbers here")
    args = parser.parse_args()
    study = synthetic_study(args.trials)
    out = Path(tempfile.mkdtemp())
    t0 = time.perf_counter()
    trials = report.trials_frame([study])
    t1 = time.perf_counter()
    summary = report.studies_frame([study], trials)
    t2 = time.perf_counter()
    report.write_csv(trials, summary, out / "trials.csv")
    t3 = time.perf_counter()
    print(
        f"{args.trials} trials: trials table + z-scores {t1 - t0:.2f} s, study summary {t2 - t1:.2f} s, "
        f"CSV {t3 - t2:.2f} s, total {t3 - t0:.2f} s"
    )
    if args.html:
        write_html([study], trials, summary, out / "report.html")
        t4 = time.perf_counter()
        print(
            f"HTML report {t4 - t3:.2f} s ({(out / 'report.html').stat().st_size / 2**20:.1f} MiB); "
            f"whole report {t4 - t0:.2f} s (target: 5 s)"
        )
    if args.json:
        args.json.write_text(json.dumps({"tables_csv": t3 - t0, "whole": time.perf_counter() - t0}))


if __name__ == "__main__":
    main()
