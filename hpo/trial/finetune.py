"""One trial: a real fine-tune (full or LoRA) of a trial plan with transformers' Trainer; its model saved or released.

The model itself (building, precision, quantization, collator) is :mod:`hpo.trial.model`; the Trainer subclass that
applies hpo's knobs is :mod:`hpo.trial.trainer`; what a finished trial measured is :mod:`hpo.trial.measurements`.
"""

from __future__ import annotations

import contextlib
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
import transformers
from torch.utils.tensorboard import SummaryWriter
from transformers import PreTrainedModel, PrinterCallback, Trainer, TrainerCallback, TrainingArguments
from transformers.integrations import TensorBoardCallback

from hpo import knobs
from hpo.attrs import CHECKPOINT_ERROR
from hpo.tasks import TASKS
from hpo.trial import checkpoints, interrupts, metrics, pack
from hpo.trial.folders import TRIAL_FILE
from hpo.trial.lanes import LaneView
from hpo.trial.measurements import optimizer_attrs, this_run, trial_measurements
from hpo.trial.memory import EVAL_BATCH_SIZE, EvalOutOfMemory, MemoryCap, PeakMeter, TrainOutOfMemory, is_out_of_memory
from hpo.trial.metrics import PerplexityCallback
from hpo.trial.model import build_model, collator, device_settings
from hpo.trial.plan import TrialPlan
from hpo.trial.pruning import PruningCallback
from hpo.trial.trainer import KnobsTrainer
from hpo.trial.workbench import Workbench, eval_subsample, quiet

LOGGING_STEPS = 10  # optimizer steps between train-loss/learning-rate/grad-norm points in TensorBoard


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
    transformers.set_seed(int(knobs.training_value(settings, "seed")))
    with interrupts.promptly():  # no safe point while the model loads: a signal stops it at once, as before
        model, load_report = build_model(bench, plan)
    built = time.perf_counter() - began  # the model loaded (or the resident base restored), adapters on it
    # a base found resident (or let go of for another) counts in the trial's peak, as in a process of its own
    meter.hold(bench.resident.held_mb(bench.device))
    name = run_name or f"trial-{trial.number:04d}"
    compute_metrics = metrics.COMPUTE[cfg.task](bench.labels) if cfg.task in metrics.COMPUTE else None
    args = _training_arguments(cfg, plan, compute_metrics, checkpoint_dir or cfg.output_path / "trials" / name)
    lead = args.process_index == 0  # rank 0 of a multi-process trial writes the logs (hpo.study.distributed)
    n_train = len(bench.train_rows)
    callback = _pruning_callback(cfg, trial, n_train, on_eval, report)
    saver = _saver(cfg, trial, n_train, checkpoint_dir, warns=lead and report)
    resume = checkpoints.latest(checkpoint_dir)
    resumed_at = checkpoints.examples_seen(resume, n_train) if resume else 0  # read now: rotation deletes it
    trainer = KnobsTrainer(
        knobs=plan.knobs,
        heads=load_report["new_heads"],
        eval_subset=eval_subsample(cfg, bench.eval_rows),
        model=model,
        args=args,
        data_collator=collator(TASKS[cfg.task], bench.tokenizer),
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
    seconds = _train(trainer, callback, saver, resume, writer)
    attrs = trial_measurements(bench, trainer, callback, seconds, meter)
    attrs.update(this_run(trainer, resume, attrs["examples_seen"] - resumed_at, seconds, clock.step, clock.at - began))
    attrs.update(load_report=load_report, model_seconds=round(built, 3), base_resident=bench.resident.reused)
    attrs["packed"] = pack.current() is not None  # trained in a pack (hpo.trial.pack): its peak and time are shared
    attrs.update(optimizer_attrs(trainer))
    value = _scored(cfg, callback, model)
    history = [{"step": step, **metrics} for step, metrics in callback.history]
    del trainer
    with contextlib.suppress(OSError):  # nothing was written there: no empty folder left (trials/ is shared: a
        os.rmdir(args.output_dir)  # worker's Trainer may be making its folder there, and removing it failed that)
    return TrialResult(value=value, pruned=callback.pruned_at is not None, attrs=attrs, history=history, model=model)


def _training_arguments(cfg, plan: TrialPlan, compute_metrics, output_dir: Path) -> TrainingArguments:
    """The trial's TrainingArguments: hpo's defaults, the plan's settings over them, then what hpo must own."""
    settings = plan.training_arguments
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
            "output_dir": str(output_dir),
            "eval_strategy": "no",  # PruningCallback decides when to evaluate
            "save_strategy": "no",  # CheckpointCallback decides when to save; the best model is saved by the study
            "save_total_limit": None,  # CheckpointCallback rotates
            "report_to": "none",  # run_trial adds TensorBoard, with one run folder per trial
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
    return args


def _pruning_callback(cfg, trial: optuna.Trial, n_train: int, on_eval, report: bool) -> PruningCallback:
    """The callback that evaluates on the study's grid, reports to ``trial`` and decides when the trial ends."""
    stopping = cfg.early_stopping
    return PruningCallback(
        trial,
        cfg.objective.metric,
        n_train,
        cfg.eval_every.examples_between(n_train),
        on_eval,
        minimize=cfg.objective.direction == "minimize",
        keep_best=cfg.objective.at == "best",
        patience=stopping.patience if stopping else None,
        min_delta=stopping.min_delta if stopping else 0.0,
        report=report and not cfg.objectives,
        min_steps=cfg.pruner.min_optimizer_steps,
    )


def _saver(cfg, trial: optuna.Trial, n_train: int, checkpoint_dir: Path | None, warns: bool):
    """The callback that saves checkpoints into ``checkpoint_dir`` (None: none); ``warns``: a failed save is noted
    on the trial."""
    if checkpoint_dir is None:
        return None
    warn = (lambda why: trial.set_user_attr(CHECKPOINT_ERROR, why)) if warns else None
    return checkpoints.CheckpointCallback(n_train, cfg.checkpoint_every.examples_between(n_train), warn)


def _train(trainer: Trainer, callback: PruningCallback, saver, resume: Path | None, writer) -> float:
    """Train (from ``resume``, when given) and return the seconds it took.

    Raises:
        KeyboardInterrupt: SIGTERM stopped it after a checkpoint, before the trial's end.
        EvalOutOfMemory: an evaluation batch ran out of memory.
        FloatingPointError: the model diverged.
        RuntimeError: training ended before the first evaluation.
    """
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
    return seconds


def _scored(cfg, callback: PruningCallback, model) -> float:
    """The trial's value: the objective at the evaluation ``objective.at`` picks, whose weights ``model`` then has."""
    scored = callback.best if cfg.objective.at == "best" else len(callback.history) - 1
    if callback.best_state is not None and scored != len(callback.history) - 1:
        model.load_state_dict(callback.best_state, strict=False)  # the model saved is the one scored
    return callback.history[scored][1][cfg.objective.metric]


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
        model=model.pack.model if isinstance(model, LaneView) else model,  # a packed trial's: as KnobsTrainer
        args=args,
        eval_dataset=bench.test_rows,
        data_collator=collator(TASKS[cfg.task], bench.tokenizer),
        compute_metrics=compute_metrics,
        # a test set may be large: Ctrl-C stops at the next prediction step, not at the evaluation's end
        callbacks=[checkpoints.StopCallback(), *([] if compute_metrics else [PerplexityCallback()])],
    )
    if isinstance(model, LaneView):
        model.view(trainer)
    trainer.remove_callback(PrinterCallback)  # hpo prints its own lines
    found = trainer.evaluate()
    with contextlib.suppress(OSError):  # nothing was written there; trials/ is shared, as in run_trial
        os.rmdir(args.output_dir)
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
