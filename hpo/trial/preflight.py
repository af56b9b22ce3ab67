"""``hpo check``: what a study will need, measured before it runs.

At two corners of the search space, the most memory-hungry (largest per-device batch, LoRA ``r`` and
``target_modules``, more bits, gradient checkpointing off, the longest rows) and the cheapest, a few real
optimizer steps run through the trial's own code (:func:`hpo.trial.finetune.run_trial`, with a ``FixedTrial``) on
this device, then one evaluation batch of the longest eval rows. A trial of ``processes_per_trial: N`` ranks
is measured in this one process at the same micro-batch and N times the accumulation steps: the same
per-device batch (memory) and the same global batch (optimizer steps, trial time), one device doing every
rank's share (the time is an upper bound for N devices). Each corner's peak memory is measured as a
trial measures it (:class:`hpo.trial.memory.PeakMeter`) and shown beside an analytic breakdown, so that a user
sees why; seconds per optimizer step give the time of one full trial and of the study.
"""

from __future__ import annotations

import dataclasses
import math
import random
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import torch
from transformers import TrainerCallback, TrainingArguments

from hpo import knobs, samplers
from hpo.config import EvalGrid, Resources, StudyConfig
from hpo.config.sections import MAX_PACK
from hpo.config.validate import pack_problems
from hpo.trial import memory
from hpo.trial.corners import corner
from hpo.trial.finetune import run_trial
from hpo.trial.plan import TrialPlan, make_plan
from hpo.trial.resident import sizes_mb
from hpo.trial.workbench import Workbench, prepare

STEPS = 4  # optimizer steps per corner: the first pays for start-up, the others are timed
#: Bytes of optimizer state per trainable parameter (fp32 states), by the optimizer's class name.
OPTIMIZER_BYTES = {"AdamW": 8, "Adam": 8, "RMSprop": 4, "SGD": 4, "Adafactor": 0}
PRUNING_ASSUMPTION = "half the trials after the pruner's first {n} stop halfway through"


#: What a CUDA process holds beside its allocations (context, cuBLAS and cuDNN handles; ~500 MiB seen on an H200)
CUDA_CONTEXT_MB = 600


#: The allocator's cache above the peak allocated (the peak a trial measures): what a worker reserves beyond it
RESERVED_SLACK = 1.25


def workers_per_gpu(free_mb: float, peak_mb: float) -> int:
    """Workers that fit on one GPU with ``free_mb`` free, each at a trial's ``peak_mb`` (its base model counted:
    each worker keeps its own) with the allocator's slack, and a CUDA context; at least 1.

    >>> workers_per_gpu(80_000, 7_000), workers_per_gpu(80_000, 90_000)
    (8, 1)
    """
    return max(1, int(free_mb // (peak_mb * RESERVED_SLACK + CUDA_CONTEXT_MB)))


def pack_size(free_mb: float, peak_mb: float, base_mb: float, most: int) -> int:
    """LoRA trials that fit in one pack on a GPU with ``free_mb`` free: the base model once (``base_mb``), and each
    trial's own share of a trial's ``peak_mb`` (adapters, their gradients and optimizer state, the activations of its
    rows: the peak less the base) with the allocator's slack; 1 to ``most``.

    >>> pack_size(80_000, 17_000, 15_000, 32), pack_size(80_000, 90_000, 15_000, 32)
    (26, 1)
    """
    lane = max(peak_mb - base_mb, 1.0) * RESERVED_SLACK
    return max(1, min(most, int((free_mb - base_mb) // lane)))


class CheckFailed(RuntimeError):
    """A corner's steps failed for another reason than memory (a trial there would fail the same way)."""


@dataclass
class Corner:
    """One corner of the space, measured."""

    name: str  # hungriest or cheapest
    params: dict[str, Any]
    micro_batch: int
    rows_tokens: int  # tokens in the longest training row
    peak_mb: float  # measured, as a trial measures it
    breakdown_mb: dict[str, float]  # weights, gradients, optimizer, activations (an estimate)
    seconds_per_step: float
    trial_seconds: float  # one full trial, no pruning
    fits: bool = True
    ran_out: str = ""  # the out-of-memory error, when the corner ran out on this device (no breakdown then)
    processes: int = 1  # the trial's ranks (processes_per_trial), measured here as accumulation steps
    global_batch: int = 0  # examples per optimizer step, as measured: micro-batch × accumulation × processes
    trial_steps: int = 0  # optimizer steps of one full trial at that global batch
    base_mb: float = 0.0  # of the peak, a LoRA trial's frozen base model: a pack holds it once for all its trials


@dataclass
class CheckReport:
    """What ``hpo check`` found; :meth:`as_json` for scripts."""

    study: str
    device: str
    budget_mb: float
    budget_from: str  # "free memory" or "resources.max_memory_gb"
    n_trials: int
    corners: list[Corner]
    pruned_share: float  # the share of a study's time the pruner is assumed to save
    assumption: str
    advice: list[str] = field(default_factory=list)
    checkpoint_every: bool = False  # the study saves trial checkpoints: their size is shown
    pack: int | None = None  # the trials resources.pack: auto trains at once here (None: the study cannot pack)
    pack_why: str = ""  # what that number comes from

    @property
    def workers_per_gpu(self) -> int | None:
        """One-process workers per GPU for ``hpo run --workers auto`` (:func:`workers_per_gpu`); None: CPU."""
        if self.device != "cuda" or self.corners[0].ran_out:
            return None
        return workers_per_gpu(self.budget_mb, self.corners[0].peak_mb)

    @property
    def fits(self) -> bool:
        return all(c.fits for c in self.corners)

    @property
    def study_seconds(self) -> tuple[float, float]:
        """Every trial at the cheapest corner, every trial at the hungriest: the study's range, unpruned."""
        times = [c.trial_seconds * self.n_trials for c in self.corners if not c.ran_out] or [0.0]
        return min(times), max(times)

    def as_json(self) -> dict[str, Any]:
        low, high = self.study_seconds
        return {
            **dataclasses.asdict(self),
            "fits": self.fits,
            "workers_per_gpu": self.workers_per_gpu,
            "study_seconds": [round(low, 1), round(high, 1)],
            "study_seconds_with_pruning": [
                round(low * (1 - self.pruned_share), 1),
                round(high * (1 - self.pruned_share), 1),
            ],
        }


def check(cfg: StudyConfig, bench: Workbench | None = None) -> CheckReport:
    """Measure the study's hungriest and cheapest corners on this device (nothing is written to its storage).

    Raises:
        ConfigError: the model or the data cannot be loaded.
        CheckFailed: a corner's steps failed for another reason than memory.
    """
    bench = bench or prepare(cfg)
    budget_mb, budget_from = _budget(cfg, bench.device)
    corners = [
        _measure(bench, name, corner(cfg, hungry)) for name, hungry in (("hungriest", True), ("cheapest", False))
    ]
    for c in corners:
        c.fits = not c.ran_out and c.peak_mb <= budget_mb
    n = int(cfg.pruner.args.get("n_startup_trials", samplers.DEFAULT_STARTUP_TRIALS))
    share = 0.0 if cfg.pruner.name == "none" else 0.25 * max(0, cfg.n_trials - n) / cfg.n_trials
    report = CheckReport(
        cfg.study,
        bench.device,
        budget_mb,
        budget_from,
        cfg.n_trials,
        corners,
        share,
        "no pruning" if cfg.pruner.name == "none" else PRUNING_ASSUMPTION.format(n=n),
        checkpoint_every=cfg.checkpoint_every is not None,
    )
    report.pack, report.pack_why = _pack_size(cfg, report)
    if not report.fits:
        report.advice = advice(cfg, corners[0])
    return report


def _pack_size(cfg: StudyConfig, report: CheckReport) -> tuple[int | None, str]:
    """How many trials ``resources.pack: auto`` trains at once on this device, and why (None: cannot pack)."""
    if pack_problems(cfg):
        return None, ""
    hungriest = report.corners[0]
    if cfg.base_varies:
        return 1, f"search_space.{cfg.base_varies} builds the base model more than one way"
    if report.device != "cuda":
        return 1, "on the CPU a pack trains no faster than one trial at a time (docs/performance.md)"
    if hungriest.ran_out:
        return 1, "the hungriest corner runs out of memory alone"
    k = pack_size(report.budget_mb, hungriest.peak_mb, hungriest.base_mb, MAX_PACK)
    lane = hungriest.peak_mb - hungriest.base_mb
    return k, (
        f"the base's {human_mb(hungriest.base_mb)} once and {human_mb(lane)} per trial at the hungriest corner, with the "
        f"allocator's slack, in {human_mb(report.budget_mb)} {report.budget_from}"
    )


def _budget(cfg: StudyConfig, device: str) -> tuple[float, str]:
    if cfg.resources.max_memory_gb:
        return cfg.resources.max_memory_gb * 1024, "resources.max_memory_gb"
    if device == "cuda":
        return torch.cuda.mem_get_info()[0] / 2**20, "free GPU memory"
    mb = memory.available_mb()
    return (mb, "available memory") if mb is not None else (math.inf, "unknown memory")


class _StepClock(TrainerCallback):
    def __init__(self):
        self.seconds: list[float] = []

    def on_step_begin(self, args, state, control, **kwargs):
        self._began = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.seconds.append(time.perf_counter() - self._began)


def _measure(bench: Workbench, name: str, params: dict[str, Any]) -> Corner:
    """A few optimizer steps at ``params``: the longest rows first, then random ones; one eval batch after."""
    cfg = bench.cfg
    plan = make_plan(cfg, params)
    args = plan.training_arguments
    processes = cfg.resources.ranks  # each rank's accumulation steps, here in one process
    batch, accumulation = (
        args.get(memory.BATCH, memory.DEFAULT_BATCH),
        knobs.training_value(args, memory.ACCUMULATION) * processes,
    )
    eval_batch = args.get(memory.EVAL_BATCH, memory.EVAL_BATCH_SIZE)
    rows = _rows(bench, batch, batch * accumulation * STEPS)
    eval_rows = sorted(bench.eval_rows, key=lambda row: len(row["input_ids"]), reverse=True)[:eval_batch]
    tokens = len(rows[0]["input_ids"])  # the longest training row
    steps = _trial_steps(args, len(bench.train_rows), batch * accumulation)
    short = _short(plan, accumulation)
    shape = {"name": name, "params": params, "micro_batch": batch, "rows_tokens": tokens, "processes": processes}
    with tempfile.TemporaryDirectory(prefix="hpo-check-") as tmp:
        scratch = cfg.model_copy(  # no cap: the check measures the whole peak, then compares it with the budget
            update={
                "eval_every": EvalGrid(examples=len(rows), subsample=1),
                "output_dir": Path(tmp),
                "resources": Resources(),
            }
        )
        trial_bench = dataclasses.replace(bench, cfg=scratch, train_rows=rows, eval_rows=eval_rows)
        clock, meter = _StepClock(), memory.PeakMeter(bench.device)
        try:
            result = run_trial(
                trial_bench, short, optuna.trial.FixedTrial(params), run_name=name, meter=meter, callbacks=[clock]
            )
        except Exception as e:
            if not memory.is_out_of_memory(e):
                reason = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
                raise CheckFailed(f"the {name} corner's steps failed: {type(e).__name__}: {reason}") from e
            ran_out = str(e).strip().splitlines()[0][:200]
        else:
            ran_out = ""
        if ran_out:
            peak = meter.peak_mb
            memory.release()
            return Corner(
                **shape,
                peak_mb=round(peak, 1),
                breakdown_mb={},
                seconds_per_step=0.0,
                trial_seconds=0.0,
                fits=False,
                ran_out=ran_out,
                global_batch=batch * accumulation,
                trial_steps=steps,
            )
        startup = result.attrs["seconds_to_first_step"]
        eval_seconds = result.history[-1].get("eval_runtime", 0.0)
        breakdown = _breakdown(bench, result, batch, tokens, args)
        base = sizes_mb(result.model).get(bench.device, 0.0) if cfg.is_lora else 0.0
        global_batch = round(result.attrs["examples_seen"] / result.attrs["optimizer_steps"])
        peak = meter.peak_mb
        del result
        memory.release()
    step = statistics.median(clock.seconds[1:] or clock.seconds)
    every = cfg.eval_every.examples_between(len(bench.train_rows))
    evaluations = math.ceil(steps * batch * accumulation / every) if every else 1
    full_eval = (
        eval_seconds * _padded_tokens(bench.eval_rows, eval_batch) / max(1, _padded_tokens(eval_rows, eval_batch))
    )
    return Corner(
        **shape,
        peak_mb=round(peak, 1),
        breakdown_mb=breakdown,
        seconds_per_step=round(step, 4),
        trial_seconds=round(startup + step * max(0, steps - 1) + evaluations * full_eval, 1),
        global_batch=global_batch,
        trial_steps=steps,
        base_mb=round(base, 1),
    )


def _rows(bench: Workbench, batch: int, n: int) -> list[dict[str, Any]]:
    """``n`` training rows: the longest batch a trial can draw, then random ones (the same at every check)."""
    by_length = sorted(bench.train_rows, key=lambda row: len(row["input_ids"]), reverse=True)
    rng = random.Random(0)
    rows = (by_length * math.ceil(batch / len(by_length)))[:batch]
    return rows + [rng.choice(bench.train_rows) for _ in range(n - batch)]


def _short(plan: TrialPlan, accumulation: int) -> TrialPlan:
    """``plan`` cut to :data:`STEPS` optimizer steps of ``accumulation`` micro-batches, no warmup, rows in order."""
    fields = TrainingArguments.__dataclass_fields__
    sequential = {"train_sampling_strategy": "sequential"} if "train_sampling_strategy" in fields else {}
    args = {**plan.training_arguments, memory.ACCUMULATION: accumulation, "max_steps": STEPS, "warmup_steps": 0}
    return dataclasses.replace(plan, training_arguments={**args, **sequential})


def _padded_tokens(rows: list[dict[str, Any]], batch: int) -> int:
    """Tokens an evaluation computes over ``rows``: shortest first (as a trial orders them), each batch padded."""
    lengths = sorted(len(row["input_ids"]) for row in rows)
    return sum(
        len(lengths[i : i + batch]) * lengths[min(i + batch, len(lengths)) - 1] for i in range(0, len(lengths), batch)
    )


def _trial_steps(args: dict[str, Any], n_train: int, effective_batch: int) -> int:
    if knobs.training_value(args, "max_steps") > 0:
        return int(args["max_steps"])
    return math.ceil(math.ceil(n_train / effective_batch) * float(knobs.training_value(args, "num_train_epochs")))


def _breakdown(bench: Workbench, result, batch: int, tokens: int, args: dict[str, Any]) -> dict[str, float]:
    """Weights, gradients and optimizer states from the trained model; activations from the model's shape.

    Activations follow Korthikanti et al. (2022), "Reducing Activation Recomputation in Large Transformer
    Models": per layer ``s·b·h·(34 + 5·a·s/h)`` bytes at 16 bits (doubled at 32), or only each layer's input
    (``s·b·h`` values) with gradient checkpointing, plus the logits of a language model (``b·s·V``, twice:
    the loss upcasts them).
    """
    model = result.model
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    weights = sum(p.numel() * p.element_size() for p in params)
    gradients = sum(p.numel() * p.element_size() for p in trainable)
    optimizer = OPTIMIZER_BYTES.get(result.attrs.get("optimizer", "AdamW"), 8) * sum(p.numel() for p in trainable)
    config = bench.config.get_text_config() if hasattr(bench.config, "get_text_config") else bench.config
    h = _first(config, "hidden_size", "n_embd", "d_model", "dim") or 0
    layers = _first(config, "num_hidden_layers", "n_layer", "num_layers", "n_layers") or 0
    heads = _first(config, "num_attention_heads", "n_head", "num_heads", "n_heads") or 1
    size = 2 if next((p.dtype for p in trainable), torch.float32) in (torch.float16, torch.bfloat16) else 4
    if args.get("bf16") or args.get("fp16"):
        size = 2
    s, b = tokens, batch
    per_layer = s * b * h * (34 + 5 * heads * s / max(1, h)) * size / 2
    activations = layers * s * b * h * size + per_layer if args.get("gradient_checkpointing") else layers * per_layer
    if bench.cfg.task == "causal-lm":
        activations += 2 * b * s * len(bench.tokenizer) * 4
    mb = 2**-20
    saved = gradients if bench.cfg.is_lora else weights  # a checkpoint holds the adapters, or every weight
    return {
        "weights": round(weights * mb, 1),
        "gradients": round(gradients * mb, 1),
        "optimizer": round(optimizer * mb, 1),
        "activations": round(activations * mb, 1),
        "checkpoint": round((saved + optimizer) * mb, 1),  # with checkpoint_every: model or adapters + optimizer
    }


def _first(config, *names: str) -> int | None:
    return next((getattr(config, n) for n in names if isinstance(getattr(config, n, None), int)), None)


def advice(cfg: StudyConfig, hungriest: Corner) -> list[str]:
    """What to change when the hungriest corner does not fit, largest lever first."""
    p, tips = hungriest.params, []
    if memory.BATCH in cfg.search_space:
        tips.append(
            f"search_space.{memory.BATCH}: lower its largest value ({p.get(memory.BATCH)}); or keep it, and such "
            "trials run out of memory and train again at smaller micro-batches (same results, slower)"
        )
    if cfg.train.get("gradient_checkpointing") is not True and p.get("gradient_checkpointing") is not True:
        where = "search_space.gradient_checkpointing" if "gradient_checkpointing" in cfg.search_space else "train"
        tips.append(f"{where}: gradient_checkpointing: true keeps one layer's activations instead of every layer's")
    tips.append(f"data.max_length: {cfg.data.max_length} (the longest row has {hungriest.rows_tokens} tokens)")
    for name in ("r", "target_modules"):
        if name in cfg.search_space:
            tips.append(f"search_space.{name}: lower its largest value ({p.get(name)})")
    if cfg.is_lora and not cfg.quantized:
        tips.append("model.quantization: {bits: 4} loads the frozen weights in 4 bits (QLoRA, CUDA)")
    elif not cfg.is_lora:
        tips.append("model.lora: train adapters instead of every weight (no gradients or optimizer state for the body)")
    return tips


def human_mb(mb: float) -> str:
    return f"{mb / 1024:.2f} GB" if mb >= 1024 else f"{mb:.0f} MB"
