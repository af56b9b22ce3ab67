"""A trial's memory: its peak measured, a cap on it, its release, and recovery from running out.

Peak: on CUDA the caching allocator's max allocated; on CPU the peak resident set size (``VmHWM``), which
Linux resets when ``5`` is written to ``/proc/self/clear_refs``. Both count from the level at the start, so
a trial's peak is its own (model, optimizer, activations), not the process's imports or earlier trials.

Out of memory: a trial that runs out (``torch.OutOfMemoryError`` on CUDA, or above ``resources.max_memory_gb``
on CPU) is trained again from the start with the per-device batch halved and gradient accumulation doubled:
the same effective batch, so the same optimizer steps, schedule and evaluation grid. A micro-batch is always a
divisor of the sampled batch (12 → 6 → 3 → 1), so the product stays exact. Later trials of the same or larger
demand start at the largest micro-batch known to fit. No library does this for the Trainer: accelerate's
``find_executable_batch_size`` halves the batch itself, which changes the configuration being tuned.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import dataclasses
import gc
import os
import re
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch
from transformers import TrainerCallback

from hpo import knobs
from hpo.attrs import OOM_AT, OUT_OF_MEMORY
from hpo.trial.plan import DEFAULT_BATCH, TrialPlan, lora_target_list

BATCH, ACCUMULATION, EVAL_BATCH = (
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "per_device_eval_batch_size",
)
EVAL_BATCH_SIZE = 64  # hpo's eval batch: inference keeps no activations for a backward pass, so it batches wider

#: Parameters that change no tensor's shape: trials that differ only in them need the same memory.
NEUTRAL = frozenset(
    {
        "learning_rate",
        "weight_decay",
        "warmup_steps",
        "warmup_ratio",
        "lr_scheduler_type",
        "dropout",
        "lora_dropout",
        "lora_alpha",
        ACCUMULATION,
        "seed",
        "data_seed",
        "num_train_epochs",
        "max_steps",
        "max_grad_norm",
        "adam_beta1",
        "adam_beta2",
        "adam_epsilon",
        "label_smoothing_factor",
        "momentum",
        "lr_step_size",
        "lr_gamma",
        "lr_plateau_factor",
        "lr_plateau_patience",
        "head_learning_rate",
        "head_lr_multiplier",
        "lr_scaling",
        "lr_base_batch_size",
        "head_init",
        "head_init_std",
    }
)


def _targets(value: Any) -> frozenset[str] | None:
    return None if value == "all-linear" else frozenset(lora_target_list(value))


def _covers(a: Any, b: Any) -> bool:
    """Whether target_modules ``a`` adapts at least the modules ``b`` does (all-linear covers any list)."""
    ta, tb = _targets(a), _targets(b)
    return ta is None or (tb is not None and ta >= tb) or a == b


#: Parameters whose memory demand grows one way: ``at_least(a, b)`` holds when ``a`` needs at least ``b``'s.
MONOTONE: dict[str, Callable[[Any, Any], bool]] = {
    "r": lambda a, b: a >= b,
    "per_device_eval_batch_size": lambda a, b: a >= b,
    "gradient_checkpointing": lambda a, b: not a or bool(b),  # off keeps every activation
    "bits": lambda a, b: (a or 32) >= (b or 32),  # None: not quantized
    "target_modules": _covers,
}


def at_least_as_demanding(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Whether a trial with parameters ``a`` needs at least the memory of one with ``b`` at the same micro-batch."""
    for name in (set(a) | set(b)) - NEUTRAL - {BATCH}:
        order = MONOTONE.get(name)
        if name not in a or name not in b:
            return False
        if not (order(a[name], b[name]) if order else a[name] == b[name]):
            return False
    return True


def divisors_below(batch: int, limit: int) -> list[int]:
    """The micro-batches a trial of per-device ``batch`` can run below ``limit``, largest first."""
    return [d for d in range(min(batch, limit - 1), 0, -1) if batch % d == 0]


def start_micro_batch(params: Mapping[str, Any], batch: int, earlier: Iterable[Mapping[str, Any]]) -> int | None:
    """The micro-batch a trial starts at: None (its batch), or the largest below any micro-batch that ran out of
    memory in an earlier trial of no greater demand; at least 1, so a trial is never failed untrained on what
    another one saw.

    ``earlier``: params and ``OOM_AT`` of earlier trials on the same memory (:func:`signature`), as
    ``{"params": ..., OOM_AT: [...]}``.
    """
    limit = batch + 1
    for t in earlier:
        failed = t.get(OOM_AT)
        if failed and at_least_as_demanding(params, t["params"]):
            limit = min(limit, min(failed))
    if limit > batch:
        return None
    fitting = divisors_below(batch, limit)
    return fitting[0] if fitting else 1


def signature(device: str, limit_gb: float | None, revision: int, packed: bool = False) -> str:
    """What makes one trial's out-of-memory errors tell about another's: the same device model and size, the
    same ``max_memory_gb``, the same revision of the study file (its fixed settings: max_length, train:), trained
    in a pack or not (a packed trial's memory is shared with the others')."""
    if device == "cuda":
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        where = f"{props.name}/{props.total_memory >> 20}MiB"
    else:
        where = f"cpu/{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') >> 20}MiB"
    return f"{where}/cap={limit_gb}/revision={revision}" + "/packed" * packed


def with_micro_batch(plan: TrialPlan, micro: int) -> TrialPlan:
    """``plan`` with per-device batch ``micro`` and the accumulation that keeps its effective batch."""
    args = plan.training_arguments
    batch = args.get(BATCH, DEFAULT_BATCH)
    if micro == batch:
        return plan
    accumulation = knobs.training_value(args, ACCUMULATION) * batch // micro
    return dataclasses.replace(plan, training_arguments={**args, BATCH: micro, ACCUMULATION: accumulation})


class EvalOutOfMemory(torch.OutOfMemoryError):
    """An evaluation ran out of memory: its batch is halved, which changes no result."""


class TrainOutOfMemory(torch.OutOfMemoryError):
    """Training ran over ``resources.max_memory_gb`` (raised at the end of a step, before any evaluation)."""


class PackOutOfMemory(torch.OutOfMemoryError):
    """A packed pass of several trials ran out of memory (:mod:`hpo.trial.pack`): the pack holds fewer trials from
    now on, and each trial of the pass trains again at the same micro-batch, which may fit alone."""


class OutOfMemory(RuntimeError):
    """A trial ran out of memory at micro-batch 1, or evaluating at batch 1."""

    def __init__(self, message: str, ran_out: list[int]):
        super().__init__(message)
        self.ran_out = ran_out  # the micro-batches that ran out in this trial, largest first


def is_out_of_memory(e: BaseException) -> bool:
    """CUDA's ``torch.OutOfMemoryError``, the CPU allocator's failure, or hpo's cap (raised as the former)."""
    text = str(e)
    return isinstance(e, torch.OutOfMemoryError) or (
        isinstance(e, RuntimeError)
        and any(
            s in text
            for s in (
                "CUDA out of memory",
                "CUDA error: out of memory",
                "can't allocate memory",
                "CUBLAS_STATUS_ALLOC_FAILED",
            )
        )
    )


T = TypeVar("T")


def fit(
    plan: TrialPlan,
    attempt: Callable[[TrialPlan, PeakMeter], T],
    device: str,
    start: int | None = None,
    on_retry: Callable[[list[int], str], None] | None = None,
    eval_start: int | None = None,
) -> tuple[T, int, list[int], int]:
    """Run ``attempt`` on ``plan``, again at smaller micro-batches while it runs out of memory.

    ``start``: the micro-batch to begin with (:func:`start_micro_batch`). An evaluation that runs out halves
    the eval batch instead (``eval_start``: the eval batch to begin with, one that fitted in an earlier trial).
    ``on_retry(ran_out, message)`` is told each fallback. Returns (the result, the micro-batch it ran at, the
    micro-batches that ran out, the eval batch it ran at).

    Raises:
        OutOfMemory: it ran out at micro-batch 1 (``ran_out`` lists every one that did), or evaluating at batch 1.
    """
    args = plan.training_arguments
    batch, accumulation = args.get(BATCH, DEFAULT_BATCH), knobs.training_value(args, ACCUMULATION)
    eval_batch = min(args.get(EVAL_BATCH, EVAL_BATCH_SIZE), eval_start or EVAL_BATCH_SIZE * 2**20)
    micro, failed = start or batch, []
    while True:
        meter = PeakMeter(device)
        at = with_micro_batch(plan, micro)
        if eval_batch != args.get(EVAL_BATCH, EVAL_BATCH_SIZE):
            at = dataclasses.replace(at, training_arguments={**at.training_arguments, EVAL_BATCH: eval_batch})
        try:
            with warnings.catch_warnings():  # a retry reports the grid points again: Optuna keeps the first values
                warnings.filterwarnings("ignore", message=".*is already reported")
                return attempt(at, meter), micro, failed, eval_batch
        except Exception as e:
            if not is_out_of_memory(e):
                raise
            in_eval, crowded = isinstance(e, EvalOutOfMemory), isinstance(e, PackOutOfMemory)
            reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        # Out of the except block: the traceback, which holds the attempt's model and tensors, is gone.
        peak_gb = meter.peak_mb / 1024
        release()
        if crowded:  # the pack shrank: the same micro-batch, with fewer trials beside it
            message = f"{reason}: again at micro-batch {micro}"
        elif in_eval:
            if eval_batch == 1:  # no smaller eval batch; a smaller training one would not help
                raise OutOfMemory(
                    f"out of memory evaluating at batch 1 (peak {peak_gb:.2f} GB): set eval_accumulation_steps "
                    "to move predictions off the device as they come",
                    failed,
                )
            eval_batch //= 2
            message = f"evaluating ({reason}): again with evaluation batches of {eval_batch}"
        else:
            failed.append(micro)
            smaller = divisors_below(batch, micro // 2 + 1)  # halved, or the next divisor below: 12 → 6 → 3 → 1
            if not smaller:
                raise OutOfMemory(f"out of memory at micro-batch {micro} (peak {peak_gb:.2f} GB)", failed)
            micro = smaller[0]
            message = (
                f"at micro-batch {failed[-1]} ({reason}): "
                f"again at {micro} × {accumulation * batch // micro} accumulation steps"
            )
        if on_retry:
            on_retry(list(failed), message)


def failure_attrs(e: BaseException) -> dict[str, Any]:
    """User attrs that mark a trial failed by memory (it does not count toward max_failures_in_a_row)."""
    return {OUT_OF_MEMORY: True} if isinstance(e, OutOfMemory) else {}


class PeakMeter:
    """The peak memory since it was made (or :meth:`reset`), above the level then: CUDA max allocated, CPU
    peak RSS. Where ``/proc/self/clear_refs`` cannot be written, the CPU peak is the process's (``ru_maxrss``)."""

    def __init__(self, device: str):
        self.device = device
        self.reset()

    #: Whether the CPU peak counts from the reset (Linux); else it is the process's peak since it started.
    resettable = True

    def reset(self) -> None:
        self.elsewhere = 0.0  # a peak measured in another process: a rank of a multi-process trial
        self.held = 0.0  # what the trial uses but found allocated: the worker's resident base model
        if self.device == "cuda":
            self.base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            return
        trim()
        try:
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        except OSError:  # not Linux, or a sandbox that refuses it
            self.resettable = False
        self.base = (rss_mb() or 0.0) * 2**20

    @property
    def peak_mb(self) -> float:
        peak = torch.cuda.max_memory_allocated() if self.device == "cuda" else _status_kb("VmHWM") * 1024
        return max(self.elsewhere, (peak - self.base) / 2**20 + self.held)

    def hold(self, mb: float) -> None:
        """Count ``mb`` the trial uses that was allocated before it (a resident base, :mod:`hpo.trial.resident`):
        its peak is then what it would be after a load of its own, and trials compare."""
        self.held = mb

    def record(self, peak_mb: float) -> None:
        """Count a peak measured elsewhere (a rank of the trial, in its own process)."""
        self.elsewhere = max(self.elsewhere, peak_mb)


def _status_kb(field: str) -> int:
    try:
        return int(re.search(rf"^{field}:\s+(\d+)", Path("/proc/self/status").read_text(), re.M).group(1))
    except (OSError, AttributeError):
        import resource
        import sys

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak // 1024 if sys.platform == "darwin" else peak  # bytes on macOS, KiB elsewhere


def rss_mb() -> float | None:
    """The process's resident memory now (Linux), unlike ``ru_maxrss``, its peak."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def available_mb() -> float | None:
    """Memory the machine can still give (Linux's MemAvailable), or None where it does not say."""
    try:
        meminfo = Path("/proc/meminfo").read_text()
        return int(next(line.split()[1] for line in meminfo.splitlines() if line.startswith("MemAvailable:"))) / 1024
    except (OSError, StopIteration, ValueError):
        return None


class MemoryCap(TrainerCallback):
    """``resources.max_memory_gb`` on CPU: an out-of-memory error once the trial's peak passes it (checked after
    each optimizer step and evaluation; the peak counts what happened in between). On CUDA the cap is the
    allocator's own (:func:`cap_cuda`)."""

    def __init__(self, meter: PeakMeter, limit_gb: float):
        self.meter, self.limit_gb = meter, limit_gb

    def _check(self, error: type[torch.OutOfMemoryError]) -> None:
        peak_gb = self.meter.peak_mb / 1024
        if peak_gb > self.limit_gb:
            raise error(f"out of memory: peak {peak_gb:.2f} GB over resources.max_memory_gb ({self.limit_gb:g} GB)")

    def on_step_end(self, args, state, control, **kwargs):  # before the step's evaluation, if any
        self._check(TrainOutOfMemory)

    def on_evaluate(self, args, state, control, **kwargs):  # the steps before passed: evaluation went over
        self._check(EvalOutOfMemory)


def cap_cuda(limit_gb: float | None) -> None:
    """Hold this process's CUDA allocations under ``limit_gb`` (``resources.max_memory_gb``)."""
    if limit_gb and torch.cuda.is_available():
        total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, limit_gb * 2**30 / total))


def trim() -> None:
    """Hand the C heap's free pages back to the system (glibc), so that RSS measures what is in use."""
    if _libc is not None:
        _libc.malloc_trim(0)


_libc = None
with contextlib.suppress(OSError, AttributeError, TypeError):
    _libc = ctypes.CDLL(ctypes.util.find_library("c"))
    _libc.malloc_trim  # noqa: B018 - glibc only: musl and macOS have none


def release(result: Any = None) -> None:
    """Drop a trial's model (``result.model``) and give its memory back before the next trial."""
    if result is not None:
        result.model = None
    gc.collect()
    trim()
    if torch.cuda.is_initialized():
        # cuBLAS keeps a workspace per handle (64 MiB on an H200) through the caching allocator: without this,
        # allocated memory never returns to its level before the first trial (benchmarks/cuda_memory.py).
        torch._C._cuda_clearCublasWorkspaces()
        torch.cuda.empty_cache()
