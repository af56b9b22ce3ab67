"""Control-plane cost per trial at 1,000 trials: python benchmarks/control_plane.py [--trials 1000] [--rounds 2]

One worker, a no-op objective that only samples the search space, TPE, on SQLite: hpo's trial
loop (open_study with WAL and heartbeats, the finished+running check, the progress callback)
against plain Optuna's ``study.optimize`` with the same sampler and storage. Prints milliseconds per
trial over the whole run (TPE's own cost grows with the history, for both).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

from workers import noop, tiny_study


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", type=Path, help="write the numbers here")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    ms: dict[str, list[float]] = {"hpo": [], "plain Optuna": []}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        path = tiny_study(folder)
        for k in range(args.rounds):  # taking turns: a slow spell of this machine hits both alike
            for name in ms:
                r = noop(path, f"sqlite:///{folder / f'{name[:5]}{k}.db'}", 1, args.trials, plain=name != "hpo")
                ms[name].append(1000 * r["seconds"] / r["finished"])
    mean = {name: statistics.mean(v) for name, v in ms.items()}
    print(f"{args.trials} no-op trials, TPE, SQLite, one worker; mean of {args.rounds} rounds")
    print("| loop | ms per trial | rounds | vs plain Optuna |\n|---|---|---|---|")
    for name, v in ms.items():
        print(
            f"| {name} | {mean[name]:.1f} | {' '.join(f'{x:.1f}' for x in v)} | {mean[name] / mean['plain Optuna']:.2f} |"
        )
    if args.json:
        args.json.write_text(json.dumps(mean))


if __name__ == "__main__":
    main()
