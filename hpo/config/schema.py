"""JSON Schemas for study files and search-space files, generated from the typed config.

Editors use them for completion and red squiggles (``# yaml-language-server: $schema=...``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hpo import space
from hpo.config import StudyConfig

DRAFT = "https://json-schema.org/draft/2020-12/schema"


def study_schema() -> dict[str, Any]:
    """The schema of a study file: the pydantic schema plus the shorthands the loader accepts."""
    schema = StudyConfig.model_json_schema()
    props = schema["properties"]
    # Shorthands that before-validators and the loader expand; pydantic cannot see them. The field's
    # description goes on the outer anyOf too: editors show the outermost one on hover.
    props["model"] = {
        "anyOf": [{"type": "string", "description": "hub id or local folder"}, props["model"]],
        "description": props["model"]["description"],
    }
    props["eval_every"] = {
        "anyOf": [{"type": "number", "exclusiveMinimum": 0, "description": "epochs"}, props["eval_every"]],
        "default": 0.25,
        "description": props["eval_every"]["description"],
    }
    props["search_space"] = {
        "anyOf": [
            {"type": "string", "description": "path to a search-space file"},
            _space_mapping(props["search_space"]),
        ],
        "description": props["search_space"]["description"],
    }
    props["train"]["propertyNames"] = {"enum": sorted(space.training_names() - space.RESERVED_TRAINING_ARGS)}
    return {"$schema": DRAFT, "title": "hpo study file", **schema}


def search_space_schema() -> dict[str, Any]:
    """The schema of a reusable search-space file: ``search_space:``, and an optional ``enqueue:``."""
    study = StudyConfig.model_json_schema()
    return {
        "$schema": DRAFT,
        "title": "hpo search-space file",
        "type": "object",
        "properties": {
            "search_space": _space_mapping(study["properties"]["search_space"]),
            "enqueue": study["properties"]["enqueue"],
        },
        "required": ["search_space"],
        "additionalProperties": False,
        "$defs": {"Param": study["$defs"]["Param"]},
    }


def _space_mapping(base: dict[str, Any]) -> dict[str, Any]:
    return {**base, "propertyNames": {"enum": sorted(space.searchable_names())}}


def write_schemas(folder: Path) -> list[Path]:
    """Write ``study.schema.json`` and ``search_space.schema.json`` into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for name, schema in (("study", study_schema()), ("search_space", search_space_schema())):
        path = folder / f"{name}.schema.json"
        path.write_text(json.dumps(schema, indent=2, sort_keys=True) + "\n")
        out.append(path)
    return out
