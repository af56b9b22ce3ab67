"""Packed LoRA trials: several trials train at once over one resident base, in one forward and backward pass.

A LoRA trial's compute is mostly the frozen base, which every trial of a study shares. A pack runs K trials as K
lanes: each lane is the trial's own ``transformers.Trainer`` (its sampler, optimizer, schedule, clipping,
accumulation, evaluations and callbacks, all unchanged), over a :class:`LaneView` of one PEFT model that holds every
lane's adapters. When each lane asks for a training forward, their micro-batches are concatenated, the base computes
once for all rows, and each row passes through its own lane's adapters and head only; each lane's loss is computed
from its own rows as its model would compute it, and one backward gives each lane's adapters exactly its own
gradients (the lanes share no trainable parameter).

peft mixes adapters in one batch (``adapter_names``) but refuses it in training mode (``Cannot pass adapter_names
when the model is in training mode``), at the model's forward: its layers' mixed-batch forward is plain autograd, so
hpo sets ``adapter_names`` on them with its own forward pre-hooks, in training and evaluation alike.

The lanes are threads that take turns (one baton): a lane runs until it waits for the packed forward or backward,
then the next one runs; when every lane waits, the first of them runs the packed pass. One lane at a time keeps the
shared model's mode and the Trainer's global state sane, and each lane keeps its own random state across its turns
(torch's, CUDA's, Python's, NumPy's), so that its data order is the one it would draw alone. An evaluation runs in
its lane's turn, over its rows alone.
"""

from __future__ import annotations

import contextlib
import copy
import random
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate.state import GradientState
from transformers.loss.loss_utils import ForCausalLMLoss, ForSequenceClassificationLoss, ForTokenClassification
from transformers.modeling_outputs import ModelOutput

from hpo.trial.tokens import IGNORE
from hpo.trial.workbench import quiet

_here = threading.local()  # the lane this thread runs, if any: (pack, name)

ADAPTER = "adapter_model.safetensors"  # peft's file name for an adapter's weights
LANE = "LANE"  # what a lane's name reads as in its parameters' names (LaneView.named_parameters)
#: Keys of a micro-batch that are per row and per token, and what pads them (the pad token id for input ids).
PADS = {"attention_mask": 0, "labels": IGNORE, "token_type_ids": 0, "special_tokens_mask": 1}


def current() -> tuple[Pack, str] | None:
    """The pack and lane name this thread trains as, or None (a trial of its own)."""
    return getattr(_here, "lane", None)


class Pack:
    """Lanes over one PEFT model: the baton they pass, the packed forward and backward."""

    def __init__(self, task: str, pad_token_id: int | None):
        self.task, self.pad_token_id = task, pad_token_id if pad_token_id is not None else 0
        self.model: Any = None  # the PeftModel over the resident base, with every lane's adapter
        self.rows: list[str] = []  # the lane of each row of the forward in progress (the pre-hooks read it)
        self._rows: list[str] = []  # the last packed pass's
        self.passes = 0  # packed forwards run (a test and the benchmark read them)
        self._cv = threading.Condition()
        self._order: list[str] = []  # lanes in the order they joined: the baton goes round in it
        self._state: dict[str, str] = {}  # "running" (holds the baton), "ready", "forward" or "backward"
        self._holder: str | None = None
        self._duty: str | None = None  # the packed pass the holder is woken to run
        self._waiting: dict[str, Any] = {}  # a lane's micro-batch (forward) or loss (backward)
        self._done: dict[str, Any] = {}  # a lane's output of the pass, or the exception it raised
        # each lane's own state between its turns (random generators, accelerate's gradient state); "": the pack's
        self._own: dict[str, tuple] = {"": _own_state()}
        self._fresh = self._own[""]  # a lane's first turn starts from it
        self._hooked: set[int] = set()

    # -- a lane's life ---------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def lane(self, name: str) -> Iterator[None]:
        """This thread trains as lane ``name`` within the block: it waits for its first turn, and leaves the pack
        (its adapter deleted) at the end, however the block ends."""
        with self._cv:
            self._order.append(name)
            self._state[name] = "ready"
            if self._holder is None:
                self._holder = name
            self._cv.wait_for(lambda: self._holder == name)
            self._state[name] = "running"
            _set_own_state(self._fresh)
        _here.lane = (self, name)
        try:
            yield
        finally:
            _here.lane = None
            with self._cv:
                try:
                    self._drop(name)
                finally:
                    self._order.remove(name)
                    del self._state[name]
                    self._own.pop(name, None)
                    self._hand_on(name)

    def _drop(self, name: str) -> None:
        """Delete lane ``name``'s adapter; the last adapter's lane leaves the PEFT model to the resident base, whose
        next ``take`` unloads it."""
        if self.model is None:
            return
        others = [n for n in self.model.peft_config if n != name]  # lanes that joined may have none yet
        if others:
            if name in self.model.active_adapters:  # peft keeps one adapter active: another lane's
                self.model.set_adapter(others[0])
            self.model.delete_adapter(name)
            self._trainable()
        else:
            self.model, self._hooked = None, set()

    def _block(self, name: str, state: str, waiting: Any) -> Any:
        """Give up the baton until the packed pass this lane waits for (``state``) has run; its output."""
        with self._cv:
            self._waiting[name] = waiting
            self._state[name] = state
            self._own[name] = _own_state()
            self._hand_on(name)
            self._cv.wait_for(lambda: self._holder == name)
            if self._duty is not None:  # this lane is first in the pass: it runs it for all, then goes on
                duty, self._duty = self._duty, None
                self._run(duty)
            self._state[name] = "running"
            _set_own_state(self._own[name])
            done = self._done.pop(name)
        if isinstance(done, BaseException):
            raise done
        return done

    def _hand_on(self, name: str) -> None:
        """Pass the baton from ``name`` to the next ready lane; when every lane waits, to the first lane of the
        pass to run (backwards first: a new lane's forward waits for the pass in flight to finish)."""
        start = self._order.index(name) + 1 if name in self._order else 0
        turn = self._order[start:] + self._order[:start]
        ready = [n for n in turn if self._state[n] == "ready"]
        if ready:
            self._holder = ready[0]
        else:
            duty = "backward" if any(self._state[n] == "backward" for n in turn) else "forward"
            first = [n for n in self._order if self._state[n] == duty]
            self._holder, self._duty = (first[0], duty) if first else (None, None)
        self._cv.notify_all()

    def _run(self, duty: str) -> None:
        lanes = [n for n in self._order if self._state[n] == duty]
        batches = {n: self._waiting.pop(n) for n in lanes}
        _set_own_state(self._own[""])  # the pass's own random state (dropout): no lane's
        try:
            if duty == "backward":
                self.rows = self._rows  # gradient checkpointing runs the forward again: the pass's rows
                torch.autograd.backward(list(batches.values()))
                self._done.update(dict.fromkeys(lanes))
            else:
                self._done.update(self._forward(batches))
        except Exception as e:  # noqa: BLE001 - each lane of the pass raises it in its own thread
            self._done.update(dict.fromkeys(lanes, e))
        finally:
            self._own[""] = _own_state()
        for n in lanes:
            self._state[n] = "ready"

    # -- the packed passes ----------------------------------------------------------------------------------------

    def forward(self, name: str, inputs: dict[str, Any]) -> ModelOutput:
        """Lane ``name``'s training forward of ``inputs``, in the next packed pass."""
        return self._block(name, "forward", inputs)

    def backward(self, name: str, loss: torch.Tensor) -> None:
        """Lane ``name``'s backward of ``loss`` (scaled as its Trainer would), in one backward with the pass's."""
        self._block(name, "backward", loss)

    def alone(self, name: str, inputs: dict[str, Any]) -> Any:
        """Lane ``name``'s forward of ``inputs`` over its adapter only (an evaluation, in its turn)."""
        self.rows = [name] * len(next(iter(v for v in inputs.values() if torch.is_tensor(v))))
        return self.model(**inputs)

    def _forward(self, batches: dict[str, dict[str, Any]]) -> dict[str, ModelOutput]:
        """Concatenate the lanes' micro-batches (padded on the right to the longest), run the model once, and give
        each lane its rows' logits and its loss."""
        items = {n: b.pop("num_items_in_batch", None) for n, b in batches.items()}
        labels = {n: b.pop("labels", None) for n, b in batches.items()}
        keys = set(next(iter(batches.values())))
        if any(set(b) != keys for b in batches.values()):
            raise ValueError(f"the pack's micro-batches differ in their keys: {[sorted(b) for b in batches.values()]}")
        length = max(b["input_ids"].shape[1] for b in batches.values())
        joined = {k: torch.cat([self._padded(k, b[k], length) for b in batches.values()]) for k in keys}
        sizes = {n: len(b["input_ids"]) for n, b in batches.items()}
        self.rows = self._rows = [n for n, size in sizes.items() for _ in range(size)]
        self.passes += 1
        logits = self.model(**joined).logits
        out, start = {}, 0
        for n, size in sizes.items():
            mine = logits[start : start + size]
            start += size
            if mine.dim() == 3:
                mine = mine[:, : batches[n]["input_ids"].shape[1]].contiguous()
            loss = None if labels[n] is None else self._loss(mine, labels[n], items[n])
            out[n] = ModelOutput(loss=loss, logits=mine)
        return out

    def _padded(self, key: str, tensor: torch.Tensor, length: int) -> torch.Tensor:
        if tensor.dim() < 2 or tensor.shape[1] == length:
            return tensor
        value = self.pad_token_id if key == "input_ids" else PADS.get(key, 0)
        return torch.nn.functional.pad(tensor, (0, length - tensor.shape[1]), value=value)

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor, items: Any) -> torch.Tensor:
        """The loss the model computes for these rows alone (transformers' own loss functions: a causal LM's over
        the accumulated batch's tokens, when the Trainer counts them; a classifier's is a mean)."""
        config = self.model.config
        if self.task == "causal-lm":
            return ForCausalLMLoss(logits, labels, config.vocab_size, num_items_in_batch=items)
        if self.task == "token-classification":
            return ForTokenClassification(logits, labels, config)
        return ForSequenceClassificationLoss(labels, logits, config)

    # -- the lanes' adapters ---------------------------------------------------------------------------------------

    def add(self, name: str, base: Any, config: Any, init_heads: Callable[[Any], None]) -> LaneView:
        """Lane ``name``'s adapter (peft ``config``) over ``base`` (the resident model), its new heads drawn first
        by ``init_heads`` (given the modules to initialise), as a trial of its own draws them: the view it trains."""
        from peft import get_peft_model

        if self.model is None:
            init_heads(base)
            self.model = get_peft_model(base, config, adapter_name=name)
        else:
            init_heads(_Originals(self.model))  # the head each adapter's copy is taken from
            self.model.add_adapter(name, config)
        self._trainable(name)
        self._hook()
        return LaneView(self, name)

    def _trainable(self, joining: str | None = None) -> None:
        """Every lane's adapter trains: peft makes only its active adapter trainable (on adding, and on setting)."""
        lanes = {*self._order, joining}
        for param_name, p in self.model.named_parameters():
            if lanes & set(param_name.split(".")):
                p.requires_grad_(True)

    def _hook(self) -> None:
        from peft.tuners.lora import LoraLayer
        from peft.utils.other import AuxiliaryTrainingWrapper

        for module in self.model.modules():
            if isinstance(module, (LoraLayer, AuxiliaryTrainingWrapper)) and id(module) not in self._hooked:
                module.register_forward_pre_hook(self._rows_hook, with_kwargs=True)
                self._hooked.add(id(module))

    def _rows_hook(self, module, args, kwargs):
        return args, {**kwargs, "adapter_names": self.rows}


class _Originals(torch.nn.Module):
    """The PEFT model's modules less every adapter's copy of a head (``modules_to_save``): what
    :func:`hpo.knobs.init_heads` initialises for the next adapter."""

    def __init__(self, model: Any):
        super().__init__()
        self.__dict__["model"], self.__dict__["config"] = model, model.config

    def named_modules(self, *args, **kwargs):
        for name, module in self.model.named_modules():
            if "modules_to_save" not in name.split("."):
                yield name, module


class LaneView(torch.nn.Module):
    """What a lane's Trainer sees as its model: the shared PEFT model's forward, its lane's parameters only (so that
    its optimizer, clipping, ``zero_grad`` and saved state are the lane's), and the model's config."""

    main_input_name = "input_ids"

    def __init__(self, pack: Pack, name: str):
        super().__init__()
        self.__dict__["pack"] = pack  # not a submodule: its parameters are every lane's
        self.name = name
        self.config = pack.model.config

    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):
        """The lane's parameters, named as peft names them with the lane's name as ``LANE`` (what the lane's
        optimizer state and best weights are keyed by, whatever the lane's name)."""
        for n, p in self.pack.model.named_parameters():
            if (mine := self.mine(n)) is not None:
                yield prefix + mine, p

    def mine(self, name: str) -> str | None:
        """``name`` (the PEFT model's) as this lane names it, or None when it is not the lane's."""
        parts = name.split(".")
        return ".".join(LANE if part == self.name else part for part in parts) if self.name in parts else None

    def state_dict(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        return dict(self.named_parameters())

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        mine = dict(self.named_parameters())
        if strict and state_dict.keys() != mine.keys():
            raise KeyError(f"not this lane's parameters: {sorted(state_dict.keys() ^ mine.keys())[:5]}")
        with torch.no_grad():
            for k, v in state_dict.items():
                mine[k].copy_(v)
        return torch.nn.modules.module._IncompatibleKeys([], [])

    def save(self, folder: str) -> None:
        """Write the lane's adapter as a trial of its own writes it (peft's ``adapter_model.safetensors`` and
        ``adapter_config.json``): its checkpoints resume in a pack or alone."""
        from peft.utils import get_peft_model_state_dict
        from safetensors.torch import save_file

        state = get_peft_model_state_dict(self.pack.model, adapter_name=self.name)
        Path(folder).mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in state.items()}, f"{folder}/{ADAPTER}", metadata={"format": "pt"})
        self.pack.model.peft_config[self.name].save_pretrained(folder)

    def load(self, folder: str) -> None:
        """Load the adapter :meth:`save` (or a trial of its own) wrote in ``folder`` as this lane's."""
        from peft.utils import set_peft_model_state_dict
        from safetensors.torch import load_file

        set_peft_model_state_dict(self.pack.model, load_file(f"{folder}/{ADAPTER}"), adapter_name=self.name)

    def forward(self, **inputs):
        self.pack.model.train(self.training)
        if self.training and torch.is_grad_enabled():
            return self.pack.forward(self.name, inputs)
        return self.pack.alone(self.name, inputs)

    def floating_point_ops(self, inputs) -> int:
        return self.pack.model.floating_point_ops(inputs)

    def gradient_checkpointing_enable(self, **kwargs) -> None:
        self.pack.model.gradient_checkpointing_enable(**kwargs)  # one setting for every lane (it groups packs)

    def attach(self, trainer) -> None:
        """Make ``trainer``, built over the PEFT model (so that what it reads from the model's class is the model's),
        train this lane: its model and what its callbacks see become this view, and its backward joins the pass's
        (scaled as accelerate's ``backward`` scales it)."""
        trainer._set_signature_columns_if_needed()  # the model's inputs, which the Trainer keeps of each row
        trainer.model = trainer.model_wrapped = trainer.callback_handler.model = self
        accelerator = trainer.accelerator

        def backward(loss, **kwargs):
            loss = loss / accelerator.gradient_accumulation_steps
            self.pack.backward(self.name, accelerator.scaler.scale(loss) if accelerator.scaler is not None else loss)

        accelerator.backward = backward


def _own_state() -> tuple:
    """What a lane keeps to itself between its turns: the random generators, and accelerate's gradient state (one
    per process: a lane that accumulates sets ``sync_gradients`` off, and another's optimizer would skip its step)."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    gradients = {k: copy.copy(v) for k, v in GradientState._shared_state.items()}
    return torch.get_rng_state(), cuda, random.getstate(), np.random.get_state(), gradients


def _set_own_state(state: tuple) -> None:
    cpu, cuda, python, numpy, gradients = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)
    random.setstate(python)
    np.random.set_state(numpy)
    GradientState._shared_state.clear()
    GradientState._shared_state.update({k: copy.copy(v) for k, v in gradients.items()})


def run(pack: Pack, members: list[tuple[str, Callable[[], Any]]], size: int | None = None) -> dict[str, Any]:
    """Run each member (a lane name and what its lane runs: a trial) as a lane of ``pack``, ``size`` at a time (all,
    by default): when one ends, the next member takes its place. What each returned, or the exception it raised."""
    results: dict[str, Any] = {}
    pending = list(members)
    lock = threading.Lock()

    def slot() -> None:
        while True:
            with lock:
                if not pending:
                    return
                name, work = pending.pop(0)
            try:
                with pack.lane(name):
                    results[name] = work()
            except BaseException as e:  # noqa: BLE001 - the caller reads each member's outcome
                results[name] = e

    threads = [threading.Thread(target=slot, name=f"pack-slot-{i}") for i in range(size or len(members))]
    with quiet():  # the lanes' own quiet() blocks interleave: this one puts the caller's settings back after them
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    return results
