"""The output folder: who owns it, checked before a run creates anything, and the best model swapped in."""

from __future__ import annotations

import contextlib
import fcntl
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
from hpo.study.storage import best_trial, orientation, resolved_config
from hpo.trial import folders
from hpo.trial.finetune import TrialResult, replace_folder, save_model
from hpo.trial.folders import OWNER_FILE  # noqa: F401 - where it was first defined
from hpo.trial.workbench import Workbench


def check_paths(cfg: StudyConfig) -> None:
    """Where the study writes must be writable, checked before anything is created there.

    Raises:
        ConfigError: the SQLite file's folder is missing, or the output folder cannot be created, or is not
            hpo's to write in (:func:`hpo.trial.folders.folder_problems`: a folder of the user's, the model's, one
            holding a symlink or a model of someone else's where hpo writes).
    """
    problems = []
    url = make_url(cfg.storage_url)
    if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
        folder = Path(url.database).parent
        if not folder.is_dir():
            problems.append(cfg.problem(("storage",), f"folder not found for the SQLite file: {folder}"))
        elif Path(url.database).is_dir():
            problems.append(cfg.problem(("storage",), f"{url.database} is a folder, not a SQLite file"))
    problems += folders.folder_problems(cfg)  # a folder of the user's is never taken over
    existing = cfg.output_path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        problems.append(cfg.problem(("output_dir",), f"cannot create {cfg.output_path}: {existing} is not a folder"))
    elif not os.access(existing, os.W_OK | os.X_OK):
        problems.append(cfg.problem(("output_dir",), f"cannot create {cfg.output_path}: {existing} is not writable"))
    if problems:
        raise ConfigError(problems)


def prepare(cfg: StudyConfig, study: optuna.Study, resolved: bool = True) -> None:
    """Create the output folder, mark it as this study's, write ``resolved.yaml`` (with ``resolved``), and install
    a best model that a killed process left staged.

    Raises:
        ConfigError: the folder cannot be written.
    """
    try:
        folders.claim(cfg)
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
    trial, which keeps its value; :func:`hpo.trial.finetune.save_model` removes the partial folder.
    """
    if result.model is None:  # a multi-process trial: its rank 0 staged it (hpo.study.distributed)
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
    for old in cfg.output_path.glob(".best_model.old.*"):  # left by a process killed mid-swap (swaps hold the lock)
        old.unlink() if old.is_symlink() else shutil.rmtree(old, ignore_errors=True)
    folder = cfg.output_path / ".staged"
    if not folder.is_dir():
        return
    try:
        best: FrozenTrial | None = best_trial(study)
    except ValueError:
        best = None
    trials = study.get_trials(deepcopy=False)
    for staged in sorted(folder.iterdir()):
        if staged.is_symlink():  # not a model hpo staged: never installed, nor followed
            staged.unlink()
            continue
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
    info = folders.saved_by(cfg.output_path / "best_model")
    return info if folders.is_ours(cfg, info) else None
