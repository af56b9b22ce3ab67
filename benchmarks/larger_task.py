"""A larger intent task for benchmarks: python benchmarks/larger_task.py DIR [--train 1200] [--eval 300] [--study]

The quickstart's templates and slots (studies/data/intents/make_intents.py), made harder the way real
requests are: one request in five carries a second, off-intent clause after its first ("..., and then
play some jazz"; the label is the first clause's), and 5% of the labels are wrong. The eval loss then
has a floor well above zero, so a search has something to find at 1,000+ rows. Deterministic. ``--study``
also writes ``DIR/study.yaml``: the quickstart's study file on this data (for benchmarks/time_to_quality.py).
"""

from __future__ import annotations

import argparse
import csv
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "studies" / "data" / "intents"))
from make_intents import TEMPLATES, fill

ROOT = Path(__file__).resolve().parents[1]

JOINS = [", and then ", " and also ", ". Oh, and ", " - after that ", ", plus "]


def rows(n: int, rng: random.Random, mixed: float = 0.2, noise: float = 0.05) -> list[tuple[str, str]]:
    intents = sorted(TEMPLATES)
    out = []
    for _ in range(n):
        intent = rng.choice(intents)
        text = fill(rng.choice(TEMPLATES[intent]), rng)
        if rng.random() < mixed:
            other = rng.choice([i for i in intents if i != intent])
            text += rng.choice(JOINS) + fill(rng.choice(TEMPLATES[other]), rng).lower()
        label = rng.choice(intents) if rng.random() < noise else intent
        out.append((text, label))
    return out


def write(folder: Path, train: int = 1200, evaluation: int = 300, seed: int = 7, make=rows) -> Path:
    """Write ``train.csv`` and ``eval.csv`` (text, label) of ``make(n, rng)`` rows into ``folder``; return it."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for name, n in (("train.csv", train), ("eval.csv", evaluation)):
        with open(folder / name, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["text", "label"])
            writer.writerows(make(n, rng))
    return folder


def study_file(folder: Path) -> Path:
    """``studies/quickstart.yaml`` as shipped (search space, sampler, pruner, epochs), on the data in ``folder``."""
    import yaml

    study = yaml.safe_load((ROOT / "studies" / "quickstart.yaml").read_text())
    for key in ("environments", "storage"):
        study.pop(key, None)
    study["study"] = "larger"
    study["data"].update(train=str(folder.resolve() / "train.csv"), eval=str(folder.resolve() / "eval.csv"))
    path = folder / "study.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dir", type=Path)
    parser.add_argument("--train", type=int, default=1200)
    parser.add_argument("--eval", type=int, default=300)
    parser.add_argument("--study", action="store_true", help="also write DIR/study.yaml")
    a = parser.parse_args()
    folder = write(a.dir, a.train, a.eval)
    print(study_file(folder) if a.study else folder)
