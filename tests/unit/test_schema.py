"""hpo.config.schema: the JSON Schemas editors read, generated from the typed config — every key explained on hover."""

import pytest

from hpo.config.schema import search_space_schema, study_schema


def properties(node, at="#"):
    """``(key path, property schema)`` of every property under ``node``, ``$defs`` included."""
    if isinstance(node, list):
        return [found for i, item in enumerate(node) for found in properties(item, f"{at}[{i}]")]
    if not isinstance(node, dict):
        return []
    found = [(f"{at}/properties/{name}", prop) for name, prop in node.get("properties", {}).items()]
    return found + [deeper for key, value in node.items() for deeper in properties(value, f"{at}/{key}")]


@pytest.mark.parametrize("schema", [study_schema, search_space_schema], ids=lambda f: f.__name__)
def test_every_property_has_a_description(schema):
    generated = schema()
    found = properties(generated)
    assert len(found) >= (50 if schema is study_schema else 10)  # the walk reaches every model, not the top only
    assert [path for path, prop in found if not prop.get("description")] == []
    assert [name for name, model in generated["$defs"].items() if not model.get("description")] == []


def test_shorthands_keep_the_fields_description():
    props = study_schema()["properties"]
    for key in ("model", "eval_every", "search_space"):  # each is an anyOf of a shorthand and the full form
        assert "anyOf" in props[key] and props[key]["description"] == props[key]["anyOf"][1]["description"], key
