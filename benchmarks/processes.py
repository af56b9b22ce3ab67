"""One trial per process vs one trial as 2 processes: python benchmarks/processes.py [--trials 3] [--repeats 2]

The quickstart study (MiniLM, 384 rows, 2 epochs, 8 evaluations) with its enqueued default and seeded
TPE, no pruning, run as ``resources.processes_per_trial: 1`` (one process, all cores) and ``2`` (two
torchrun ranks on gloo, the cores shared out), each as a fresh ``hpo run`` process timed from its start;
the two take turns, ``--repeats`` rounds, medians count. The per-device batch is halved at 2 processes so
the global batch, and so the training, is the same. Prints wall times and each run's best eval loss.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def study(folder: Path, processes: int, trials: int) -> Path:
    cfg = yaml.safe_load((ROOT / "studies" / "quickstart.yaml").read_text())
    cfg.pop("environments")
    cfg["data"] = {**cfg["data"], **{k: str(ROOT / "studies" / cfg["data"][k]) for k in ("train", "eval")}}
    space = cfg["search_space"]
    space["per_device_train_batch_size"] = {"type": "categorical", "choices": [16 // processes]}
    cfg["enqueue"] = [{**cfg["enqueue"][0], "per_device_train_batch_size": 16 // processes}]
    cfg.update(
        study=f"p{processes}",
        n_trials=trials,
        pruner={"name": "none"},
        resources={"processes_per_trial": processes},
        storage=f"sqlite:///{folder}/p{processes}.db",
        output_dir=str(folder / f"out{processes}"),
    )
    path = folder / f"p{processes}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    walls: dict[int, list[float]] = {1: [], 2: []}
    best: dict[int, float] = {}
    for _ in range(args.repeats):
        for processes in walls:
            with tempfile.TemporaryDirectory() as tmp:
                path = study(Path(tmp), processes, args.trials)
                began = time.perf_counter()
                subprocess.run([sys.executable, "-m", "hpo.cli", "run", str(path)], check=True, capture_output=True)
                walls[processes].append(time.perf_counter() - began)
                import optuna

                best[processes] = optuna.load_study(
                    study_name=f"p{processes}", storage=f"sqlite:///{tmp}/p{processes}.db"
                ).best_value
    rows = {
        p: {"wall_s": round(statistics.median(w), 1), "best_eval_loss": round(best[p], 4)} for p, w in walls.items()
    }
    print(json.dumps(rows, indent=2))
    print(f"2 processes / 1 process wall time: {rows[2]['wall_s'] / rows[1]['wall_s']:.2f}")


if __name__ == "__main__":
    main()
