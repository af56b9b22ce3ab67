"""``finalists:``: the trials that may end among the best N by the objective are also judged by what they generate.

Pruning and the objective stay on the cheap metric (eval loss, every evaluation); generation runs once per trial,
only for a trial that can still end in the top N when it finishes. Its scores are recorded on the trial and rank the
finalists beside the objective's ranking (``hpo best``, ``hpo report``).
"""

from __future__ import annotations

import importlib
import importlib.machinery
import inspect
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, NonNegativeFloat, PositiveInt, model_validator

from hpo.config.strict import Strict

#: Scores hpo computes itself: exact match (after stripping spaces) and rouge-score's F-measures.
BUILTIN = ("exact_match", "rouge1", "rouge2", "rougeL")


class Generate(Strict):
    """How each finalist generates (transformers' ``generate``: batched, with the KV cache)."""

    max_new_tokens: PositiveInt = Field(64, description="Tokens generated per prompt, at most.")
    temperature: NonNegativeFloat = Field(0.0, description="0: greedy decoding (the same text every run).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling's share, with temperature over 0.")
    num_beams: PositiveInt = Field(1, description="Beam search's beams (1: none).")
    batch_size: PositiveInt = Field(16, description="Prompts generated at once.")
    max_rows: PositiveInt | None = Field(
        None, description="Generate on this many rows only, the shortest (default: every row of the set)."
    )


class Finalists(Strict):
    """``finalists:``: generation-scored finalists."""

    top: PositiveInt = Field(3, description="How many of the best trials by the objective are finalists.")
    split: Literal["eval", "test"] = Field(
        "eval",
        description="The rows whose prompts they generate on: data.eval's "
        "or data.test's (each row's last learned span is its reference).",
    )
    generate: Generate = Field(Generate(), description="Decoding settings.")
    metrics: list[str] = Field(
        ["exact_match"],
        min_length=1,
        description="Scores of the generations against the references, higher is better: "
        + ", ".join(BUILTIN)
        + ", or a function of yours, 'module:function' (predictions, references) -> float, importable from the "
        "study file's folder.",
    )
    rank_by: str | None = Field(None, description="The metric that ranks the finalists (default: the first).")

    def settings(self) -> dict[str, Any]:
        """What a finalist's scores depend on: scores made otherwise are not ranked beside them."""
        return self.model_dump(mode="json", include={"split", "generate", "metrics"})

    @model_validator(mode="after")
    def _rank_by(self) -> Finalists:
        if self.rank_by is None:
            self.rank_by = self.metrics[0]
        elif self.rank_by not in self.metrics:
            raise ValueError(f"rank_by: {self.rank_by!r} is not one of metrics ({', '.join(self.metrics)})")
        return self


def scorer(name: str, root: Path) -> Callable[[list[str], list[str]], float]:
    """The user function ``name`` ('module:function'), imported with the study's folder ``root`` first on the path;
    a module of that name imported before from elsewhere (another study's folder) is imported again from here.

    Raises:
        ValueError: it cannot be imported, is not callable, or does not take (predictions, references): the message
            says which, in one line.
    """
    module, _, function = name.partition(":")
    if not module or not function:
        raise ValueError(f"{name!r}: one of {', '.join(BUILTIN)}, or 'module:function'")
    top = module.partition(".")[0]
    here = importlib.machinery.PathFinder.find_spec(top, [str(root)])
    cached = sys.modules.get(top)
    if here is not None and cached is not None and getattr(cached, "__file__", None) != here.origin:
        for loaded in [m for m in sys.modules if m == top or m.startswith(top + ".")]:
            del sys.modules[loaded]
    sys.path.insert(0, str(root))
    try:
        found = getattr(importlib.import_module(module), function)
    except AttributeError:
        raise ValueError(f"{name!r}: module {module!r} has no {function!r}") from None
    except (Exception, SystemExit) as e:  # noqa: BLE001 - the user's module failed to import: its error, in one line
        why = (str(e).strip().splitlines() or [""])[0][:200]
        raise ValueError(f"{name!r}: importing {module!r} failed: {type(e).__name__}: {why}") from None
    finally:
        sys.path.remove(str(root))
    if not callable(found):
        raise ValueError(f"{name!r} is not a function")
    try:
        inspect.signature(found).bind([], [])
    except TypeError:
        raise ValueError(f"{name!r} does not take (predictions, references)") from None
    except ValueError:  # no signature to read (a builtin): called as it is
        pass
    return found
