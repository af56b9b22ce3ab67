"""The output folder: who owns it, checked before a run creates anything, and the best model swapped in."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy.engine import make_url

from hpo.attrs import SAVE_ERROR
from hpo.config import StudyConfig
from hpo.errors import ConfigError
from hpo.storage import best_trial, orientation, resolved_config
from hpo.trial import TrialResult, replace_folder, save_model
from hpo.workbench import Workbench

OWNER_FILE = "hpo_study.json"  # in the output folder: the study and storage whose outputs it holds


def check_paths(cfg: StudyConfig) -> None:
    """Where the study writes must be writable, checked before anything is created there.

    Raises:
        ConfigError: the SQLite file's folder is missing, or the output folder cannot be created.
    """
    problems = []
    url = make_url(cfg.storage_url)
    if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
        folder = Path(url.database).parent
        if not folder.is_dir():
            problems.append(cfg.problem(("storage",), f"folder not found for the SQLite file: {folder}"))
        elif Path(url.database).is_dir():
            problems.append(cfg.problem(("storage",), f"{url.database} is a folder, not a SQLite file"))
    owner = _owner(cfg.output_path)
    if owner is not None and owner != _ownership(cfg):
        problems.append(
            cfg.problem(
                ("output_dir",),
                f"{cfg.output_path} holds the outputs of study "
                f"{owner.get('study')!r} in {owner.get('storage')}; this study is in "
                f"{cfg.storage_label}: set output_dir, or use another study name",
            )
        )
    existing = cfg.output_path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        problems.append(cfg.problem(("output_dir",), f"cannot create {cfg.output_path}: {existing} is not a folder"))
    elif not os.access(existing, os.W_OK | os.X_OK):
        problems.append(cfg.problem(("output_dir",), f"cannot create {cfg.output_path}: {existing} is not writable"))
    if problems:
        raise ConfigError(problems)


def _ownership(cfg: StudyConfig) -> dict[str, str]:
    return {"study": cfg.study, "storage": cfg.storage_label}


def _owner(folder: Path) -> dict[str, Any] | None:
    """Which study and storage an output folder belongs to: two studies of one name in two storages (two
    study files, the default SQLite beside each) would otherwise mix their models and logs in one folder."""
    try:
        owner = json.loads((folder / OWNER_FILE).read_text())
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) else None


def prepare(cfg: StudyConfig, study: optuna.Study, resolved: bool = True) -> None:
    """Create the output folder, mark it as this study's, write ``resolved.yaml`` (with ``resolved``), and install
    a best model that a killed process left staged.

    Raises:
        ConfigError: the folder cannot be written.
    """
    try:
        cfg.output_path.mkdir(parents=True, exist_ok=True)
        if _owner(cfg.output_path) is None:
            (cfg.output_path / OWNER_FILE).write_text(json.dumps(_ownership(cfg), indent=2) + "\n")
        if resolved:
            (cfg.output_path / "resolved.yaml").write_text(yaml.safe_dump(resolved_config(cfg), sort_keys=False))
        with _output_lock(cfg.output_path):
            _install_staged_best(cfg, study)
    except OSError as e:
        raise cfg.error(("output_dir",), f"cannot write {cfg.output_path}: {e.strerror or e}") from None


def install_if_best(cfg: StudyConfig, study: optuna.Study, trial: FrozenTrial) -> None:
    """Once a trial's value is stored: if its model was staged, install it when it is the study's best.

    Deciding after the value is stored, under the output folder's lock, is what keeps two workers that
    both beat the old best from leaving the worse model in ``best_model/``.
    """
    if _staged(cfg, trial.number).exists():
        with _output_lock(cfg.output_path):
            _install_staged_best(cfg, study)


def stage_if_best(bench: Workbench, result: TrialResult, params: dict[str, Any], trial: optuna.Trial) -> None:
    """Save the model aside if the trial beats every value stored so far; after its value is stored,
    :func:`install_if_best` decides, under a lock, whether it is the study's best.

    A trial that does not beat the stored best now can never become the best (later values only add
    rivals), so only possible winners are written. A failed save (a full disk) is a warning on the
    trial, which keeps its value; :func:`hpo.trial.save_model` removes the partial folder.
    """
    if result.model is None:  # a multi-process trial: its rank 0 staged it (hpo.distributed)
        return
    study = trial.study
    try:
        best = best_trial(study).values[0]  # with several objectives, best_model/ holds the best on the first
    except ValueError:  # no complete trial yet
        best = None
    sign = orientation(study)
    if best is not None and not sign * result.value < sign * best:
        return
    try:
        save_model(bench, result, params, trial.number, _staged(bench.cfg, trial.number))
    except Exception as e:  # noqa: BLE001 - OSError, or safetensors' own error for the same full disk
        reason = e.strerror if isinstance(e, OSError) and e.strerror else f"{type(e).__name__}: {e}"
        trial.set_user_attr(SAVE_ERROR, bench.cfg.masked(f"the model was not saved: {reason}")[:500])
        with contextlib.suppress(OSError):  # when no other worker stages a model there
            _staged(bench.cfg, trial.number).parent.rmdir()


def _staged(cfg: StudyConfig, number: int) -> Path:
    return cfg.output_path / ".staged" / f"trial-{number:04d}"


@contextlib.contextmanager
def _output_lock(folder: Path):
    """``flock`` on the output folder: one process at a time decides and swaps ``best_model/``."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the flock


def _install_staged_best(cfg: StudyConfig, study: optuna.Study) -> None:
    """Swap the best trial's staged model in as ``best_model/``; drop staged models that lost.

    Runs after each trial's value is stored and when a run starts (a process killed between storing a
    value and installing its model left it staged). Staged models of trials still running stay.
    Call it holding :func:`_output_lock`.
    """
    folder = cfg.output_path / ".staged"
    if not folder.is_dir():
        return
    try:
        best: FrozenTrial | None = best_trial(study)
    except ValueError:
        best = None
    trials = study.get_trials(deepcopy=False)
    for staged in sorted(folder.iterdir()):
        found = re.search(r"trial-(\d+)", staged.name)  # trial-0007, or .trial-0007.tmp.<pid> while being written
        number = int(found.group(1)) if found else -1
        if 0 <= number < len(trials) and trials[number].state == TrialState.RUNNING:
            continue
        if best is not None and number == best.number and staged.name.startswith("trial-"):
            replace_folder(staged, cfg.output_path / "best_model")
        else:
            shutil.rmtree(staged, ignore_errors=True)
    with contextlib.suppress(OSError):
        folder.rmdir()


def saved_trial(cfg: StudyConfig) -> dict[str, Any] | None:
    """What ``<outputs>/best_model`` holds, when it is this study's: its ``hpo_trial.json`` (``trial``, ``value``,
    ``params``)."""
    try:
        info = json.loads((cfg.output_path / "best_model" / "hpo_trial.json").read_text())
    except (OSError, ValueError):
        return None
    if (
        not isinstance(info, dict)
        or info.get("study") != cfg.study
        or info.get("storage", cfg.storage_label) != cfg.storage_label
    ):
        return None
    return info
