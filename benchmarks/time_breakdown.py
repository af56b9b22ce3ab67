"""Where a study's wall time goes: python benchmarks/time_breakdown.py [--trials 4] [--rows 384]

Runs a small MiniLM study in this process (quickstart data, 1 epoch, 4 evaluations, no pruning) with
timers around the places the model computes: ``Trainer.training_step`` (forward and backward),
``Trainer.prediction_step`` (eval forward), ``AdamW.step``, gradient clipping and zeroing. Everything else (start-up, reading and
tokenizing, collation, Trainer set-up, storage, sampler, logging, artifacts, saving the best model)
is the wall time minus those. The suite's target: model compute >= 90% of the wall time.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "studies" / "data" / "intents"
spent: dict[str, float] = defaultdict(float)


def timed(owner, name: str, label: str) -> None:
    original = getattr(owner, name)

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            spent[label] += time.perf_counter() - start

    setattr(owner, name, wrapper)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--rows", type=int, default=384)
    parser.add_argument("--json", type=Path, help="write the numbers here")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    import torch
    from rich.console import Console
    from transformers import Trainer

    from hpo import load_study
    from hpo.study.loop import run_study

    imports = time.perf_counter() - start
    timed(Trainer, "training_step", "train forward + backward")
    timed(Trainer, "prediction_step", "eval forward")
    timed(torch.optim.AdamW, "step", "optimizer step, gradient clipping and zeroing")
    timed(Trainer, "_clip_grad_norm", "optimizer step, gradient clipping and zeroing")
    timed(torch.nn.Module, "zero_grad", "optimizer step, gradient clipping and zeroing")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "breakdown.yaml"
        path.write_text(
            yaml.safe_dump(
                {
                    "study": "breakdown",
                    "model": "sentence-transformers/all-MiniLM-L6-v2",
                    "data": {
                        "train": str(DATA / "train.csv"),
                        "eval": str(DATA / "eval.csv"),
                        "max_length": 64,
                        "max_train_rows": args.rows,
                    },
                    "train": {"num_train_epochs": 1, "seed": 42},
                    "eval_every": 0.25,
                    "search_space": {
                        "learning_rate": {"type": "float", "low": 2e-5, "high": 2e-4, "log": True},
                        "per_device_train_batch_size": {"type": "categorical", "choices": [16, 32]},
                    },
                    "sampler": {"name": "random", "seed": 0},
                    "pruner": {"name": "none"},
                    "n_trials": args.trials,
                },
                sort_keys=False,
            )
        )
        begin = time.perf_counter()
        run_study(load_study(path), Console(quiet=True))
        wall = time.perf_counter() - begin
    compute = sum(spent.values())
    print(f"{args.trials} trials x 1 epoch on {args.rows} rows; imports before the study {imports:.1f} s (not counted)")
    print("| part | seconds | share of the study's wall time |\n|---|---|---|")
    for label, seconds in spent.items():
        print(f"| {label} | {seconds:.1f} | {seconds / wall:.1%} |")
    print(f"| model compute, in all | {compute:.1f} | {compute / wall:.1%} |")
    print(f"| everything else | {wall - compute:.1f} | {(wall - compute) / wall:.1%} |")
    print(f"| study wall time | {wall:.1f} | 100% |")
    if args.json:
        args.json.write_text(json.dumps({"wall": wall, "compute": compute, "parts": spent}))


if __name__ == "__main__":
    main()
