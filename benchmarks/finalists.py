"""What generation-scored finalists cost and change: python benchmarks/finalists.py [--seeds 1,2,3]

Runs studies/chat_lora.yaml (8 LoRA trials on chat data, the best 3 by eval loss generating on the 96 eval
conversations) once per sampler seed, in a copy of studies/, and prints per run: the study's wall time, the time its
finalists spent generating and scoring (the ``generate_seconds`` of every trial that generated), its share of the
wall, and whether eval loss and each generation metric rank the finalists alike (first place, and the share of
finalist pairs they order differently).
"""

from __future__ import annotations

import argparse
import itertools
import shutil
import statistics
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(seed: int) -> dict:
    from rich.console import Console

    import hpo
    from hpo.attrs import GENERATE_SECONDS

    with tempfile.TemporaryDirectory() as tmp:
        for folder in ("studies", "search_spaces"):
            shutil.copytree(ROOT / folder, Path(tmp) / folder)
        path = Path(tmp) / "studies" / "chat_lora.yaml"
        start = time.perf_counter()
        study = hpo.run(path, overrides={"sampler.seed": seed}, console=Console(quiet=True))
        wall = time.perf_counter() - start
        found = hpo.best(path)[1]["finalists"]
    generated = [t.user_attrs[GENERATE_SECONDS] for t in study.trials if GENERATE_SECONDS in t.user_attrs]
    order = found["by_objective"]  # by eval loss, best first
    scores = {f["trial"]: f.get("scores", {}) for f in found["ranked"]}
    disagree = {}
    for metric in next(iter(scores.values())):
        pairs = list(itertools.combinations(order, 2))  # a before b by loss
        crossed = sum(scores[a][metric] < scores[b][metric] for a, b in pairs)
        best = max(order, key=lambda n: (scores[n][metric], -order.index(n)))
        disagree[metric] = {"first": best != order[0], "pairs": crossed / len(pairs)}
    return {
        "seed": seed,
        "wall_s": wall,
        "generate_s": sum(generated),
        "generated": len(generated),
        "disagree": disagree,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=lambda v: [int(s) for s in v.split(",")], default=[42, 1, 2])
    args = parser.parse_args()
    rows = [run(seed) for seed in args.seeds]
    metrics = list(rows[0]["disagree"])
    print(
        "| sampler seed | study wall | finalists' generation | share | trials that generated | "
        + " | ".join(f"{m}: first / pairs crossed" for m in metrics)
        + " |"
    )
    print("|---" * (5 + len(metrics)) + "|")
    for r in rows:
        cells = [
            f"{'differs' if r['disagree'][m]['first'] else 'same'} / {r['disagree'][m]['pairs']:.0%}" for m in metrics
        ]
        print(
            f"| {r['seed']} | {r['wall_s']:.1f} s | {r['generate_s']:.1f} s | {r['generate_s'] / r['wall_s']:.1%} | "
            f"{r['generated']} | " + " | ".join(cells) + " |"
        )
    share = statistics.fmean(r["generate_s"] / r["wall_s"] for r in rows)
    firsts = sum(r["disagree"][m]["first"] for r in rows for m in metrics)
    print(
        f"mean share of the wall: {share:.1%}; first place differs in {firsts} of {len(rows) * len(metrics)} "
        "(run, metric) pairs"
    )


if __name__ == "__main__":
    main()
