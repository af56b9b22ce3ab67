"""GPU memory across trials (part 6 of the suite, on CUDA): python benchmarks/cuda_memory.py [--trials 6]

One worker runs N trials of a full fine-tune, then N of LoRA, on a random-init BERT built from a
config (hidden 256, 4 layers, sized to the shipped chat BPE tokenizer; no download) on the quickstart's
intent data, and reads ``torch.cuda.memory_allocated()`` before the first trial and after each
trial's release. Target: flat after the first trial (the baseline plus the base model the worker keeps). Also prints the precision hpo picked
and each trial's peak. The third run forces a real CUDA out-of-memory error: a per-device batch of 256
under ``resources.max_memory_gb: 0.2`` (hpo sets the allocator's memory fraction; on an H200 that batch
peaked at 305 MB), so the first trial runs out and recovers at a smaller micro-batch, and the later ones
start at the size that fit; memory must still come back to the baseline. Then ``--workers 2`` of the same
study checks that forked workers use CUDA.
Needs a GPU; ``--json PATH`` writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "studies" / "data" / "intents"
MAX_MEMORY_GB = 0.2  # the third run's cap: under the 305 MB that a micro-batch of 256 peaked at on an H200


def study_file(folder: Path, name: str, trials: int, lora: bool, oom: bool = False) -> Path:
    model = {
        "config": {
            "architecture": "bert",
            "hidden_size": 256,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "intermediate_size": 1024,
        },
        "tokenizer": str(ROOT / "studies" / "data" / "chat" / "tokenizer"),
    }
    if lora:
        model["lora"] = {"target_modules": ["query", "key", "value", "dense"]}
    path = folder / f"{name}.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "study": name,
                "model": model,
                "data": {"train": str(DATA / "train.csv"), "eval": str(DATA / "eval.csv"), "max_length": 64},
                "train": {"num_train_epochs": 1, "seed": 0},
                "eval_every": 0.5,
                "search_space": {
                    "learning_rate": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
                    "per_device_train_batch_size": {"type": "categorical", "choices": [256] if oom else [16, 32]},
                },
                **({"resources": {"max_memory_gb": MAX_MEMORY_GB}} if oom else {}),
                "sampler": {"name": "random", "seed": 0},
                "pruner": {"name": "none"},
                "n_trials": trials,
                "storage": f"sqlite:///{folder / 'cuda.db'}",
            },
            sort_keys=False,
        )
    )
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--json", type=Path, help="write the numbers here")
    args = parser.parse_args()
    import torch
    from rich.console import Console

    import hpo.study.objective
    from hpo import load_study
    from hpo.study.loop import run_study
    from hpo.trial.model import device_settings

    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this benchmark needs a GPU")
    after: list[int] = []
    release = hpo.study.objective.release

    def measured_release(result=None):  # hpo's own release, then a reading
        release(result)
        after.append(torch.cuda.memory_allocated())

    hpo.study.objective.release = measured_release
    out = {"device": torch.cuda.get_device_name(), "precision": device_settings(), "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, lora, oom in (("full", False, False), ("lora", True, False), ("oom", False, True)):
            after.clear()
            baseline = torch.cuda.memory_allocated()
            start = time.perf_counter()
            study = run_study(load_study(study_file(Path(tmp), name, args.trials, lora, oom)), Console(quiet=True))
            out["runs"][name] = {
                "baseline_bytes": baseline,
                "after_each_trial_bytes": list(after),
                "peak_mb": [t.user_attrs.get("peak_memory_mb") for t in study.trials],
                "states": [t.state.name for t in study.trials],
                "micro_batch": [t.user_attrs.get("micro_batch") for t in study.trials],
                "oom_micro_batches": [t.user_attrs.get("oom_micro_batches") for t in study.trials],
                "seconds": time.perf_counter() - start,
            }
        torch.cuda.set_per_process_memory_fraction(1.0)
        # A fresh `hpo run --workers 2`: its GPU workers are spawned, each with its own CUDA context.
        path = study_file(Path(tmp), "workers", 4, False)
        proc = subprocess.run(
            [sys.executable, "-m", "hpo.cli", "run", str(path), "--workers", "2"], capture_output=True, text=True
        )
        import optuna

        study = optuna.load_study(study_name="workers", storage=f"sqlite:///{Path(tmp) / 'cuda.db'}")
        out["workers"] = {
            "exit_code": proc.returncode,
            "states": [t.state.name for t in study.trials],
            "pids": sorted({t.user_attrs["worker"]["pid"] for t in study.trials if "worker" in t.user_attrs}),
            "peak_mb": [t.user_attrs.get("peak_memory_mb") for t in study.trials],
            "output": (proc.stdout + proc.stderr)[-2000:],
        }
    print(f"{out['device']}; hpo picked {out['precision']}")
    print(
        "| run | allocated before trial 0 | after each trial's release | flat after trial 0 | peak per trial, MB "
        "| micro-batches |"
    )
    print("|---|---|---|---|---|---|")
    for name, r in out["runs"].items():
        # The worker keeps its base model between trials (hpo.trial.resident): after the first trial allocated
        # memory is the baseline plus that base, and must stay there
        back = all(b <= r["after_each_trial_bytes"][0] for b in r["after_each_trial_bytes"])
        print(
            f"| {name} | {r['baseline_bytes']} B | {' '.join(str(b) for b in r['after_each_trial_bytes'])} B | "
            f"{'yes' if back else 'NO'} | {' '.join(str(p) for p in r['peak_mb'])} | "
            f"{' '.join(str(m) for m in r['micro_batch'])} (ran out: {r['oom_micro_batches']}) |"
        )
    if not any(out["runs"]["oom"]["oom_micro_batches"]):
        print(f"NOT CHECKED: no trial of the oom run ran out of memory under {MAX_MEMORY_GB} GB; lower MAX_MEMORY_GB")
    print(
        f"--workers 2: exit {out['workers']['exit_code']}, trials {out['workers']['states']}, "
        f"{len(out['workers']['pids'])} worker pids, peaks {out['workers']['peak_mb']} MB"
    )
    if out["workers"]["exit_code"]:
        print(out["workers"]["output"])
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
