"""Control-plane cost per trial at 1,000 trials: python benchmarks/control_plane.py [--trials 1000]

One worker, a no-op objective that only samples the search space, TPE, on SQLite: hpo's trial
loop (open_study with WAL and heartbeats, the finished+running check, the progress callback)
against plain Optuna's ``study.optimize`` with the same sampler and storage. Prints milliseconds per
trial over the whole run (TPE's own cost grows with the history, for both).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

from workers import noop, tiny_study


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=1000)
    parser.add_argument("--json", type=Path, help="write the numbers here")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        path = tiny_study(folder)
        rows = {"hpo": noop(path, f"sqlite:///{folder / 'hpo.db'}", 1, args.trials),
                "plain Optuna": noop(path, f"sqlite:///{folder / 'plain.db'}", 1, args.trials, plain=True)}
    print(f"{args.trials} no-op trials, TPE, SQLite, one worker")
    print("| loop | ms per trial | vs plain Optuna |\n|---|---|---|")
    for name, r in rows.items():
        ms = 1000 * r["seconds"] / r["finished"]
        print(f"| {name} | {ms:.1f} | {r['seconds'] / rows['plain Optuna']['seconds']:.2f} |")
    if args.json:
        args.json.write_text(json.dumps({name: 1000 * r["seconds"] / r["finished"] for name, r in rows.items()}))


if __name__ == "__main__":
    main()
