"""What makes a study's trials comparable, and the revisions of a study file that changed it.

A study keeps a fingerprint of everything that decides what one trial's value means: the task, the
objective and its direction, the model, the data (each file's content hash and row count), the
evaluation grid, the fixed ``train:`` settings and the search space. A study file that reuses the
study's name must match it. A different objective or direction is always refused (its values could
not be ranked beside the old ones); any other difference is refused unless the run allows changes,
and then it becomes a new revision: trials record the revision they ran under, and the report and
``hpo best`` show it. Sampler, pruner, ``n_trials`` and storage settings may change freely.
"""

from __future__ import annotations

import datetime
import hashlib
import json
from pathlib import Path
from typing import Any

import optuna

from hpo.attrs import CONFIG, FINGERPRINT, REVISION, REVISIONS
from hpo.config import StudyConfig
from hpo.trial.folders import hpo_files

MAX_LISTED = 4  # changes named in the one-line refusal
WHOLE_FILE_BYTES = 64 * 2**20  # model and tokenizer files up to this size are hashed whole
BLOCK_BYTES, SAMPLED_BLOCKS = 2**20, 10  # bigger ones: 10 blocks of 1 MiB, first to last
#: What from_pretrained reads from a model or tokenizer folder: weights (and their shard index), configs,
#: vocabularies, merges and sentencepiece models.
MODEL_FILES = frozenset({".safetensors", ".bin", ".json", ".txt", ".model", ".tiktoken", ".pt", ".pth"})


def fingerprint(
    cfg: StudyConfig, data_files: dict[str, dict[str, Any]] | None = None, model_dirs: tuple[str | None, ...] = ()
) -> dict[str, Any]:
    """What makes ``cfg``'s trials comparable, as JSON.

    ``data_files``: per split, the SHA-256 of the bytes read and the rows used (:class:`hpo.data.Examples`);
    ``model_dirs``: the model's and tokenizer's folders, whose files are digested (:func:`folder_digest`),
    so a model replaced in the same folder is a change. Without them, only the settings.
    """
    data = cfg.data.model_dump(mode="json", exclude={"train", "eval", "test"}, exclude_none=True)
    data.update(data_files or {})
    model = cfg.model.model_dump(mode="json", exclude_none=True)
    for key, folder in zip(
        ("files", "tokenizer_files"), dict.fromkeys(model_dirs), strict=False
    ):  # tokenizer: when apart
        if folder and Path(folder).is_dir():
            model[key] = folder_digest(Path(folder))
    return cfg.masked_data(
        {
            "task": cfg.task,
            "objective": objective_key(cfg),
            "model": model,
            "data": data,
            # subsample changes what pruning compares, like the pruner's settings, not what a value means
            "eval_every": cfg.eval_every.model_dump(
                mode="json", exclude_none=True, exclude={"subsample", "subsample_min_rows"}
            ),
            "train": cfg.train,
            "search_space": {
                name: p.model_dump(mode="json", exclude_defaults=True) for name, p in cfg.search_space.items()
            },
            **_how_trials_run(cfg),
        }
    )


def _how_trials_run(cfg: StudyConfig) -> dict[str, Any]:
    """Settings that change what a trial's value means, when not their defaults (so that studies made before
    them keep their fingerprint): seeds per value, early stopping, and the ranks that make the global batch."""
    out: dict[str, Any] = {}
    if cfg.repeats != 1:
        out["repeats"] = cfg.repeats
    if cfg.early_stopping is not None:
        out["early_stopping"] = cfg.early_stopping.model_dump(mode="json")
    if cfg.resources.processes_per_trial != 1:
        out["processes_per_trial"] = cfg.resources.processes_per_trial
    if cfg.resources.nodes_per_trial != 1:
        out["nodes_per_trial"] = cfg.resources.nodes_per_trial
    return out


def exported(fingerprint: dict[str, Any]) -> dict[str, Any]:
    """What ``hpo best`` writes from the study file rather than from the trial: task, model, data and
    ``train:`` settings (without file digests: the file alone decides these)."""
    out = {k: json.loads(json.dumps(fingerprint.get(k))) for k in ("task", "model", "data", "train")}
    for split in ("train", "eval", "test"):
        (out["data"] or {}).pop(split, None)
    for key in ("files", "tokenizer_files"):
        (out["model"] or {}).pop(key, None)
    return out


def folder_digest(folder: Path) -> dict[str, str]:
    """``{file name: digest}`` of the files transformers loads from a model or tokenizer folder.

    Only the folder's own top-level weights, configs and vocabularies (``MODEL_FILES``): not training
    checkpoints in subfolders, not a study file, storage or outputs kept beside the model, nor what hpo
    wrote there when the folder was also an output folder (:func:`hpo.trial.folders.hpo_files`). Files up to
    ``WHOLE_FILE_BYTES`` are hashed whole; bigger ones (weights) by size and 10 blocks of 1 MiB spread
    over the file: seconds for a 14 GB checkpoint instead of a minute, and new weights (re-initialised,
    fine-tuned, another model) differ in every block.
    """
    out = {}
    written = hpo_files(folder)
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.name.startswith(".") or path.suffix not in MODEL_FILES or path.name in written:
            continue
        size = path.stat().st_size
        digest = hashlib.sha256(str(size).encode())
        with open(path, "rb") as f:
            if size <= WHOLE_FILE_BYTES:
                digest.update(f.read())
            else:
                for k in range(SAMPLED_BLOCKS):
                    f.seek((size - BLOCK_BYTES) * k // (SAMPLED_BLOCKS - 1))
                    digest.update(f.read(BLOCK_BYTES))
        out[path.name] = digest.hexdigest()[:16]
    return out


def changes(old: Any, new: Any, at: str = "") -> list[str]:
    """What differs between two fingerprints, one ``key.path: old → new`` entry per changed leaf."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in [*old, *(k for k in new if k not in old)]:
            path = f"{at}.{key}" if at else str(key)
            if key not in new:
                out.append(f"{path}: removed")
            elif key not in old:
                out.append(f"{path}: added")
            else:
                out += changes(old[key], new[key], path)
        return out
    if old == new:
        return []
    return [f"{at}: {_short(old)} → {_short(new)}"]


def _short(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 40 else text[:16] + "…"


def check(study: optuna.Study, cfg: StudyConfig, new: dict[str, Any], allow_changes: bool) -> int:
    """The revision that ``cfg``'s trials run under in ``study``; records the fingerprint the first time.

    Call it under the storage's setup lock: it reads, then writes, study attributes.

    Raises:
        ConfigError: another objective or direction, or other changes without ``allow_changes``.
    """
    stored = study.user_attrs.get(FINGERPRINT)
    revisions = study.user_attrs.get(REVISIONS, [])
    check_objective(study, cfg)
    if stored is None:  # a new study, or one made before hpo kept fingerprints: its trials are revision 0
        study.set_user_attr(FINGERPRINT, new)
        study.set_user_attr(REVISIONS, [_revision(0, [] if not study.trials else ["fingerprint first recorded"], new)])
        return 0
    changed = changes(stored, new)
    current = revisions[-1]["revision"] if revisions else 0
    if not changed:
        return current
    if not allow_changes:
        listed = "; ".join(changed[:MAX_LISTED]) + (
            f"; and {len(changed) - MAX_LISTED} more" if len(changed) > MAX_LISTED else ""
        )
        key = tuple(changed[0].split(":")[0].split("."))
        raise cfg.error(
            key,
            f"study {cfg.study!r} holds trials run with other settings ({listed}): rerun with "
            "--allow-changes to record them as a new revision, or use a new study name",
        )
    study.set_user_attr(FINGERPRINT, new)
    study.set_user_attr(REVISIONS, [*revisions, _revision(current + 1, changed, new)])
    return current + 1


def check_objective(study: optuna.Study, cfg: StudyConfig) -> None:
    """Refuse ``cfg`` on a study whose trials were ranked by another objective or direction, or trained
    for another task: their values could never be ranked beside the new ones.

    Raises:
        ConfigError: naming both.
    """
    stored = study.user_attrs.get(FINGERPRINT)
    old = stored["objective"] if stored else _legacy_objective(study)
    new = objective_key(cfg)
    if old is not None and old != new:
        raise cfg.error(
            ("objective",),
            f"study {cfg.study!r} ranks its trials by {_objective(old)}; this file "
            f"asks for {_objective(new)}, and values of both cannot be ranked "
            "together: use a new study name",
        )
    old_task = stored["task"] if stored else study.user_attrs.get(CONFIG, {}).get("task")
    if old_task is not None and old_task != cfg.task:
        raise cfg.error(
            ("task",),
            f"study {cfg.study!r} holds {old_task} trials; this file is {cfg.task}, and "
            "losses of two tasks cannot be ranked together: use a new study name",
        )


def _revision(number: int, changed: list[str], fingerprint: dict[str, Any]) -> dict[str, Any]:
    return {
        "revision": number,
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "changes": changed,
        "fingerprint": fingerprint,
    }


def check_trial_settings(study: optuna.Study, cfg: StudyConfig, trial: optuna.trial.FrozenTrial) -> None:
    """Refuse to export ``trial``'s configuration from ``cfg`` when the file's settings differ from the ones
    the trial ran under: ``hpo best`` would write a ``train:`` (or model, or data) it never trained with.

    Raises:
        ConfigError: listing what differs.
    """
    revision = trial_revision(trial)
    ran = next((r.get("fingerprint") for r in study.user_attrs.get(REVISIONS, []) if r["revision"] == revision), None)
    if ran is None:  # a study from before fingerprints: nothing to compare with
        return
    changed = changes(exported(ran), exported(fingerprint(cfg)))
    if changed:
        listed = "; ".join(changed[:MAX_LISTED]) + (
            f"; and {len(changed) - MAX_LISTED} more" if len(changed) > MAX_LISTED else ""
        )
        raise cfg.error(
            tuple(changed[0].split(":")[0].split(".")),
            f"trial {trial.number} ran under revision {revision} of the study, with other settings "
            f"than this file's ({listed}): run this command with that revision's study file",
        )


def objective_key(cfg: StudyConfig) -> dict[str, Any]:
    """What a trial's value means: metric and direction, ``at`` when not the default, and the other objectives.

    Written as studies made before ``at`` and ``objectives`` existed stored it, so that they resume unchanged.
    """
    key: dict[str, Any] = {"metric": cfg.objective.metric, "direction": cfg.objective.direction}
    if cfg.objective.at != "last":
        key["at"] = cfg.objective.at
    if cfg.objectives:
        key["objectives"] = [f"{o.metric} ({o.direction})" for o in cfg.objectives]
    return key


def _objective(objective: dict[str, Any]) -> str:
    extra = "".join(f", {k}: {objective[k]}" for k in ("at", "objectives") if k in objective)
    return f"{objective.get('metric')} ({objective.get('direction')}){extra}"


def _legacy_objective(study: optuna.Study) -> dict[str, Any] | None:
    """The objective of a study made before fingerprints: from its saved config and Optuna's direction."""
    if not study.trials and CONFIG not in study.user_attrs:
        return None
    metric = study.user_attrs.get(CONFIG, {}).get("objective", {}).get("metric", "eval_loss")
    return {"metric": metric, "direction": study.directions[0].name.lower()}


def trial_revision(trial: optuna.trial.FrozenTrial) -> int:
    """The revision a trial ran under (0 for trials from before revisions were kept)."""
    return int(trial.user_attrs.get(REVISION, 0))


def current_revision(study: optuna.Study) -> int:
    """The study file's latest revision (0 until a change was allowed)."""
    return int(study.user_attrs.get(REVISIONS, [{}])[-1].get("revision", 0))
