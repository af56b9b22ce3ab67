"""LLM-sized trials on a GPU (issue "LLM-sized trials that fit"): python benchmarks/gpu_llm_memory.py [--tiny]

On a causal LM built from a config (~0.5B parameters, Llama architecture, random weights saved to a temporary
folder: no download) and the shipped chat data, for a full fine-tune, LoRA and QLoRA (4-bit):

1. ``hpo check``'s peak at the hungriest corner against the peak of a real trial at that corner;
2. a real CUDA out-of-memory error (``resources.max_memory_gb`` sets the allocator's memory fraction) that the
   trial recovers from at a smaller micro-batch, with allocated memory back at its level before;
3. a QLoRA study of 4 trials that trains and prunes.

Needs CUDA (and bitsandbytes for QLoRA); ``--tiny`` runs a 2-layer model on the CPU without QLoRA, to check the
script itself. Meant to take under 8 minutes on one large GPU; ``--json PATH`` writes the numbers.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHAT = ROOT / "studies" / "data" / "chat"
SIZES = {  # ~0.5B parameters, and a 2-layer model for --tiny
    "llm": {"hidden_size": 1280, "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 3456},
    "tiny": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128},
}


def build_model(folder: Path, size: str) -> Path:
    """A random-init Llama saved as a Hugging Face folder, with the chat tokenizer beside it."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(CHAT / "tokenizer")
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=512, **SIZES[size])
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def study(folder: Path, weights: Path, name: str, **changes) -> dict:
    spec = {
        "study": name,
        "task": "causal-lm",
        "model": {"name": str(weights)},
        "data": {
            "train": str(CHAT / "train.jsonl"),
            "eval": str(CHAT / "eval.jsonl"),
            "prompt_column": "prompt",
            "response_column": "response",
            "max_length": 256,
        },
        "train": {"num_train_epochs": 1, "seed": 0},
        "eval_every": 0.25,
        "search_space": {
            "learning_rate": {"type": "float", "low": 1e-5, "high": 1e-3, "log": True},
            "per_device_train_batch_size": {"type": "categorical", "choices": [4, 16]},
        },
        "sampler": {"name": "random", "seed": 0},
        "pruner": {"name": "none"},
        "n_trials": 1,
        "storage": f"sqlite:///{folder / f'{name}.db'}",
        "output_dir": str(folder / "outputs" / name),
    }
    spec.update(changes)
    return spec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model on the CPU, no QLoRA: checks the script")
    parser.add_argument("--json", type=Path, help="write the numbers here")
    args = parser.parse_args()
    import torch
    from rich.console import Console

    import hpo
    from hpo.study.loop import run_study

    cuda = torch.cuda.is_available()
    if not cuda and not args.tiny:
        raise SystemExit("no CUDA device: run with --tiny to check the script on the CPU")
    quiet = Console(quiet=True)
    out: dict = {"device": torch.cuda.get_device_name() if cuda else "cpu", "check_vs_trial": {}}
    folder = Path(tempfile.mkdtemp(prefix="hpo-gpu-llm-"))
    try:
        model = build_model(folder / "model", "tiny" if args.tiny else "llm")
        lora = {"r": 16, "target_modules": "all-linear"}
        kinds = {"full": {}, "lora": {"lora": lora}}
        if cuda and importlib.util.find_spec("bitsandbytes"):
            kinds["qlora"] = {"lora": lora, "quantization": {"bits": 4}}
        for kind, extra in kinds.items():  # 1. hpo check against a real trial at the same corner
            spec = study(folder, model, f"check-{kind}", model={"name": str(model), **extra})
            began = time.perf_counter()
            report = hpo.check(spec)
            hungriest = report.corners[0]
            trial = run_study(hpo.load_study({**spec, "enqueue": [hungriest.params]}), quiet).trials[0]
            out["check_vs_trial"][kind] = {
                "check_seconds": round(time.perf_counter() - began, 1),
                "check_peak_mb": hungriest.peak_mb,
                "check_cheapest_peak_mb": report.corners[-1].peak_mb,  # batch 4
                "breakdown_mb": hungriest.breakdown_mb,
                "trial_peak_mb": trial.user_attrs.get("peak_memory_mb"),
                "trial_state": trial.state.name,
            }
        # 2. A real out-of-memory error, recovered: the batch of 16 does not fit under the cap, a smaller one does.
        if cuda:
            full = out["check_vs_trial"]["full"]
            # Halfway between the measured peaks of batch 4 and batch 16. A cap at 0.6 of the batch-16 peak, or
            # halfway from check's estimate of weights, gradients and optimizer state, was below what a micro-batch
            # of 1 needs (H200): the trial rightly gave up, and nothing recovered.
            cap_gb = round((full["check_peak_mb"] + full["check_cheapest_peak_mb"]) / 2 / 1024, 2)
            spec = study(folder, model, "oom", resources={"max_memory_gb": cap_gb}, n_trials=2)
            spec["search_space"]["per_device_train_batch_size"] = {"type": "categorical", "choices": [16]}
            before = torch.cuda.memory_allocated()
            try:
                trials = run_study(hpo.load_study(spec), quiet).trials
            except hpo.TrialsFailed as e:
                trials = e.study.trials
            torch.cuda.set_per_process_memory_fraction(1.0)
            out["oom"] = {
                "cap_gb": cap_gb,
                "states": [t.state.name for t in trials],
                "micro_batch": [t.user_attrs.get("micro_batch") for t in trials],
                "peak_memory_mb": [t.user_attrs.get("peak_memory_mb") for t in trials],
                "oom_micro_batches": [t.user_attrs.get("oom_micro_batches") for t in trials],
                "allocated_before": before,
                "allocated_after": torch.cuda.memory_allocated(),
            }
        # 3. A QLoRA study that trains and prunes.
        if "qlora" in kinds:
            spec = study(
                folder,
                model,
                "qlora-prunes",
                model={"name": str(model), **kinds["qlora"]},
                n_trials=4,
                pruner={"name": "median", "n_startup_trials": 1},
            )
            trials = run_study(hpo.load_study(spec), quiet).trials
            out["qlora_study"] = {"states": [t.state.name for t in trials], "values": [t.value for t in trials]}
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print(json.dumps(out, indent=1))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
