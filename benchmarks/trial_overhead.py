"""Trial start-up and memory across trials in one worker: python benchmarks/trial_overhead.py [--trials 20]

One ``hpo run`` process runs N short MiniLM trials (64 rows, 1 epoch, batch 16: 4 optimizer steps)
and reads back what each trial recorded:

* ``seconds_to_first_step``: from the trial's start to its first optimizer step (model load, Trainer,
  first batch), the first trial against the later ones (target on CPU: later ones <= 0.5 s);
* ``rss_mb``: the process's resident memory after each trial (target: growth <= 10% over 20 trials).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "studies" / "data" / "intents"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--json", type=Path, help="write the numbers here")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from rich.console import Console

    from hpo import load_study
    from hpo.study.loop import run_study

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "overhead.yaml"
        path.write_text(
            yaml.safe_dump(
                {
                    "study": "overhead",
                    "model": "sentence-transformers/all-MiniLM-L6-v2",
                    "data": {
                        "train": str(DATA / "train.csv"),
                        "eval": str(DATA / "eval.csv"),
                        "max_length": 64,
                        "max_train_rows": 64,
                        "max_eval_rows": 32,
                    },
                    "train": {"num_train_epochs": 1, "per_device_train_batch_size": 16, "seed": 0},
                    "eval_every": 1.0,
                    "search_space": {"learning_rate": {"type": "float", "low": 1e-5, "high": 1e-3, "log": True}},
                    "sampler": {"name": "random", "seed": 0},
                    "pruner": {"name": "none"},
                    "n_trials": args.trials,
                },
                sort_keys=False,
            )
        )
        start = time.perf_counter()
        study = run_study(load_study(path), Console(quiet=True))
        wall = time.perf_counter() - start
    trials = sorted(study.trials, key=lambda t: t.number)
    first = [t.user_attrs["seconds_to_first_step"] for t in trials]
    rss = [t.user_attrs["rss_mb"] for t in trials]
    later = statistics.median(first[1:])
    growth = (rss[-1] - rss[0]) / rss[0]
    print(f"{len(trials)} trials in {wall:.1f} s ({wall / len(trials):.2f} s per trial, 4 optimizer steps each)")
    print("| measure | value | target |\n|---|---|---|")
    print(f"| seconds to first step, trial 0 | {first[0]:.2f} | |")
    print(f"| seconds to first step, later trials (median; max) | {later:.2f}; {max(first[1:]):.2f} | <= 0.5 |")
    print(
        f"| RSS after trial 0 -> after trial {len(trials) - 1} | {rss[0]:.0f} MB -> {rss[-1]:.0f} MB ({growth:+.1%}) | <= +10% |"
    )
    print(f"| RSS after each trial, MB | {' '.join(f'{r:.0f}' for r in rss)} | |")
    if args.json:
        args.json.write_text(json.dumps({"first_step": first, "rss_mb": rss, "wall": wall}))


if __name__ == "__main__":
    main()
