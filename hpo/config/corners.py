"""``derive:`` and ``constraints:`` evaluated at the corners of the space and at random points, the last step of
validation: what fails there would fail trials an hour into the study."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from optuna.distributions import CategoricalDistribution

from hpo import distributions
from hpo.errors import KeyPath, Problem

if TYPE_CHECKING:
    from hpo.config.models import StudyConfig


#: Valid values of the model-side and LoRA names, searched or derived (training arguments are checked
#: against TrainingArguments and hpo's own ranges, in :func:`hpo.trial.workbench.check_training_arguments`).
_VALUE_RANGES = {
    "dropout": (lambda v: isinstance(v, int | float) and 0 <= v < 1, "a probability in [0, 1)"),
    "lora_dropout": (lambda v: isinstance(v, int | float) and 0 <= v < 1, "a probability in [0, 1)"),
    "r": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0, "a positive whole number (use //)"),
    "lora_alpha": (lambda v: isinstance(v, int | float) and v > 0, "a positive number"),
    "bits": (lambda v: v in (4, 8) and not isinstance(v, bool), "4 or 8"),
}


def expression_problems(cfg: StudyConfig) -> list[Problem]:
    """Evaluate ``derive:`` and ``constraints:`` at the corners of the space and at random points.

    What fails there would fail trials an hour into the study: division by zero, a result too large, a
    derived value outside its target's valid range. Records the derived values seen, for the
    TrainingArguments checks that need transformers.
    """
    found: dict[KeyPath, Problem] = {}
    for name, d in cfg.distributions.items():  # searched values: each end of the range, or every choice
        check = _VALUE_RANGES.get(name)
        values = list(d.choices) if isinstance(d, CategoricalDistribution) else [d.low, d.high]
        bad = next((v for v in values if check and not check[0](v)), None)
        if bad is not None:
            found[("search_space", name)] = cfg.problem(("search_space", name), f"{bad!r}: {name} must be {check[1]}")
    derives = [name for name, p in cfg.search_space.items() if p.expression is not None]
    if not derives and not cfg.constraints:
        return list(found.values())
    seen: dict[str, dict[str, Any]] = {name: {} for name in derives}
    feasible = False
    for point in distributions.corners(cfg.distributions):
        where = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in point.items())
        try:
            sampled, derived = distributions.walk(
                cfg.search_space, cfg.distributions, lambda name, d, point=point: point[name], cfg.train
            )
        except distributions.DeriveError as e:
            key, _, message = str(e).partition(": ")
            path = tuple(key.split("."))
            found.setdefault(path, cfg.problem(path, f"{message} at {where}"))
            continue
        for name, value in derived.items():
            seen[name].setdefault(repr(value), value)
            check = _VALUE_RANGES.get(name)
            if check and not check[0](value):
                found.setdefault(
                    ("search_space", name, "derive"),
                    cfg.problem(
                        ("search_space", name, "derive"), f"gives {value!r} at {where}; {name} must be {check[1]}"
                    ),
                )
        values = {**cfg.train, **sampled, **derived}
        met = True
        for i, c in enumerate(cfg.constraint_expressions):
            try:
                met = c.evaluate(values) is not False and met
            except KeyError:  # reads a parameter inactive here: does not apply
                pass
            except ValueError as e:
                found.setdefault(("constraints", i), cfg.problem(("constraints", i), f"{e} at {where}"))
                met = False
        feasible = feasible or met
    if cfg.constraints and not feasible and not found:
        found[("constraints",)] = cfg.problem(
            ("constraints",),
            "no corner of the space and none of 32 random points meets every constraint: no trial could run",
        )
    for i, entry in enumerate(cfg.enqueue):  # a queued configuration the constraints reject would never run
        try:
            sampled, derived = distributions.walk(
                cfg.search_space, cfg.distributions, lambda name, d, entry=entry: entry[name], cfg.train
            )
            broken = distributions.broken_constraint(cfg.constraint_expressions, {**cfg.train, **sampled, **derived})
        except KeyError:  # a partial entry: the sampler picks the rest
            continue
        except ValueError as e:  # a derive or a constraint fails there
            found.setdefault(("enqueue", i), cfg.problem(("enqueue", i), str(e)))
            continue
        if broken:
            found.setdefault(
                ("enqueue", i),
                cfg.problem(("enqueue", i), f"breaks the constraint {broken!r}: it would be rejected, never trained"),
            )
    cfg._derived_values = {name: list(values.values())[:20] for name, values in seen.items()}
    return list(found.values())
