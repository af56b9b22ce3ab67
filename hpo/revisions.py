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

from hpo.config import StudyConfig
from hpo.errors import ConfigError

FINGERPRINT = "fingerprint"  # study user attr: the current revision's fingerprint
REVISIONS = "revisions"  # study user attr: [{"revision", "time", "changes"}], oldest first
REVISION = "revision"  # trial user attr: the revision the trial ran under
MAX_LISTED = 4  # changes named in the one-line refusal


def fingerprint(cfg: StudyConfig, rows: dict[str, int]) -> dict[str, Any]:
    """What makes ``cfg``'s trials comparable, as JSON; ``rows`` are the rows used per split after slicing."""
    data = cfg.data.model_dump(mode="json", exclude={"train", "eval"}, exclude_none=True)
    for split in ("train", "eval"):
        data[split] = {"sha256": file_sha256(getattr(cfg.data, split)), "rows": rows[split]}
    return cfg.masked_data({
        "task": cfg.task,
        "objective": cfg.objective.model_dump(mode="json"),
        "model": cfg.model.model_dump(mode="json", exclude_none=True),
        "data": data,
        "eval_every": cfg.eval_every.model_dump(mode="json", exclude_none=True),
        "train": cfg.train,
        "search_space": {name: p.model_dump(mode="json", exclude_defaults=True) for name, p in cfg.search_space.items()},
    })


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
        study.set_user_attr(REVISIONS, [_revision(0, [] if not study.trials else ["fingerprint first recorded"])])
        return 0
    changed = changes(stored, new)
    current = revisions[-1]["revision"] if revisions else 0
    if not changed:
        return current
    if not allow_changes:
        listed = "; ".join(changed[:MAX_LISTED]) + (f"; and {len(changed) - MAX_LISTED} more"
                                                     if len(changed) > MAX_LISTED else "")
        key = tuple(changed[0].split(":")[0].split("."))
        raise cfg.error(key, f"study {cfg.study!r} holds trials run with other settings ({listed}): rerun with "
                             "--allow-changes to record them as a new revision, or use a new study name")
    study.set_user_attr(FINGERPRINT, new)
    study.set_user_attr(REVISIONS, [*revisions, _revision(current + 1, changed)])
    return current + 1


def check_objective(study: optuna.Study, cfg: StudyConfig) -> None:
    """Refuse ``cfg`` on a study whose trials were ranked by another objective or direction.

    Raises:
        ConfigError: naming both objectives.
    """
    stored = study.user_attrs.get(FINGERPRINT)
    old = stored["objective"] if stored else _legacy_objective(study)
    new = cfg.objective.model_dump(mode="json")
    if old is not None and old != new:
        raise cfg.error(("objective",), f"study {cfg.study!r} ranks its trials by {_objective(old)}; this file "
                                        f"asks for {_objective(new)}, and values of both cannot be ranked "
                                        "together: use a new study name")


def _revision(number: int, changed: list[str]) -> dict[str, Any]:
    return {"revision": number, "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "changes": changed}


def _objective(objective: dict[str, Any]) -> str:
    return f"{objective.get('metric')} ({objective.get('direction')})"


def _legacy_objective(study: optuna.Study) -> dict[str, Any] | None:
    """The objective of a study made before fingerprints: from its saved config and Optuna's direction."""
    if not study.trials and "config" not in study.user_attrs:
        return None
    metric = study.user_attrs.get("config", {}).get("objective", {}).get("metric", "eval_loss")
    return {"metric": metric, "direction": study.direction.name.lower()}


def trial_revision(trial: optuna.trial.FrozenTrial) -> int:
    """The revision a trial ran under (0 for trials from before revisions were kept)."""
    return int(trial.user_attrs.get(REVISION, 0))
