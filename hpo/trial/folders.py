"""Which folders and files are hpo's: hpo writes only into an output folder it made, and there only over its own.

An output folder is usable when it does not exist, is empty, or carries ``hpo_study.json`` naming this study
and storage: a folder of the user's (their ``best_model/``, their ``report/``, the model's or the data's
folder) is refused before anything is written, never taken over. Inside an owned folder hpo replaces only
what it wrote: a model folder carrying this study's ``hpo_trial.json``, its reports and exports. A symlink
where hpo would write is refused, never followed or deleted. No torch here: ``hpo report`` and ``hpo best``
check their paths without loading a model.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url

from hpo.config import StudyConfig
from hpo.errors import ConfigError, Problem

OWNER_FILE = "hpo_study.json"  # in the output folder: the study and storage whose outputs it holds
TRIAL_FILE = "hpo_trial.json"  # in a saved model's folder: the study, storage and trial it came from
_CLAIMING = f".{OWNER_FILE}."  # the owner mark while it is written, before it is renamed into place
#: What ``hpo run`` writes in the output folder.
RUN_ENTRIES = (
    OWNER_FILE,
    "resolved.yaml",
    "best_model",
    ".staged",
    "trials",
    "tensorboard",
    "checkpoints",
    "artifacts",
)
MODELS = ("best_model", "final_model")  # replaced whole: only when they carry this study's TRIAL_FILE
#: Files ``hpo best`` writes in the output folder: best.json, picked.json, trial-0007.json, each with <stem>.model.json
EXPORTS = re.compile(r"(best|picked|trial-\d+)(\.model)?\.json")
SHOWN = 3  # entries named when a folder is refused
#: Folders ``hpo run`` and ``hpo train`` fill (a saved model's config.json, a checkpoint): no report goes into them.
_RUNS_OWN = frozenset(RUN_ENTRIES) | frozenset(MODELS)


def ownership(cfg: StudyConfig) -> dict[str, str]:
    return {"study": cfg.study, "storage": cfg.storage_label}


def same_storage(label: object, cfg: StudyConfig) -> bool:
    """Whether a storage label saved in a mark names ``cfg``'s storage: the same database, whoever logs in to it
    and through whichever driver (a reporting role reads the study its owner wrote)."""
    return isinstance(label, str) and _where(label) == _where(cfg.storage_label)


def _where(label: str) -> str:
    try:
        url = make_url(label)
    except Exception:  # noqa: BLE001 - not a URL (a mark written by hand): compared as it is
        return label
    return f"{url.get_backend_name()}://{url.host or ''}:{url.port or ''}/{url.database or ''}"


def owner(folder: Path) -> dict[str, Any] | None:
    """Which study and storage an output folder belongs to: two studies of one name in two storages (two
    study files, the default SQLite beside each) would otherwise mix their models and logs in one folder."""
    try:
        mark = json.loads((folder / OWNER_FILE).read_text())
    except (OSError, ValueError):
        return None
    return mark if isinstance(mark, dict) else None


def saved_by(folder: Path) -> dict[str, Any] | None:
    """A model folder's ``hpo_trial.json``, when the folder (not a symlink) and the file are hpo's."""
    if folder.is_symlink() or not folder.is_dir() or (folder / TRIAL_FILE).is_symlink():
        return None
    try:
        info = json.loads((folder / TRIAL_FILE).read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def is_ours(cfg: StudyConfig, info: dict[str, Any] | None) -> bool:
    """Whether a model's ``hpo_trial.json`` says this study and storage saved it."""
    return (
        isinstance(info, dict)
        and info.get("study") == cfg.study
        and same_storage(info.get("storage", cfg.storage_label), cfg)
    )


def hpo_files(folder: Path) -> set[str]:
    """Files at the top of ``folder`` that hpo wrote as an output folder (none when it is not one): they are
    never a model's files, even where output_dir was the model's own folder."""
    if not (folder / OWNER_FILE).is_file():
        return set()
    return {p.name for p in folder.iterdir() if p.name == OWNER_FILE or EXPORTS.fullmatch(p.name)}


def folder_problems(cfg: StudyConfig, entries: tuple[str, ...] = RUN_ENTRIES) -> list[Problem]:
    """Why hpo may not write ``entries`` (paths relative to the output folder) there; ``[]`` when it may.

    The folder must not exist, be empty, or carry this study's owner mark; it must not be (or hold) the
    model's, the tokenizer's or the data's files or the study file; each entry hpo writes must not be a
    symlink, and a model folder there must be one hpo saved for this study.
    """
    folder = cfg.output_path
    if folder.is_symlink() and not folder.exists():
        return [cfg.problem(("output_dir",), f"{folder} is a symlink to {os.readlink(folder)}, which does not exist")]
    if not folder.is_dir():
        return []  # a new folder (or a file in the way: check_paths says why it cannot be created)
    if role := _whose(cfg, folder):
        return [
            cfg.problem(
                ("output_dir",),
                f"{folder} {role}: hpo would write its outputs among them; set output_dir to a new folder",
            )
        ]
    mark = owner(folder)
    if mark is None and not _legacy(cfg, folder):
        held = _held(cfg, folder)
        if held:
            shown = ", ".join(held[:SHOWN]) + (", …" if len(held) > SHOWN else "")
            return [
                cfg.problem(
                    ("output_dir",),
                    f"{folder} is not empty ({shown}) and hpo did not make it (no {OWNER_FILE}): hpo writes only "
                    "into a new or empty folder, or one it made for this study; set output_dir to another folder",
                )
            ]
    elif mark is not None and (mark.get("study") != cfg.study or not same_storage(mark.get("storage"), cfg)):
        return [
            cfg.problem(
                ("output_dir",),
                f"{folder} holds the outputs of study {mark.get('study')!r} in {mark.get('storage')}; this study is "
                f"in {cfg.storage_label}: set output_dir, or use another study name",
            )
        ]
    return [p for entry in entries if (p := _entry_problem(cfg, folder, Path(entry)))]


def claim(cfg: StudyConfig, *entries: str) -> None:
    """Check that hpo may write ``entries`` in the output folder, then create it and mark it as this study's.

    Raises:
        ConfigError: naming ``output_dir``, from :func:`folder_problems`; nothing is created then.
        OSError: the folder or its mark could not be written.
    """
    if problems := folder_problems(cfg, entries):
        raise ConfigError(problems)
    folder = cfg.output_path
    folder.mkdir(parents=True, exist_ok=True)
    if owner(folder) is None:  # written aside and renamed: a worker never reads half a mark
        tmp = folder / f"{_CLAIMING}{os.getpid()}"
        tmp.write_text(json.dumps(ownership(cfg), indent=2) + "\n")
        os.replace(tmp, folder / OWNER_FILE)


def path_problems(cfg: StudyConfig, *paths: Path) -> list[Problem]:
    """Why hpo may not write the files ``paths``: those in the study's output folder are checked as
    :func:`folder_problems` does; others are where the user chose."""
    entries = _entries(cfg, paths)
    if "" in entries:
        return [cfg.problem(("output_dir",), f"{cfg.output_path} is the output folder itself, not a file in it")]
    for entry in map(Path, entries):  # a report or an export over the run's own records or into its folders
        if str(entry) in (OWNER_FILE, "resolved.yaml") or (len(entry.parts) > 1 and entry.parts[0] in _RUNS_OWN):
            return [
                cfg.problem(
                    ("output_dir",),
                    f"{cfg.output_path / entry} is the run's own ({entry.parts[0]}): hpo writes a report or an "
                    "export beside it, never over or into it; choose another path",
                )
            ]
    return folder_problems(cfg, tuple(entries)) if entries else []


def claim_paths(cfg: StudyConfig, *paths: Path) -> None:
    """Before writing the files ``paths``: :func:`claim` the output folder for those that lie in it.

    Raises:
        ConfigError: from :func:`path_problems`, before anything is created, or the folder or its mark
            could not be written.
    """
    if problems := path_problems(cfg, *paths):
        raise ConfigError(problems)
    if entries := _entries(cfg, paths):
        try:
            claim(cfg, *entries)
        except OSError as e:
            raise cfg.error(("output_dir",), f"cannot write {cfg.output_path}: {e.strerror or e}") from None


def _entries(cfg: StudyConfig, paths: tuple[Path, ...]) -> list[str]:
    """``paths`` that lie in the output folder, relative to it (``""``: the folder itself)."""
    out = []
    for path in paths:
        try:
            entry = Path(os.path.abspath(path)).relative_to(os.path.abspath(cfg.output_path))
        except ValueError:
            continue
        out.append(str(entry) if entry.parts else "")
    return out


def _entry_problem(cfg: StudyConfig, folder: Path, entry: Path) -> Problem | None:
    at = folder
    for part in entry.parts:
        at = at / part
        if at.is_symlink():
            return cfg.problem(
                ("output_dir",),
                f"{at} is a symlink: hpo writes there and never follows or removes a symlink; move it away",
            )
        if not at.exists():
            return None
        if at.name in MODELS and at.parent == folder:
            if not is_ours(cfg, saved_by(at)):
                return cfg.problem(
                    ("output_dir",),
                    f"{at} is not a model hpo saved for study {cfg.study!r} (no {TRIAL_FILE} of it): hpo would "
                    "replace it; move it away",
                )
            return None
        if at != folder / entry and not at.is_dir():
            return cfg.problem(("output_dir",), f"{at} is not a folder: hpo writes {entry} there; move it away")
    return None


def _legacy(cfg: StudyConfig, folder: Path) -> bool:
    """An output folder from before owner marks: its best model says this study saved it."""
    return is_ours(cfg, saved_by(folder / "best_model"))


def _held(cfg: StudyConfig, folder: Path) -> list[str]:
    """What ``folder`` holds, without an owner mark being written and this study's own SQLite file."""
    url = make_url(cfg.storage_url)
    database = url.database if url.get_backend_name() == "sqlite" and url.database else None
    storage = {f"{database}{end}" for end in ("", "-journal", "-wal", "-shm")} if database else set()
    return sorted(
        p.name + ("/" if p.is_dir() else "")
        for p in folder.iterdir()
        if not p.name.startswith(_CLAIMING) and os.path.abspath(p) not in {os.path.abspath(s) for s in storage}
    )


def _whose(cfg: StudyConfig, folder: Path) -> str | None:
    """``is the model's folder (model)``, or ``holds …``, when ``folder`` is, or holds, what the study reads."""
    here = folder.resolve()
    read = [] if cfg.from_dict else [("the study file", None, (cfg.root / cfg.file.name).resolve())]
    for key, what, name in (
        ("model", "the model's folder", cfg.model.name),
        ("model.tokenizer", "the tokenizer's folder", cfg.model.tokenizer),
    ):
        if name and _is_dir(cfg.root / name):
            read.append((what, key, (cfg.root / name).resolve()))
    for split in ("train", "eval", "test"):
        if (file := getattr(cfg.data, split, None)) is not None:
            read.append((f"the {split} data", f"data.{split}", (cfg.root / file).resolve()))
    for what, key, path in read:
        if path == here and key:  # a folder: the model's or the tokenizer's
            return f"is {what} ({key})"
        if here in path.parents:
            return f"holds {what} ({key + ': ' if key else ''}{path})"
    return None


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except (OSError, ValueError):  # a name no folder can have (a NUL, too long): a hub id, checked elsewhere
        return False
