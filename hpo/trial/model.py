"""A trial's model: built from the checkpoint (or a config) with its new heads and dropout, quantized, wrapped
in LoRA adapters; the precision it trains in on this device, and the collator that pads its batches."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Mapping
from typing import Any

import torch
import transformers
from transformers import DataCollatorForSeq2Seq

from hpo import knobs
from hpo.tasks import TASKS, Task
from hpo.trial import pack, resident
from hpo.trial.plan import TrialPlan
from hpo.trial.tokens import IGNORE
from hpo.trial.workbench import Workbench

#: Config fields that the searchable ``dropout`` sets, across architectures.
DROPOUT_FIELDS = (
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "classifier_dropout",  # BERT family
    "dropout",
    "attention_dropout",  # DistilBERT, BART, Llama
    "resid_pdrop",
    "embd_pdrop",
    "attn_pdrop",  # GPT-2
    "hidden_dropout",
    "activation_dropout",
)


def device_settings(settings: Mapping[str, Any] = {}) -> dict[str, Any]:
    """TrainingArguments for the best precision here: CUDA bf16, else CUDA fp16, else CPU fp32."""
    cuda = torch.cuda.is_available()
    return precision(settings, cuda, cuda and torch.cuda.is_bf16_supported())


def precision(settings: Mapping[str, Any], cuda: bool, bf16_supported: bool) -> dict[str, Any]:
    """hpo's precision defaults on a device, given the study's own ``settings``.

    A study file that chose a precision (``fp16`` or ``bf16``, even false) keeps its choice: adding hpo's
    would set both, which TrainingArguments refuses in every trial.

    >>> precision({"fp16": True}, cuda=True, bf16_supported=True)
    {}
    """
    if not cuda:
        return {"dataloader_pin_memory": False}  # pinning needs an accelerator
    if {"fp16", "bf16"} & set(settings):
        return {}
    return {"bf16": True} if bf16_supported else {"fp16": True}


def build_model(bench: Workbench, plan: TrialPlan) -> tuple[Any, dict[str, list[str]]]:
    """The trial's model (PEFT-wrapped for LoRA), its new heads initialised, and the load report.

    The base comes from the worker's resident one when it was built the same way (:mod:`hpo.trial.resident`);
    either way the heads and adapters are drawn from the trial's seed after the load, so a trial trains the same
    whether its base was loaded for it or kept.

    Raises:
        ValueError: the model's config has no dropout field to set, or a body weight of the checkpoint has
            another shape than this model's.
    """
    seed = int(knobs.training_value(plan.training_arguments, "seed"))
    transformers.set_seed(seed)  # a model built from a config draws its weights from it
    key = resident.key(plan, from_config=bench.model_path is None)
    lane = pack.current()
    if lane is not None:
        lane[0].clear(lane[1])  # before the base is chosen: a lane that waited may find the pack empty
    if lane is not None and lane[0].model is not None:  # a lane joining a pack: the base is the pack's
        if key != bench.resident.key:
            raise ValueError("a packed trial must build its base as the pack's other trials do")
        model, report = bench.resident.loaded
    else:
        model, report = bench.resident.take(key, lambda: _load(bench, plan), trains_all=plan.lora is None)
    transformers.set_seed(seed)  # heads and adapters: drawn alike after a load and over a resident base
    if plan.lora is None or lane is None:
        knobs.init_heads(model, report["new_heads"], plan.knobs)
    if plan.lora is None:
        return model, report
    from peft import LoraConfig, TaskType, get_peft_model

    config = LoraConfig(task_type=TaskType[TASKS[bench.cfg.task].peft_task], **plan.lora)
    if lane is not None:
        if key is None:
            raise ValueError("a packed trial needs a base that stays resident (no deepspeed, fsdp or torch_compile)")
        packed, name = lane
        first = packed.model is None
        try:
            view = packed.add(name, model, config, lambda m: knobs.init_heads(m, report["new_heads"], plan.knobs))
        except BaseException:
            if first:  # as below: a half-wrapped base is never reused
                packed.model = None
                bench.resident.forget()
            else:
                with contextlib.suppress(Exception):  # what the failed add left of the lane's adapter
                    packed.model.delete_adapter(name)
            raise
        bench.resident.lend(packed.model)
        return view, report
    try:
        peft_model = get_peft_model(model, config)
    except BaseException:  # a wrap that failed halfway left LoRA layers in the base: it is never reused
        bench.resident.forget()
        raise
    bench.resident.lend(peft_model)
    return peft_model, report


def _load(bench: Workbench, plan: TrialPlan) -> tuple[Any, dict[str, list[str]]]:
    """The model as ``from_pretrained`` (or ``from_config``) builds it with the plan's dropout and quantization,
    prepared for k-bit training when quantized, and the load report."""
    cfg = bench.cfg
    config = copy.deepcopy(bench.config)
    if "dropout" in plan.model_params:
        found = [f for f in DROPOUT_FIELDS if hasattr(config, f)]
        if not found:
            raise ValueError(f"{config.model_type} config has no dropout field to set")
        for f in found:
            setattr(config, f, plan.model_params["dropout"])
    task = TASKS[cfg.task]
    if bench.model_path is None:  # random init from cfg.model.config: nothing is pretrained, nothing is a new head
        model = task.model_class().from_config(config)
        report = {
            "missing_keys": [],
            "unexpected_keys": [],
            "mismatched_keys": [],
            "new_heads": [],
            "from_config": True,
        }
    else:
        # The weights file is memory-mapped: after the first trial this reads from the page cache (~30 ms for MiniLM).
        # A classifier checkpoint with another number of labels has a head of another shape: it is
        # re-initialised like a missing head (and reported), but a body weight of another shape is an error.
        model, info = task.model_class().from_pretrained(
            bench.model_path,
            config=config,
            output_loading_info=True,
            ignore_mismatched_sizes=True,
            **quantized(plan.quantization),
        )
        mismatched = {str(k[0]): k for k in info.get("mismatched_keys") or []}
        body = [k for k in mismatched if k.startswith(f"{model.base_model_prefix}.")]
        if body:
            _, saved, wanted = mismatched[body[0]]
            raise ValueError(f"the checkpoint's {body[0]} has shape {tuple(saved)}, this model's {tuple(wanted)}")
        report = {k: sorted(map(str, info.get(k) or []))[:50] for k in ("missing_keys", "unexpected_keys")}
        report["mismatched_keys"] = sorted(f"{k}: {tuple(v[1])} → {tuple(v[2])}" for k, v in mismatched.items())[:50]
        report["new_heads"] = knobs.head_modules([*report["missing_keys"], *mismatched])
    if plan.quantization:  # norms and head in fp32, inputs that require grads: QLoRA's recipe
        from peft import prepare_model_for_kbit_training

        checkpointing = bool(plan.training_arguments.get("gradient_checkpointing"))
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing)
    return model, report


def quantized(quantization: Mapping[str, Any] | None) -> dict[str, Any]:
    """``from_pretrained`` arguments that load the weights in 4 or 8 bits (bitsandbytes), on this CUDA device."""
    if not quantization:
        return {}
    from transformers import BitsAndBytesConfig

    dtype = getattr(torch, quantization["compute_dtype"])
    bits = quantization["bits"]
    config = BitsAndBytesConfig(
        load_in_4bit=bits == 4,
        load_in_8bit=bits == 8,
        bnb_4bit_quant_type=quantization["type"],
        bnb_4bit_use_double_quant=quantization["double_quant"],
        bnb_4bit_compute_dtype=dtype,
    )
    return {"quantization_config": config, "dtype": dtype, "device_map": {"": torch.cuda.current_device()}}


def collator(task: Task, tokenizer) -> Any:
    """The task's collator, which pads each batch."""
    cls = getattr(transformers, task.collator)
    # causal-lm labels are given (the prompt is masked), so the seq2seq collator's padding of labels fits.
    return cls(tokenizer, label_pad_token_id=IGNORE) if cls is DataCollatorForSeq2Seq else cls(tokenizer)


def flattening() -> Any:
    """``packing``'s collator of training batches: the batch's rows concatenated into one row with no padding
    (transformers' ``DataCollatorWithFlattening``). Position ids restart at each row, from which the model's attention
    masks keep each row to itself, and each row's first label is ignored, so that no row predicts the next one's first
    token. No KV cache: with one, the model would not read the rows from the position ids."""
    return _Flattening()


class _Flattening:
    """A class, not a closure: a DataLoader with worker processes pickles its collator."""

    def __init__(self):
        self.flat = transformers.DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE)

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        return {**self.flat(features), "use_cache": False}


def rows_kept_apart(model: Any, rows: list[dict[str, Any]]) -> bool:
    """Whether ``model`` computes two of ``rows`` flattened (:func:`flattening`) as it computes each alone: its
    attention reads the rows from the position ids (transformers' own attention does; a model that does not would
    train each row on the one before it, and say nothing)."""
    two = [{"input_ids": r["input_ids"][:16]} for r in rows if len(r["input_ids"]) > 1][:2]  # short: cheap
    if len(two) < 2:
        return True
    device = next(model.parameters()).device
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in flattening()(two).items() if k != "labels"}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            flat, start = model(**batch).logits[0].float(), 0
            for row in two:
                n = len(row["input_ids"])
                alone = model(input_ids=torch.tensor([row["input_ids"]], device=device), use_cache=False)
                alone = alone.logits[0].float()
                if (flat[start : start + n] - alone).abs().max() > 1e-3 + 2e-2 * alone.abs().max():
                    return False
                start += n
    finally:
        model.train(was_training)
    return True
