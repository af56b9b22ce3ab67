"""Record full learning curves to replay searches on: python benchmarks/curves.py OUT.json [--data DIR] [--trials 24]

``--trials`` configurations are drawn at random (seeded) from the quickstart's search space and each is
fine-tuned to the end by hpo's own trial code (``hpo.trial.finetune.run_trial``), with no pruner. At every evaluation
point it records the examples seen, the optimizer steps, the eval loss on the full eval set, the loss of
every eval row (so any subsample's loss can be computed afterwards), and the seconds spent training since the
last point and evaluating at it. ``benchmarks/pruning.py`` replays pruners and eval subsamples on the file:
a pruner's choices on a recorded curve are the ones it makes live, at none of the training cost.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "studies" / "quickstart.yaml"


def study_file(data: Path, folder: Path, epochs: float, seed: int) -> Path:
    import yaml

    study = yaml.safe_load(QUICKSTART.read_text())
    for key in ("environments", "enqueue", "storage"):
        study.pop(key, None)
    study["model"] = "sentence-transformers/all-MiniLM-L6-v2"
    study["data"].update(train=str(data / "train.csv"), eval=str(data / "eval.csv"))
    study["train"] = {"num_train_epochs": epochs, "seed": 42}
    study.update(study="curves", sampler={"name": "random", "seed": seed}, pruner={"name": "none"})
    study["output_dir"] = str(folder / "outputs")
    path = folder / "study.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path


def record(data: Path, trials: int, epochs: float, seed: int) -> dict:
    import optuna
    import torch
    from transformers import TrainerCallback

    from hpo import distributions, load_study
    from hpo.tasks import TASKS
    from hpo.trial.finetune import run_trial
    from hpo.trial.model import collator
    from hpo.trial.plan import make_plan
    from hpo.trial.workbench import prepare

    class RowLosses(TrainerCallback):
        """At each evaluation: the seconds since the last one, split into training and evaluating, and the
        loss of every eval row (computed after the clock stops)."""

        def __init__(self, bench):
            self.bench, self.points, self.mark, self.asked = bench, [], time.perf_counter(), None

        def on_step_end(self, args, state, control, **kwargs):
            if control.should_evaluate and self.asked is None:
                self.asked = time.perf_counter()

        def on_evaluate(self, args, state, control, metrics=None, model=None, **kwargs):
            now = time.perf_counter()
            asked = self.asked or now
            point = {
                "optimizer_steps": state.global_step,
                "eval_loss": metrics["eval_loss"],
                "train_seconds": asked - self.mark,
                "eval_seconds": now - asked,
                "rows": row_losses(model, self.bench),
            }
            self.points.append(point)
            self.mark, self.asked = time.perf_counter(), None

    def row_losses(model, bench) -> list[float]:
        collate = collator(TASKS[bench.cfg.task], bench.tokenizer)
        was_training, out = model.training, []
        model.eval()
        with torch.inference_mode():
            for i in range(0, len(bench.eval_rows), 64):
                batch = {k: v.to(model.device) for k, v in collate(bench.eval_rows[i : i + 64]).items()}
                logits = model(**batch).logits
                out += torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="none").tolist()
        model.train(was_training)
        return [round(x, 6) for x in out]

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_study(study_file(data, Path(tmp), epochs, seed))
        bench = prepare(cfg)
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed), pruner=optuna.pruners.NopPruner())
        labels = [r["labels"] for r in bench.eval_rows]
        runs = []
        for _ in range(trials):
            trial = study.ask()
            sampled, derived = distributions.sample(trial, cfg.search_space, cfg.distributions, cfg.train)
            params = {**sampled, **derived}
            rows = RowLosses(bench)
            began = time.perf_counter()
            result = run_trial(bench, make_plan(cfg, params), trial, callbacks=[rows])
            seconds = time.perf_counter() - began
            study.tell(trial, result.value)
            steps = [h["step"] for h in result.history]
            runs.append(
                {
                    "params": params,
                    "seconds": seconds,
                    "points": [{"step": s, **p} for s, p in zip(steps, rows.points, strict=True)],
                }
            )
            print(f"trial {len(runs)}/{trials}: {params} -> {result.value:.4f} in {seconds:.1f} s", file=sys.stderr)
        return {"data": str(data), "epochs": epochs, "n_train": len(bench.train_rows), "labels": labels, "runs": runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--data", type=Path, default=ROOT / "studies" / "data" / "intents")
    parser.add_argument("--trials", type=int, default=24)
    parser.add_argument("--epochs", type=float, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args.out.write_text(json.dumps(record(args.data, args.trials, args.epochs, args.seed)))


if __name__ == "__main__":
    main()
