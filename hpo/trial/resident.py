"""The model a worker keeps between its trials: loaded (and quantized) once, not once per trial.

Loading is most of a LoRA trial's start: ``from_pretrained`` reads (and for QLoRA quantizes) billions of frozen weights
that every trial of the study shares. A worker keeps them:

- a **LoRA** trial wraps the resident base in fresh adapters; before the next trial peft's ``unload()`` (no merge)
  puts back the very modules it wrapped, which the trial never changed: the base is frozen, and the classifier head
  trained as ``modules_to_save`` is peft's copy, not the base's;
- a **full fine-tune** trains the resident model itself: its weights as loaded are kept in memory (on the CPU,
  pinned where CUDA) and copied back into it before the next trial, instead of reading the files again.

Either way a trial sees what a fresh load gives it: the same weights, and heads and adapters drawn from its own seed
after the load (:func:`hpo.trial.model.build_model` seeds again there, on both paths). What the model is built with
(its dropout, quantization, gradient checkpointing, for a model built from a config its seed) is the key: a trial
with another key loads afresh and becomes the resident one. Sharded or compiled trials (DeepSpeed, FSDP,
``torch_compile``) wrap the model in ways that do not come undone: they load afresh every time.
"""

from __future__ import annotations

import gc
import json
from collections.abc import Callable
from typing import Any

import torch

from hpo.space import MODEL_SETTINGS, NOT_RESIDENT
from hpo.trial.plan import TrialPlan

Loaded = tuple[Any, dict[str, Any]]  # the model and its load report (hpo.trial.model.build_model)


def key(plan: TrialPlan, from_config: bool) -> str | None:
    """What a base model is built with, as a string (None: this trial loads its own, never kept)."""
    settings = plan.training_arguments
    if any(settings.get(k) for k in NOT_RESIDENT):
        return None
    return json.dumps(
        {
            "lora": plan.lora is not None,
            "model_params": plan.model_params,
            "quantization": plan.quantization,
            **{k: settings.get(k) for k in MODEL_SETTINGS},
            "seed": settings.get("seed") if from_config else None,  # random init: the seed is the weights
        },
        sort_keys=True,
        default=str,
    )


class Resident:
    """One worker's resident model: :meth:`take` gives a trial the base it would load, restored to as loaded."""

    def __init__(self) -> None:
        self.key: str | None = None
        self.loaded: Loaded | None = None
        self.lent: Any = None  # the trial's PEFT model over the base, until the next take
        self.initial: dict[str, torch.Tensor] | None = None  # a full fine-tune's weights as loaded
        self.loads = 0  # how many times a base was loaded (a test and the benchmark read it)
        self.reused = False  # whether the last take found the base resident
        self.dropped: dict[str, float] = {}  # MiB per device of the base the last take let go of for another

    def take(self, key: str | None, load: Callable[[], Loaded], trains_all: bool) -> Loaded:
        """The base model for a trial built with ``key``, and its load report: the resident one restored, or
        ``load()``'s, kept for the next trial when ``key`` is not None. ``trains_all``: a full fine-tune, whose
        weights are kept as loaded to be copied back."""
        self.reused = key is not None and key == self.key
        self.dropped = {}
        if self.reused:
            self._restore()
            return self.loaded
        if self.loaded is not None:
            self.dropped = sizes_mb(self.loaded[0])
        self.forget()
        self.loads += 1
        model, report = load()
        if key is not None:
            self.key, self.loaded = key, (model, report)
            if trains_all:
                pin = torch.cuda.is_available()
                self.initial = {k: _copy(v, pin) for k, v in model.state_dict().items()}
        return model, report

    def held_mb(self, device: str) -> float:
        """What a trial's peak on ``device`` leaves out that it would count after a load of its own, in MiB: the
        base it found resident (allocated before it), or the one it let go of (counted in its starting level).

        On CUDA the trial's peak is what it allocated. On the CPU it is RSS, and resident weights, memory-mapped
        from their files, may or may not be counted in it (a 100 MB BERT's second LoRA trial peaked 27 MB above
        its start in one run, 129 MB in another): counting them always errs on the side of memory a trial may
        need, never below it.
        """
        if not self.reused:
            return self.dropped.get(device, 0.0)
        kept = sum(t.numel() * t.element_size() for t in (self.initial or {}).values()) / 2**20  # on the CPU
        return sizes_mb(self.loaded[0]).get(device, 0.0) + (kept if device == "cpu" else 0.0)

    def lend(self, peft_model: Any) -> None:
        """``peft_model`` wraps the resident base for one trial: it is unloaded before the next."""
        if self.key is not None:
            self.lent = peft_model

    def forget(self) -> None:
        """Let go of the base as it is, unrestored (a failed wrap, or another key): its memory goes back at the
        caller's next ``release``."""
        self.key = self.loaded = self.initial = self.lent = None
        gc.collect()

    def _restore(self) -> None:
        if self.lent is not None:
            self.lent.unload()  # the wrapped modules back in place, the adapters gone (peft: no merge)
            self.lent = None
        if self.initial is not None:
            self.loaded[0].load_state_dict(self.initial)


def sizes_mb(model: Any) -> dict[str, float]:
    """The model's own weights and buffers (not a trial's adapters), MiB per device type."""
    sizes: dict[str, float] = {}
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if not _adapter(name):
            sizes[t.device.type] = sizes.get(t.device.type, 0.0) + t.numel() * t.element_size() / 2**20
    return sizes


def _adapter(name: str) -> bool:
    return "lora_" in name or "modules_to_save" in name


def _copy(tensor: torch.Tensor, pin: bool) -> torch.Tensor:
    copy = tensor.detach().to("cpu", copy=True)
    return copy.pin_memory() if pin else copy  # pinned: copied back to the GPU without a staging buffer
