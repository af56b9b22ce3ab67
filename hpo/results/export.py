"""The winner out: the best configuration as TrainingArguments JSON, and a retrain of it."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from hpo.attrs import DERIVED_PARAMS, DEVICES, FINALIST, MICRO_BATCH, TEST_METRICS
from hpo.config import StudyConfig
from hpo.errors import NoCompleteTrial
from hpo.expr import Expression
from hpo.study.revisions import check_trial_settings, current_revision, trial_revision
from hpo.study.storage import best_trial, rank_key
from hpo.tasks import TASKS
from hpo.trial.plan import DEFAULT_BATCH, TrialPlan, make_plan


def best_params(study: optuna.Study) -> dict[str, Any]:
    """The best trial's sampled and derived parameters."""
    return _params(best_trial(study))


def best_config(
    cfg: StudyConfig, study: optuna.Study, number: int | None = None, pick: str | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The best trial's (or complete trial ``number``'s) exported :class:`~hpo.trial.plan.TrialPlan`: (TrainingArguments
    kwargs, the rest).

    The rest names the study, trial, metric and value, and the revision of the study file it ran under.

    Raises:
        NoCompleteTrial: the study has no complete trial, or trial ``number`` is not one.
        ConfigError: the study file's settings differ from those the trial ran under.
    """
    trial, plan = _best_plan(cfg, study, picked(cfg, study, pick) if pick is not None else number)
    args, rest = plan.exported(cfg)
    micro = trial.user_attrs.get(MICRO_BATCH)
    if micro is not None and micro != args.get("per_device_train_batch_size", DEFAULT_BATCH):
        rest["micro_batch"] = micro  # it ran out of memory above: the same effective batch in smaller steps
    return args, {
        "study": cfg.study,
        "trial": trial.number,
        "metric": cfg.objective.metric,
        "value": trial.values[0],
        **(
            {"values": dict(zip([o.metric for o in cfg.objectives], trial.values, strict=True))}
            if cfg.objectives
            else {}
        ),
        **rest,
        **({"test": trial.user_attrs[TEST_METRICS]} if TEST_METRICS in trial.user_attrs else {}),  # data.test
        **({"finalists": finalists(cfg, study)} if cfg.finalists is not None else {}),
        "revision": trial_revision(trial),
        "current_revision": current_revision(study),
    }


def finalists(cfg: StudyConfig, study: optuna.Study) -> dict[str, Any]:
    """The study's finalists, its best ``finalists.top`` complete trials by the objective: their numbers in that
    order (``by_objective``), and ranked by ``finalists.rank_by``, higher first (``ranked``: trial, value, scores).
    A finalist not scored under today's settings (its generation failed, or ran with other ``split``, ``generate``
    or ``metrics``) comes last with its ``error``: scores made otherwise are never ranked beside them."""
    f = cfg.finalists
    top = sorted(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)), key=rank_key(study))[: f.top]
    ranked, unscored = [], []
    for t in top:
        found = t.user_attrs.get(FINALIST, {"error": "not generated"})
        if "scores" in found and found.get("settings") != f.settings():
            found = {"error": "scored under other finalists settings (split, generate, metrics)"}
        entry = {"trial": t.number, "value": t.values[0], **found}
        (ranked if f.rank_by in found.get("scores", {}) else unscored).append(entry)
    ranked.sort(key=lambda e: -e["scores"][f.rank_by])  # stable: equal scores keep the objective's order
    return {"rank_by": f.rank_by, "by_objective": [t.number for t in top], "ranked": ranked + unscored}


def _best_plan(
    cfg: StudyConfig, study: optuna.Study, number: int | None = None
) -> tuple[optuna.trial.FrozenTrial, TrialPlan]:
    """The best trial (or complete trial ``number``) and its plan, as it ran: ``lr_scaling`` counts the devices
    the trial had, not this machine's.

    Raises:
        NoCompleteTrial: the study has no complete trial, or trial ``number`` is not one.
        ConfigError: the study file's settings differ from those the trial ran under.
    """
    if number is None:
        try:
            trial = best_trial(study)
        except ValueError:  # Optuna says "Record does not exist."
            raise NoCompleteTrial(f"{cfg.file}: the study has no complete trial yet") from None
    else:
        trials = study.get_trials(deepcopy=False)
        if not 0 <= number < len(trials):
            raise NoCompleteTrial(f"{cfg.file}: the study has no trial {number} (it holds 0 to {len(trials) - 1})")
        trial = trials[number]
        if trial.state != optuna.trial.TrialState.COMPLETE:
            raise NoCompleteTrial(
                f"{cfg.file}: trial {number} is {trial.state.name}, not complete: it has no final value to stand by"
            )
    check_trial_settings(study, cfg, trial)
    return trial, make_plan(cfg, _params(trial), trial.user_attrs.get(DEVICES))


def picked(cfg: StudyConfig, study: optuna.Study, pick: str) -> int:
    """The trial ``pick`` chooses: among the Pareto front (with one objective: every complete trial), those for
    which the condition holds, then the best on the first objective (the earliest among equals).

    The condition is in the language of ``constraints:`` and reads each objective's metric, the trial's measured
    figures (``peak_memory_mb``, ``train_seconds``, task metrics, ...) and its parameters, e.g.
    ``"peak_memory_mb <= 24000 and eval_latency_ms < 5"``.

    Raises:
        ValueError: ``pick`` is not an expression of that language, or names nothing a trial has.
        NoCompleteTrial: no trial of the front meets it.
    """
    try:
        condition = Expression(pick, condition=True)
    except ValueError as e:  # a bare name or number too: it would hold for every trial
        raise ValueError(f"--pick: {e}") from None
    front = study.best_trials if cfg.objectives else study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    metrics = [o.metric for o in cfg.objectives or [cfg.objective]]
    chosen = []
    for trial in front:
        names = {
            **{k: v for k, v in trial.user_attrs.items() if isinstance(v, int | float)},
            **_params(trial),
            **dict(zip(metrics, trial.values, strict=True)),
        }
        missing = condition.names - set(names)
        if missing:
            raise ValueError(f"--pick {pick!r}: trial {trial.number} has no {', '.join(sorted(missing))}")
        if condition.evaluate(names):
            chosen.append(trial)
    if not chosen:
        where = "of the Pareto front" if cfg.objectives else "complete trial"
        raise NoCompleteTrial(f"{cfg.file}: no {where} meets {pick!r} ({len(front)} looked at)")
    return min(chosen, key=rank_key(study)).number


def _params(trial: optuna.trial.FrozenTrial) -> dict[str, Any]:
    return {**trial.params, **trial.user_attrs.get(DERIVED_PARAMS, {})}


def model_json(path: Path) -> Path:
    """Where :func:`write_config` puts the rest when the TrainingArguments go to ``path``."""
    return path.with_name(f"{path.stem}.model.json")


def write_config(args: dict[str, Any], rest: dict[str, Any], path: Path) -> tuple[Path, Path]:
    """Write :func:`best_config`'s two parts as ``path`` and ``<stem>.model.json``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    side = model_json(path)
    path.write_text(json.dumps(args, indent=2, sort_keys=True) + "\n")
    side.write_text(json.dumps(rest, indent=2, sort_keys=True) + "\n")
    return path, side


def train_best(cfg: StudyConfig, study: optuna.Study, all_data: bool = False) -> Path:
    """Retrain the best configuration, as its trial ran, and save model (or adapter), tokenizer, its configuration
    (``training_args.json`` and ``training_args.model.json``, as :func:`write_config`) and a model card.

    ``all_data`` trains on train + eval (the eval numbers then say little).
    A study whose trials ran as several processes (``resources.processes_per_trial``, FSDP, DeepSpeed) retrains
    through the same launcher (:func:`hpo.study.distributed.run_trial`): as many ranks, so the same global batch.
    Returns the folder, ``<outputs>/final_model``.

    Raises:
        ConfigError: the study file changed since the best trial ran, or the output folder (or a
            ``final_model/`` in it) is not hpo's to write in; both before training.
    """
    from hpo.study import distributed
    from hpo.trial import memory
    from hpo.trial.finetune import TrialResult, run_trial, save_model
    from hpo.trial.folders import claim_paths
    from hpo.trial.workbench import prepare

    args, rest = best_config(cfg, study)  # before training: refuses a study file that changed
    claim_paths(cfg, cfg.output_path / "final_model")  # and a final_model/ hpo did not save, or a folder not hpo's
    _, plan = _best_plan(cfg, study)
    bench = prepare(cfg)
    if all_data:
        bench = dataclasses.replace(bench, train_rows=bench.train_rows + bench.eval_rows)
    params = best_params(study)
    fixed = optuna.trial.FixedTrial(params, rest["trial"])
    target = cfg.output_path / "final_model"

    def attempt(p: TrialPlan, meter: memory.PeakMeter) -> TrialResult:
        if distributed.needed(cfg):  # rank 0 saves the model
            return distributed.run_trial(bench, p, fixed, meter=meter, run_name="final", save_to=target, params=params)
        return run_trial(bench, p, fixed, run_name="final", meter=meter)

    result: TrialResult
    # At the micro-batch the trial ran at, smaller if this machine has less memory.
    result, _, _, _ = memory.fit(plan, attempt, bench.device, rest.get("micro_batch"))
    folder = target if result.model is None else save_model(bench, result, params, rest["trial"], target)
    write_config(args, rest, folder / "training_args.json")  # and training_args.model.json: knobs, LoRA, model
    (folder / "README.md").write_text(_model_card(cfg, rest, args, result.attrs, all_data))
    memory.release(result)
    return folder


def _model_card(
    cfg: StudyConfig, rest: dict[str, Any], args: dict[str, Any], attrs: dict[str, Any], all_data: bool
) -> str:
    rows = "\n".join(
        f"| `{k}` | `{v}` |"
        for k, v in sorted({**args, **rest["model_params"], **(rest["lora"] or {}), **rest["knobs"]}.items())
    )
    trained_on = "train + eval" if all_data else "train"
    n = attrs.get("processes", 1)
    ranks = f" × {n} processes (as the trial ran)" if n > 1 else ""
    metrics = ", ".join(
        f"{m.removeprefix('eval_')} {attrs[m]:.4f}" for m in TASKS[cfg.task].metrics if m in attrs and m != "eval_loss"
    )
    return f"""# {cfg.study}: best configuration, retrained

Fine-tuned from `{cfg.model.label}` ({cfg.task}{", LoRA adapter" if rest["lora"] else ""}) on {trained_on}
(`{cfg.data.train.name}`{" + " + cfg.data.eval.name if all_data else ""}), with the parameters of trial
{rest["trial"]} of the hpo study `{cfg.study}` ({rest["metric"]} = {rest["value"]:.4f} in the study).

This run: last eval_loss {attrs.get("last_eval_loss", float("nan")):.4f}, {metrics},
{attrs.get("optimizer_steps")} optimizer steps in {attrs.get("train_seconds")} s on {attrs.get("device")}{ranks}.

| parameter | value |
|---|---|
{rows}
"""
