"""A packed trial's side of a pack (:mod:`hpo.trial.pack`): the model its Trainer sees, and the layers that route
each row of a packed pass through its own lane's adapter and head.

peft mixes adapters in one batch (``adapter_names``) but refuses it in training mode, at the model's forward; its
layers' mixed-batch forward walks a ``set`` of names (the order of the dropout draws then depends on
``PYTHONHASHSEED``) and handles a head only when it is one ``Linear`` (not RoBERTa's). A pack's rows are contiguous
per lane, so hpo routes them itself, in lane order, with slices: a LoRA layer adds each lane's ``B(A(dropout(x)))
· scaling`` to its rows of the frozen base's output (what peft's own forward adds), a head runs each lane's copy on
its rows. Only plain LoRA is routed (no DoRA or other variant, no LoRA on embeddings, no trainable tokens).
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ADAPTER = "adapter_model.safetensors"  # peft's file name for an adapter's weights
LANE = "LANE"  # what a lane's name reads as in its parameters' names (LaneView.named_parameters)
#: peft's containers of per-adapter weights: a parameter's adapter is the name right after one of them
CONTAINERS = frozenset(
    {"lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector", "modules_to_save"}
)

Spans = Callable[[], list[tuple[str, int, int]]]  # the pass's rows: (lane, first row, row after its last)


def owner(name: str) -> str | None:
    """The adapter that parameter ``name`` (the PEFT model's) belongs to, or None (the base's)."""
    parts = name.split(".")
    return next((parts[i + 1] for i, part in enumerate(parts[:-1]) if part in CONTAINERS), None)


def route(model: Any, spans: Spans) -> None:
    """Give the PEFT model's LoRA layers and head wrappers the routed forwards (once each).

    Raises:
        ValueError: a layer a pack cannot route (a LoRA variant such as DoRA, LoRA on an embedding, trainable
            tokens): the trial trains alone.
    """
    from peft.tuners.lora import LoraLayer
    from peft.utils.other import AuxiliaryTrainingWrapper, ModulesToSaveWrapper

    for name, module in model.named_modules():
        if "_hpo_routed" in module.__dict__:
            continue
        if isinstance(module, LoraLayer):
            if module.lora_embedding_A or not hasattr(module, "base_layer"):
                raise ValueError(f"a pack trains plain LoRA on linear layers; {name} is {type(module).__name__}")
            module.forward = functools.partial(_lora_forward, module, spans)
        elif isinstance(module, ModulesToSaveWrapper):
            module.forward = functools.partial(_head_forward, module, spans)
        elif isinstance(module, AuxiliaryTrainingWrapper):
            raise ValueError(f"a pack trains LoRA adapters and heads; {name} is {type(module).__name__}")
        else:
            continue
        module.__dict__["_hpo_routed"] = True


def _rows(x: torch.Tensor, spans: list[tuple[str, int, int]], where: str) -> None:
    if spans and x.shape[0] != spans[-1][2]:  # an MoE expert's input is its tokens, not the batch's rows
        raise ValueError(f"a pack needs the batch's rows as the first dimension of {where}'s input")


def _lora_forward(layer: Any, spans: Spans, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    passes = spans()
    _rows(x, passes, type(layer).__name__)
    result = layer.base_layer(x, *args, **kwargs)
    pieces = []  # out of place: the frozen base's output is a leaf when nothing before it trains
    for lane, start, end in passes:
        piece = result[start:end]
        if lane in layer.lora_variant:
            raise ValueError(f"a pack trains plain LoRA; this trial's is {type(layer.lora_variant[lane]).__name__}")
        if lane in layer.lora_A:
            a = layer.lora_A[lane]
            rows = x[start:end].to(a.weight.dtype)
            piece = piece + (layer.lora_B[lane](a(layer.lora_dropout[lane](rows))) * layer.scaling[lane]).to(
                piece.dtype
            )
        pieces.append(piece)
    return torch.cat(pieces) if len(pieces) > 1 else pieces[0]


def _head_forward(wrapper: Any, spans: Spans, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    passes = spans()
    _rows(x, passes, type(wrapper.original_module).__name__)
    return torch.cat([wrapper.modules_to_save[lane](x[start:end], *args, **kwargs) for lane, start, end in passes])


class Originals(torch.nn.Module):
    """The PEFT model's modules less every adapter's copy of a head, each named as in the base (a head wrapper's
    ``original_module`` as the head): what :func:`hpo.knobs.init_heads` initialises for the next adapter."""

    def __init__(self, model: Any):
        super().__init__()
        self.__dict__["model"], self.__dict__["config"] = model, model.config

    def named_modules(self, *args, **kwargs):
        for name, module in self.model.named_modules():
            if "modules_to_save" not in name.split("."):
                yield name.replace(".original_module", ""), module


class LaneView(torch.nn.Module):
    """What a lane's Trainer sees as its model: the shared PEFT model's forward, its lane's parameters only (so that
    its optimizer, clipping, ``zero_grad`` and saved state are the lane's), and the model's config."""

    main_input_name = "input_ids"

    def __init__(self, pack: Any, name: str):  # a hpo.trial.pack.Pack (which imports this module)
        super().__init__()
        self.__dict__["pack"] = pack  # not a submodule: its parameters are every lane's
        self.name = name
        self.config = pack.model.config

    def _get_name(self) -> str:
        return self.pack.model.get_base_model()._get_name()  # the Trainer shifts a causal LM's smoothed labels by it

    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):
        """The lane's parameters, named as peft names them with the lane's name as ``LANE`` (what the lane's
        optimizer state and best weights are keyed by, whatever the lane's name)."""
        for n, p in self.pack.model.named_parameters():
            if (mine := self.mine(n)) is not None:
                yield prefix + mine, p

    def mine(self, name: str) -> str | None:
        """``name`` (the PEFT model's) as this lane names it, or None when it is not the lane's."""
        if owner(name) != self.name:
            return None
        parts = name.split(".")
        at = next(i for i, part in enumerate(parts[:-1]) if part in CONTAINERS) + 1
        return ".".join([*parts[:at], LANE, *parts[at + 1 :]])

    def state_dict(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        return dict(self.named_parameters())

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        mine = dict(self.named_parameters())
        missing, unexpected = sorted(mine.keys() - state_dict.keys()), sorted(state_dict.keys() - mine.keys())
        if strict and (missing or unexpected):
            raise KeyError(f"not this lane's parameters: {(missing + unexpected)[:5]}")
        with torch.no_grad():
            for k in mine.keys() & state_dict.keys():
                mine[k].copy_(state_dict[k])
        return torch.nn.modules.module._IncompatibleKeys(missing, unexpected)

    def save(self, folder: str) -> None:
        """Write the lane's adapter as a trial of its own writes it (peft's ``adapter_model.safetensors`` and
        ``adapter_config.json``): its checkpoints resume in a pack or alone."""
        from peft.utils import get_peft_model_state_dict
        from safetensors.torch import save_file

        state = get_peft_model_state_dict(self.pack.model, adapter_name=self.name)
        Path(folder).mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in state.items()}, f"{folder}/{ADAPTER}", metadata={"format": "pt"})
        config = copy.copy(self.pack.model.peft_config[self.name])  # as peft's save_pretrained writes it:
        config.base_model_name_or_path = config.base_model_name_or_path or self.pack.model.get_base_model().name_or_path
        config.inference_mode = True  # the base it loads over, and an adapter that loads for inference
        config.save_pretrained(folder)

    def save_pretrained(self, folder, **kwargs) -> None:
        self.save(str(folder))  # the best model staged (hpo.trial.finetune.save_model): the adapter, as alone

    def load(self, folder: str) -> None:
        """Load the adapter :meth:`save` (or a trial of its own) wrote in ``folder`` as this lane's."""
        from peft.utils import set_peft_model_state_dict
        from safetensors.torch import load_file

        set_peft_model_state_dict(self.pack.model, load_file(f"{folder}/{ADAPTER}"), adapter_name=self.name)

    def forward(self, **inputs):
        if self.training and torch.is_grad_enabled():
            return self.pack.forward(self.name, inputs)
        return self.pack.alone(self.name, inputs)

    def floating_point_ops(self, inputs) -> int:
        return self.pack.model.floating_point_ops(inputs)

    def gradient_checkpointing_enable(self, **kwargs) -> None:
        self.pack.model.gradient_checkpointing_enable(**kwargs)  # one setting for every lane (it groups packs)

    def view(self, trainer) -> None:
        """Make ``trainer``, built over the PEFT model (so that what it reads from the model's class is the model's),
        see this lane: its model and what its callbacks see (an evaluation's Trainer needs no more)."""
        trainer._set_signature_columns_if_needed()  # the model's inputs, which the Trainer keeps of each row
        trainer.model = trainer.model_wrapped = trainer.callback_handler.model = self

    def attach(self, trainer) -> None:
        """Make ``trainer`` (as :meth:`view`) train this lane: its backward joins the pass's (scaled as accelerate's
        ``backward`` scales it)."""
        self.view(trainer)
        accelerator = trainer.accelerator

        def backward(loss, **kwargs):
            loss = loss / accelerator.gradient_accumulation_steps
            self.pack.backward(self.name, accelerator.scaler.scale(loss) if accelerator.scaler is not None else loss)

        accelerator.backward = backward
