"""What a study leaves for optuna-dashboard to show: artifacts per trial and the study note, written as the run goes."""

from __future__ import annotations

import functools
import importlib.util
import json
import tempfile
import types
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.artifacts import FileSystemArtifactStore, upload_artifact

from hpo.config import StudyConfig


def artifact_store(cfg: StudyConfig) -> FileSystemArtifactStore:
    """The study's artifact store, ``<outputs>/artifacts`` (the dashboard reads the same folder)."""
    folder = cfg.output_path / "artifacts"
    folder.mkdir(parents=True, exist_ok=True)
    return FileSystemArtifactStore(str(folder))


def upload_json(store: FileSystemArtifactStore, trial: optuna.Trial, name: str, data: Any) -> None:
    """Attach ``data`` as ``name`` (JSON) to ``trial``'s page in the dashboard."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
        upload_artifact(artifact_store=store, file_path=str(path), study_or_trial=trial, mimetype="application/json")


def save_study_note(study: optuna.Study, resolved: dict[str, Any], summary_markdown: str | None = None) -> None:
    """The study's dashboard note: the resolved study file and, once a report exists, its summary."""
    body = f"## Resolved study file\n\n```yaml\n{yaml.safe_dump(resolved, sort_keys=False)}```\n"
    if summary_markdown:
        body += f"\n## Report summary\n\n{summary_markdown}\n"
    _note_module().save_note(study, body)


@functools.cache
def _note_module() -> types.ModuleType:
    """optuna-dashboard's ``_note`` module (it imports only optuna), loaded without the package.

    ``import optuna_dashboard`` loads its whole web app, scikit-learn included: 1.4 s of every new
    study's start, measured with cProfile, for a function that writes a few study attributes.
    """
    spec = importlib.util.find_spec("optuna_dashboard")  # finds the package without running its __init__
    path = Path(spec.origin).with_name("_note.py")
    note = importlib.util.module_from_spec(importlib.util.spec_from_file_location("_hpo_optuna_dashboard_note", path))
    note.__spec__.loader.exec_module(note)
    return note
