"""Packed LoRA trials: several trials train at once over one resident base, in one forward and backward pass.

A LoRA trial's compute is mostly the frozen base, which every trial of a study shares. A pack runs K trials as K
lanes: each lane is the trial's own ``transformers.Trainer`` (its sampler, optimizer, schedule, clipping,
accumulation, evaluations and callbacks, all unchanged), over a :class:`LaneView` of one PEFT model that holds every
lane's adapters. When each lane asks for a training forward, their micro-batches are concatenated, the base computes
once for all rows, and each row passes through its own lane's adapters and head only; each lane's loss is computed
from its own rows as its model would compute it, and one backward gives each lane's adapters exactly its own
gradients (the lanes share no trainable parameter).

Rows reach their lane's adapter and head through :mod:`hpo.trial.lanes`, which also holds the lane's view of the
model.

The lanes are threads that take turns (one baton): a lane runs until it waits for the packed forward or backward,
then the next one runs; when every lane waits, the first of them runs the packed pass. One lane at a time keeps the
shared model's mode and the Trainer's global state sane, and each lane keeps its own random state across its turns
(torch's, CUDA's, Python's, NumPy's), so that its data order is the one it would draw alone. An evaluation runs in
its lane's turn, over its rows alone.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import random
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from accelerate.state import GradientState
from transformers.loss.loss_utils import ForCausalLMLoss, ForSequenceClassificationLoss, ForTokenClassification
from transformers.modeling_outputs import ModelOutput

from hpo.config.sections import MAX_PACK
from hpo.trial.lanes import LaneView, Originals, owner, route
from hpo.trial.memory import PackOutOfMemory, is_out_of_memory
from hpo.trial.tokens import IGNORE
from hpo.trial.workbench import quiet

_here = threading.local()  # the lane this thread runs, if any: (pack, name)

#: Keys of a micro-batch that are per row and per token, and what pads them (the pad token id for input ids).
PADS = {"attention_mask": 0, "labels": IGNORE, "token_type_ids": 0, "special_tokens_mask": 1}


def current() -> tuple[Pack, str] | None:
    """The pack and lane (its adapter's name) this thread trains as, or None (a trial of its own)."""
    return getattr(_here, "lane", None)


class Pack:
    """Lanes over one PEFT model: the baton they pass, the packed forward and backward."""

    def __init__(self, task: str, pad_token_id: int | None):
        self.task, self.pad_token_id = task, pad_token_id if pad_token_id is not None else 0
        self.model: Any = None  # the PeftModel over the resident base, with every lane's adapter
        self.spans: list[tuple[str, int, int]] = []  # the forward in progress: each lane's rows (the layers read it)
        self._spans: list[tuple[str, int, int]] = []  # the last packed pass's
        self.passes = 0  # packed forwards run (a test and the benchmark read them)
        self.limit = MAX_PACK  # the most lanes with an adapter at once: lowered when a packed pass ran out of memory
        self._cv = threading.Condition()
        self._count = itertools.count()
        self._order: list[str] = []  # lanes in the order they joined: the baton goes round in it
        # "running" (holds the baton), "ready", "forward" or "backward", "parked" (waits for room, :meth:`clear`)
        self._state: dict[str, str] = {}
        self._holder: str | None = None
        self._duty: str | None = None  # the packed pass the holder is woken to run
        self._waiting: dict[str, Any] = {}  # a lane's micro-batch (forward) or loss (backward)
        self._done: dict[str, Any] = {}  # a lane's output of the pass, or the exception it raised
        # each lane's own state between its turns (random generators, accelerate's gradient state); "": the pack's
        self._own: dict[str, tuple] = {"": _own_state()}
        self._fresh = self._own[""]  # a lane's first turn starts from it

    # -- a lane's life ---------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def lane(self) -> Iterator[None]:
        """This thread trains as a lane of the pack within the block: it waits for its first turn, and leaves the
        pack (its adapter deleted) at the end, however the block ends."""
        # The lane's adapter is named by the pack: peft matches adapter names as substrings of parameter names, and
        # one called "query" made BERT's query weights trainable. No name below is part of another.
        name = f"hpo-lane-{next(self._count)}-"
        with self._cv:
            self._order.append(name)
            self._state[name] = "ready"
            if self._holder is None:
                self._holder = name
            self._cv.wait_for(lambda: self._holder == name)
            self._state[name] = "running"
        try:
            _set_own_state(self._fresh)
            self._room(name)  # a pack that ran out of memory holds fewer: the others wait before their trial starts
            _here.lane = (self, name)
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

    def _drop(self, name: str, unload: bool = False) -> None:
        """Delete lane ``name``'s adapter. The last adapter's lane leaves the PEFT model to the resident base, whose
        next ``take`` unloads it (``unload``: now, the base bare again)."""
        if self.model is None or name not in self.model.peft_config:
            return
        others = [n for n in self.model.peft_config if n != name]  # lanes that joined may have none yet
        if others:
            if name in self.model.active_adapters:  # peft keeps one adapter active: another lane's
                self.model.set_adapter(others[0])
            self.model.delete_adapter(name)
            self._trainable()
        else:
            if unload:
                self.model.unload()
            self.model = None

    def _block(self, name: str, state: str, waiting: Any) -> Any:
        """Give up the baton until the packed pass this lane waits for (``state``) has run; its output."""
        with self._cv:
            self._waiting[name] = waiting
            self._wait(name, state)
            done = self._done.pop(name)
        if isinstance(done, BaseException):
            raise done
        return done

    def _wait(self, name: str, state: str) -> None:
        """Hand the baton on as ``state`` and wait for it again (running the pass it is woken for, if any)."""
        self._state[name] = state
        self._own[name] = _own_state()
        self._hand_on(name)
        self._cv.wait_for(lambda: self._holder == name)
        try:
            if self._duty is not None:  # this lane is first in the pass: it runs it for all, then goes on
                duty, self._duty = self._duty, None
                self._run(duty)
        finally:
            self._state[name] = "running"
            _set_own_state(self._own[name])

    def clear(self, name: str) -> None:
        """Make way for lane ``name``'s new adapter (a trial, or its retry at a smaller batch, another seed): its
        adapter of before deleted (the last one: the base bare again), then wait for room in the pack."""
        self._drop(name, unload=True)
        self._room(name)

    def _room(self, name: str) -> None:
        """Wait, parked, until fewer than :attr:`limit` other lanes have an adapter."""
        with self._cv:
            while self.model is not None and len(set(self.model.peft_config) - {name}) >= self.limit:
                self._wait(name, "parked")

    def _hand_on(self, name: str) -> None:
        """Pass the baton from ``name`` to the next ready lane; when every lane waits, to the first lane of the
        pass to run (backwards first: a new lane's forward waits for the pass in flight to finish)."""
        start = self._order.index(name) + 1 if name in self._order else 0
        turn = self._order[start:] + self._order[:start]
        room = self.model is None or len(self.model.peft_config) < self.limit  # a parked lane looks again
        ready = [n for n in turn if self._state[n] == "ready" or (room and self._state[n] == "parked")]
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
            self.model.train()  # a lane's last evaluation may have left it in eval mode
            if duty == "backward":
                self.spans = self._spans  # gradient checkpointing runs the forward again: the pass's rows
                torch.autograd.backward(list(batches.values()))
                self._done.update(dict.fromkeys(lanes))
            else:
                self._done.update(self._forward(batches))
        except BaseException as e:  # noqa: BLE001 - each lane of the pass raises it in its own thread
            held = len(self.model.peft_config) if self.model is not None else len(lanes)  # every lane's state
            if len(lanes) > 1 and is_out_of_memory(e):  # fewer lanes at once before any trial's smaller micro-batch
                self.limit = max(1, min(self.limit, held) - 1)
                why = f"a pack of {held} ran out of memory, now at most {self.limit} at once"
                self._done.update({n: PackOutOfMemory(why) for n in lanes})
            else:
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
        self.spans = [(name, 0, len(next(iter(v for v in inputs.values() if torch.is_tensor(v)))))]
        self.model.train(False)
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
        ends = list(itertools.accumulate(sizes.values()))
        self.spans = self._spans = [(n, end - size, end) for (n, size), end in zip(sizes.items(), ends, strict=True)]
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
            init_heads(Originals(self.model))  # the head each adapter's copy is taken from
            self.model.add_adapter(name, config)
        self._trainable(name)
        route(self.model, lambda: self.spans)
        return LaneView(self, name)

    def _trainable(self, joining: str | None = None) -> None:
        """Every lane's adapter trains: peft makes only its active adapter trainable (on adding, and on setting)."""
        lanes = {*self._order, joining} - {None}  # (the base's own parameters' owner is None)
        for param_name, p in self.model.named_parameters():
            if owner(param_name) in lanes:
                p.requires_grad_(True)


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
    """Run each member (a name and what its lane runs: a trial) as a lane of ``pack``, ``size`` at a time (all, by
    default): when one ends, the next member takes its place. What each returned, or raised, by name."""
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
                with pack.lane():
                    results[name] = work()
            except BaseException as e:  # noqa: BLE001 - the caller reads each member's outcome
                results[name] = e

    slots(size or len(members), slot)
    return results


def slots(k: int, slot: Callable[[], None]) -> None:
    """Run ``slot`` on ``k`` threads, each taking its members' lanes in turn, and wait for them all.

    The lanes' own ``quiet()`` blocks interleave: one around them all puts the caller's settings back after them.
    A signal's handler runs on this thread while it waits (the lanes stop at their safe points); what it raises
    ends the wait at once, and the threads are daemons: a second Ctrl-C does not wait for them either.
    """
    threads = [threading.Thread(target=slot, name=f"pack-slot-{i}", daemon=True) for i in range(k)]
    with quiet():
        for t in threads:
            t.start()
        for t in threads:
            while t.is_alive():
                t.join(timeout=0.5)
