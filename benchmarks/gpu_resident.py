"""The resident base on a lent GPU, one prepared script: python benchmarks/gpu_resident.py OUT_DIR [--device cpu]

Runs benchmarks/resident.py (a LoRA study with the base loaded per trial, kept resident, and its trials in packs of 4
and 8; trials per hour, first-step time, peak memory, NVML busy share every 50 ms, the best value of each) for:

1. a ~1.1B-parameter Llama built from a config (random weights: nothing travels), causal LM on the chat pairs;
2. MiniLM (the packaged all-MiniLM-L6-v2), a classifier on the intents.

Writes OUT_DIR/gpu_resident.md (both tables) and gpu_resident.json. ``--device cpu`` runs it end to end with tiny
sizes (so that a lease is never lost to a typo): check it here first. About 6 minutes on an H100 (estimated: not
run on a GPU yet).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RUNS = {  # name: resident.py's arguments on a GPU
    "llama-1.1b": ["--model", "lm", "--trials", "12", "--rows", "64", "--packs", "4,8"],
    "minilm": ["--model", "minilm", "--trials", "12", "--rows", "512", "--packs", "4,8"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    tables, numbers = [], {}
    for name, extra in RUNS.items():
        cmd = [sys.executable, str(HERE / "resident.py"), "--device", args.device, *extra]
        cmd += ["--json", str(args.out / f"{name}.json"), *(["--smoke"] if args.device == "cpu" else [])]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        text = done.stdout if done.returncode == 0 else f"failed ({done.returncode}):\n{done.stderr[-2000:]}"
        print(f"## {name}\n\n{text}", flush=True)
        tables.append(f"## {name}\n\n{text}")
        if done.returncode == 0:
            numbers[name] = json.loads((args.out / f"{name}.json").read_text())
    (args.out / "gpu_resident.md").write_text("\n".join(tables))
    (args.out / "gpu_resident.json").write_text(json.dumps(numbers, indent=2))
    sys.exit(0 if len(numbers) == len(RUNS) else 1)


if __name__ == "__main__":
    main()
