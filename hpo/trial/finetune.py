"""One trial: a real fine-tune (full or LoRA) of a trial plan with transformers' Trainer; its model saved or released."""

from __future__ import annotations

import contextlib
import copy
import errno
import json
import math
import os
import shutil
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import torch
import transformers
from torch.utils.tensorboard import SummaryWriter
from transformers import (
    DataCollatorForSeq2Seq,
    PreTrainedModel,
    PrinterCallback,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)
from transformers.integrations import TensorBoardCallback

from hpo import knobs
from hpo.attrs import CHECKPOINT_ERROR, PRUNED_AT_STEP
from hpo.tasks import TASKS, Task
from hpo.trial import checkpoints, metrics
from hpo.trial.folders import TRIAL_FILE
from hpo.trial.memory import (
    EVAL_BATCH_SIZE,
    EvalOutOfMemory,
    MemoryCap,
    PeakMeter,
    TrainOutOfMemory,
    is_out_of_memory,
    rss_mb,
)
from hpo.trial.metrics import PerplexityCallback
from hpo.trial.plan import TrialPlan
from hpo.trial.pruning import PruningCallback
from hpo.trial.tokens import IGNORE
from hpo.trial.workbench import Workbench, eval_subsample, quiet

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
LOGGING_STEPS = 10  # optimizer steps between train-loss/learning-rate/grad-norm points in TensorBoard


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


@dataclass
class TrialResult:
    """What a trial measured; ``model`` is kept only until the caller saves or drops it."""

    value: float
    pruned: bool
    attrs: dict[str, Any]
    history: list[dict[str, float]]  # every evaluation: {"step": examples seen, "eval_loss": ..., ...}
    model: PreTrainedModel | None = None


@quiet()
def run_trial(
    bench: Workbench,
    plan: TrialPlan,
    trial: optuna.Trial,
    on_eval: Callable[[int, float], None] | None = None,
    run_name: str | None = None,
    meter: PeakMeter | None = None,
    callbacks: Sequence[TrainerCallback] = (),
    checkpoint_dir: Path | None = None,
    report: bool = True,
) -> TrialResult:
    """Fine-tune once as ``plan`` says and report evaluations to ``trial``.

    Logs go to ``<outputs>/tensorboard/<run_name>`` (default ``trial-NNNN``):
    one TensorBoard run per trial. ``meter`` measures the trial's peak memory (default: from now on);
    ``callbacks`` join the Trainer's (``hpo check`` times steps with one). With ``checkpoint_dir`` (and the
    study's ``checkpoint_every``) it saves checkpoints there and resumes from the newest complete one. ``report``:
    False trains without telling Optuna (the other seeds of ``repeats``).

    Returns the objective at the last evaluation (the model the trial ends
    with), whether the pruner stopped it, and the measurements to keep.

    Raises:
        FloatingPointError: the objective or the eval loss became NaN or infinite.
        Exception: whatever training raised (Optuna records the trial as FAIL).
    """
    began = time.perf_counter()
    meter = meter or PeakMeter(bench.device)
    cfg = bench.cfg
    settings = plan.training_arguments
    transformers.set_seed(int(settings.get("seed", 42)))
    model, load_report = _build_model(bench, plan)
    heads = load_report["new_heads"]

    name = run_name or f"trial-{trial.number:04d}"
    task = TASKS[cfg.task]
    compute_metrics = metrics.COMPUTE[cfg.task](bench.labels) if cfg.task in metrics.COMPUTE else None
    args = TrainingArguments(
        **{
            "prediction_loss_only": compute_metrics is None,  # causal-lm: perplexity needs the loss, not the logits
            "per_device_eval_batch_size": EVAL_BATCH_SIZE,
            # Training batches are drawn at random (TrainingArguments' default). transformers' group_by_length
            # sorts each window of up to 50 batches longest first: where length follows the label, a trial sees
            # one label after the other. The same configuration ended at eval loss 1.575 grouped and 0.543
            # shuffled (MiniLM-size, 1,000 requests). It saved ~10% of a study's time; `train:` may still ask.
            "logging_steps": LOGGING_STEPS,
            "disable_tqdm": True,
            **device_settings(settings),
            **settings,  # the user's settings win over the defaults above
            "output_dir": str(checkpoint_dir or cfg.output_path / "trials" / name),
            "eval_strategy": "no",  # PruningCallback decides when to evaluate
            "save_strategy": "no",  # CheckpointCallback decides when to save; the best model is saved by the study
            "save_total_limit": None,  # CheckpointCallback rotates
            "report_to": "none",  # TensorBoard is added below, with one run folder per trial
            # Under several processes the Trainer multiplies each rank's loss by their number for models whose
            # loss is a mean over their own batch (classifiers): a 2-process eval loss came out twice the true one.
            "average_tokens_across_devices": False,
        }
    )
    if args.n_gpu > 1:
        # One process that sees several GPUs (hpo check, or the library called directly on such a machine): the
        # Trainer would wrap the model in DataParallel and multiply the batch by their number, and the best
        # configuration would be wrong for one GPU. hpo runs a trial on cuda:0, as transformers itself does
        # under model parallelism. (hpo run gives each worker its own GPUs: hpo.api.run.)
        args._n_gpu = 1
    lead = args.process_index == 0  # rank 0 of a multi-process trial writes the logs (hpo.study.distributed)
    n_train = len(bench.train_rows)
    every = cfg.eval_every.examples_between(n_train)
    stopping = cfg.early_stopping
    callback = PruningCallback(
        trial,
        cfg.objective.metric,
        n_train,
        every,
        on_eval,
        minimize=cfg.objective.direction == "minimize",
        keep_best=cfg.objective.at == "best",
        patience=stopping.patience if stopping else None,
        min_delta=stopping.min_delta if stopping else 0.0,
        report=report and not cfg.objectives,
        min_steps=cfg.pruner.min_optimizer_steps,
    )
    saver = None
    if checkpoint_dir is not None:
        warn = (lambda why: trial.set_user_attr(CHECKPOINT_ERROR, why)) if lead and report else None
        saver = checkpoints.CheckpointCallback(n_train, cfg.checkpoint_every.examples_between(n_train), warn)
    resume = checkpoints.latest(checkpoint_dir)
    resumed_at = checkpoints.examples_seen(resume, n_train) if resume else 0  # read now: rotation deletes it
    subset = eval_subsample(cfg, bench.eval_rows)
    trainer = knobs.make_trainer_class()(
        knobs=plan.knobs,
        heads=heads,
        eval_subset=subset,
        model=model,
        args=args,
        data_collator=collator(task, bench.tokenizer),
        train_dataset=bench.train_rows,
        eval_dataset=bench.eval_rows,
        processing_class=bench.tokenizer,
        compute_metrics=compute_metrics,
        callbacks=[
            checkpoints.StopCallback(checkpointing=saver is not None),  # Ctrl-C and SIGTERM stop at its safe points
            *([] if compute_metrics else [PerplexityCallback()]),
            callback,
            clock := _FirstStep(),
            *([TensorBoardCallback(writer)] if (writer := _writer(cfg, name, lead)) else []),
            *([MemoryCap(meter, cfg.resources.max_memory_gb)] if _capped(cfg, meter) else []),
            *([saver] if saver else []),
            *callbacks,
        ],
    )
    trainer.remove_callback(PrinterCallback)  # hpo prints its own progress
    start = time.perf_counter()
    try:
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    except BaseException as e:
        if writer:
            writer.close()  # the Trainer closes it at the end of training only: a failed attempt would leak its thread
        if callback.evaluating and is_out_of_memory(e) and not isinstance(e, TrainOutOfMemory):
            raise EvalOutOfMemory(str(e)) from None  # the eval batch ran out, not the training one
        raise
    ended = any(
        x is not None for x in (callback.pruned_at, callback.diverged, callback.stopped_early)
    )  # at SIGTERM's step
    if saver is not None and saver.stopped and not ended and trainer.state.global_step < trainer.state.max_steps:
        raise KeyboardInterrupt(f"SIGTERM: checkpoint saved at step {trainer.state.global_step}")
    if resume is not None and not callback.history:  # resumed at its last step: only the final evaluation is left
        trainer.evaluate()
    seconds = time.perf_counter() - start

    if callback.diverged is not None:
        step, what = callback.diverged
        raise FloatingPointError(f"{what} at step {step}: the model diverged")
    if not callback.history:
        raise RuntimeError("training ended before the first evaluation")
    attrs = _measurements(bench, trainer, callback, seconds, meter)
    if subset is not None:
        attrs["eval_subsample_rows"] = len(subset)  # at the evaluations before the last
    if resume is not None:  # the checkpoint's optimizer step, and the first step this run trained
        attrs["resumed_from_step"], attrs["first_step"] = int(resume.name.split("-")[1]), clock.step
        trained = attrs["examples_seen"] - resumed_at  # by this run
        attrs["samples_per_second"] = round(trained / max(seconds, 1e-9), 2)
    if not math.isnan(clock.at):
        attrs["seconds_to_first_step"] = round(clock.at - began, 3)  # model, Trainer, first batch: a trial's start-up
    attrs["train_sampling_strategy"] = getattr(args, "train_sampling_strategy", None)  # how batches were drawn
    if (now := rss_mb()) is not None:
        attrs["rss_mb"] = round(now, 1)  # now, after training: growth across trials is a leak
    attrs["load_report"] = load_report  # what the checkpoint lacked (new heads) or had in excess
    optimizer = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    attrs["optimizer"] = type(optimizer).__name__
    attrs["optimizer_kernel"] = next((k for k in ("fused", "foreach") if optimizer.defaults.get(k)), "for-loop")
    attrs["param_groups"] = [  # the rates as the optimizer had them: layer-wise, scaled, scheduled
        {
            "parameters": sum(p.numel() for p in g["params"]),
            "head": g.get("head", False),
            "lr": g.get("initial_lr", g["lr"]),
            "final_lr": g["lr"],
            "weight_decay": g["weight_decay"],
        }
        for g in trainer.optimizer.param_groups
    ]
    scored = callback.best if cfg.objective.at == "best" else len(callback.history) - 1
    value = callback.history[scored][1][cfg.objective.metric]
    if callback.best_state is not None and scored != len(callback.history) - 1:
        model.load_state_dict(callback.best_state, strict=False)  # the model saved is the one scored
    history = [{"step": step, **metrics} for step, metrics in callback.history]
    del trainer
    with contextlib.suppress(OSError):  # nothing was written there: leave no empty folder behind
        os.removedirs(args.output_dir)  # and trials/ when it is empty too
    return TrialResult(value=value, pruned=callback.pruned_at is not None, attrs=attrs, history=history, model=model)


@quiet()
def evaluate_test(bench: Workbench, model: PreTrainedModel) -> dict[str, float]:
    """``model``'s metrics on ``data.test``, named ``test_loss``, ``test_accuracy``, ... (the eval metrics' names
    with ``test_``), computed as the trial's evaluations are: the same collator, metrics and batch."""
    cfg = bench.cfg
    compute_metrics = metrics.COMPUTE[cfg.task](bench.labels) if cfg.task in metrics.COMPUTE else None
    args = TrainingArguments(
        output_dir=str(cfg.output_path / "trials" / "test"),
        per_device_eval_batch_size=EVAL_BATCH_SIZE,
        prediction_loss_only=compute_metrics is None,
        report_to="none",
        disable_tqdm=True,
        **device_settings(cfg.train),
    )
    trainer = Trainer(
        model=model,
        args=args,
        eval_dataset=bench.test_rows,
        data_collator=collator(TASKS[cfg.task], bench.tokenizer),
        compute_metrics=compute_metrics,
        callbacks=[] if compute_metrics else [PerplexityCallback()],
    )
    trainer.remove_callback(PrinterCallback)  # hpo prints its own lines
    found = trainer.evaluate()
    with contextlib.suppress(OSError):  # nothing was written there
        os.removedirs(args.output_dir)
    runtime = (
        "eval_runtime",
        "eval_samples_per_second",
        "eval_steps_per_second",
        "eval_model_preparation_time",
        "epoch",
    )
    return {f"test_{k.removeprefix('eval_')}": v for k, v in found.items() if k not in runtime}


def objective_values(cfg, result: TrialResult) -> list[float]:
    """The trial's value for each of ``objectives``: task metrics at the scored evaluation (as the first
    objective's), cost figures from what the trial measured."""
    scored = next(h for h in result.history if h["step"] == result.attrs["scored_step"])
    return [float(scored[o.metric] if o.metric in scored else result.attrs[o.metric]) for o in cfg.objectives]


def _build_model(bench: Workbench, plan: TrialPlan) -> tuple[Any, dict[str, list[str]]]:
    """The trial's model (PEFT-wrapped for LoRA), its new heads initialised, and the load report."""
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
            **_quantized(plan.quantization),
        )
        mismatched = {str(k[0]): k for k in info.get("mismatched_keys") or []}
        body = [k for k in mismatched if k.startswith(f"{model.base_model_prefix}.")]
        if body:
            _, saved, wanted = mismatched[body[0]]
            raise ValueError(f"the checkpoint's {body[0]} has shape {tuple(saved)}, this model's {tuple(wanted)}")
        report = {k: sorted(map(str, info.get(k) or []))[:50] for k in ("missing_keys", "unexpected_keys")}
        report["mismatched_keys"] = sorted(f"{k}: {tuple(v[1])} → {tuple(v[2])}" for k, v in mismatched.items())[:50]
        report["new_heads"] = knobs.head_modules([*report["missing_keys"], *mismatched])
        knobs.init_heads(model, report["new_heads"], plan.knobs)
    if plan.lora is None:
        return model, report
    from peft import LoraConfig, TaskType, get_peft_model, prepare_model_for_kbit_training

    if plan.quantization:  # norms and head in fp32, inputs that require grads: QLoRA's recipe
        checkpointing = bool(plan.training_arguments.get("gradient_checkpointing"))
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing)
    return get_peft_model(model, LoraConfig(task_type=TaskType[task.peft_task], **plan.lora)), report


def _writer(cfg, name: str, lead: bool) -> _MaskedWriter | None:
    """The trial's TensorBoard writer, on rank 0 only (others would write a second run into its folder)."""
    return _MaskedWriter(str(cfg.output_path / "tensorboard" / name), cfg.masked) if lead else None


def _capped(cfg, meter: PeakMeter) -> bool:
    """Whether ``resources.max_memory_gb`` is enforced here: on CUDA the allocator does it; on CPU only where
    the trial's own peak can be measured (else the process's peak since it started would fail every trial)."""
    if not cfg.resources.max_memory_gb or meter.device == "cuda":
        return False
    if not meter.resettable:
        warnings.warn(
            "resources.max_memory_gb is not enforced here: this system cannot reset the peak RSS", stacklevel=2
        )
    return meter.resettable


def _quantized(quantization: Mapping[str, Any] | None) -> dict[str, Any]:
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


class _MaskedWriter(SummaryWriter):
    """TensorBoard's writer, with ``${SECRET}`` values masked in the text it logs (the run's TrainingArguments)."""

    def __init__(self, logdir: str, masked: Callable[[str], str]):
        super().__init__(logdir)
        self._masked = masked

    def add_text(self, tag, text_string, *args, **kwargs):
        return super().add_text(tag, self._masked(text_string), *args, **kwargs)


class _FirstStep(TrainerCallback):
    at = math.nan
    step = 0  # the first optimizer step this run trained (after a resume, the checkpoint's + 1)

    def on_step_end(self, args, state, control, **kwargs):
        if math.isnan(self.at):
            self.at, self.step = time.perf_counter(), state.global_step


def _measurements(
    bench: Workbench, trainer: Trainer, callback: PruningCallback, seconds: float, meter: PeakMeter
) -> dict[str, Any]:
    metric = bench.cfg.objective.metric
    scored = callback.best if bench.cfg.objective.at == "best" else -1
    scored_step, at = callback.history[scored]  # the evaluation that is the trial's value
    last_step, last = callback.history[-1]
    # Best over evaluations of every eval row: with eval_every.subsample, only the last one of a trial that ran to
    # its end (a pruned trial has none: its subsampled ones, then).
    subsampled = getattr(trainer, "eval_subset", None) is not None
    ended = trainer.state.global_step >= trainer.state.max_steps
    full = callback.history[-1:] if subsampled and ended else callback.history
    losses = [m["eval_loss"] for _, m in full]
    objective = [m[metric] for _, m in full]
    pick = min if bench.cfg.objective.direction == "minimize" else max
    examples = round(trainer.state.epoch * len(bench.train_rows))
    attrs = {
        "best_eval_loss": min(losses),
        "last_eval_loss": last["eval_loss"],
        f"best_{metric}": pick(objective),
        **{m: at.get(m) for m in TASKS[bench.cfg.task].metrics if m != "eval_loss"},  # at the scored evaluation
        "scored_step": scored_step,  # the evaluation the trial's value and model are from (objective.at)
        "optimizer_steps": trainer.state.global_step,
        "planned_steps": trainer.state.max_steps,  # what the full run would take: pruning saves the difference
        "examples_seen": examples,
        "last_step": last_step,
        "train_seconds": round(seconds, 3),
        "samples_per_second": round(examples / seconds, 2) if seconds > 0 else None,
        # inference per example at the scored evaluation, on this device at the eval batch: a cost to trade off
        "eval_latency_ms": round(1000 / at["eval_samples_per_second"], 4)
        if at.get("eval_samples_per_second")
        else None,
        "peak_memory_mb": round(meter.peak_mb, 1),  # the trial's own: above the process's level before it
        "device": bench.device,
        "processes": trainer.args.world_size,  # ranks of a multi-process trial (peak memory: rank 0's)
        "trainable_parameters": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
    }
    if callback.pruned_at is not None:
        attrs[PRUNED_AT_STEP] = callback.pruned_at
    if callback.stopped_early is not None:
        attrs["stopped_early"] = callback.stopped_early  # COMPLETE: it stopped improving (early_stopping)
    return {k: v for k, v in attrs.items() if v is not None and not (isinstance(v, float) and math.isnan(v))}


@quiet()  # transformers' "Writing model shards" bar
def save_model(
    bench: Workbench, result: TrialResult, params: Mapping[str, Any], trial_number: int, target: Path
) -> Path:
    """Save the trial's model (or LoRA adapter), tokenizer and ``hpo_trial.json`` as the folder ``target``.

    Writes a sibling temporary folder and swaps it in: a crash never leaves a half-written model, and
    a failed write (a full disk) removes the temporary folder before raising.

    Raises:
        OSError: the model could not be written.
    """
    tmp = target.with_name(f".{target.name}.tmp.{os.getpid()}")
    _remove(tmp)
    try:
        result.model.save_pretrained(tmp)
        bench.tokenizer.save_pretrained(tmp)
        info = {
            "study": bench.cfg.study,
            "storage": bench.cfg.storage_label,
            "trial": trial_number,
            "value": result.value,
            "params": dict(params),
        }
        if "model_value" in result.attrs:  # repeats: the value is the seeds' mean; this model is the first seed's
            info["model_value"], info["model_seed"] = result.attrs["model_value"], result.attrs["seeds"][0]
        (tmp / TRIAL_FILE).write_text(json.dumps(info, indent=2) + "\n")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_folder(tmp, target)
    return target


def replace_folder(source: Path, target: Path) -> None:
    """Make ``source`` the folder ``target``: the old one is renamed aside, then removed.

    Only a real folder is replaced: a symlink or a file at ``target`` is never followed or removed, and a
    failed swap puts the old folder back, so no ``.<name>.old.<pid>`` is left behind.

    Raises:
        FileExistsError: ``target`` is a symlink or not a folder (left as it is, and ``source`` too).
    """
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise FileExistsError(errno.EEXIST, "not a folder hpo wrote, left as it is", str(target))
    old = target.with_name(f".{target.name}.old.{os.getpid()}")
    _remove(old)
    moved = target.exists()
    if moved:
        target.rename(old)
    try:
        source.rename(target)
    except BaseException:
        if moved:
            old.rename(target)
        raise
    _remove(old)


def _remove(path: Path) -> None:
    if path.is_symlink():
        path.unlink()  # the link, never what it points at
    else:
        shutil.rmtree(path, ignore_errors=True)
