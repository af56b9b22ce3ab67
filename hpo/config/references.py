"""Checks of the names one key reads from another: a parameter also fixed in ``train:``, ``when:`` and ``derive:``
reading the parameters above them, ``constraints:`` reading the space, ``enqueue:`` entries inside it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from optuna.distributions import BaseDistribution, CategoricalDistribution, IntDistribution

from hpo import optuna_private
from hpo.errors import Problem, did_you_mean

if TYPE_CHECKING:
    from hpo.config.models import StudyConfig
    from hpo.space import Param


def reference_problems(cfg: StudyConfig) -> list[Problem]:
    """The names that ``search_space:``, ``constraints:`` and ``enqueue:`` read, each reported at the key to fix.

    Also rewrites each valid ``enqueue:`` value in the space's own spelling (8.0 for a choice of 8 becomes 8).
    """
    src = cfg._source
    problems = []
    for name in sorted(set(cfg.search_space) & set(cfg.train)):
        problems.append(src.problem(("search_space", name), f"{name!r} is also fixed in train:; keep one"))
    dists = cfg.distributions
    defined: set[str] = set()
    for name, p in cfg.search_space.items():
        problems += _when_problems(cfg, name, p, defined)
        if p.expression is not None:
            missing = sorted(p.expression.names - defined - set(cfg.train))
            if missing:
                problems.append(
                    src.problem(
                        ("search_space", name, "derive"),
                        f"unknown name {missing[0]!r}: derive reads parameters defined above it, or train: settings",
                    )
                )
        defined.add(name)
    for i, c in enumerate(cfg.constraint_expressions):
        missing = sorted(c.names - set(cfg.search_space) - set(cfg.train))
        if missing:
            problems.append(
                src.problem(
                    ("constraints", i), f"unknown name {missing[0]!r}{did_you_mean(missing[0], cfg.search_space)}"
                )
            )
    seen_entries: dict[str, int] = {}
    for i, entry in enumerate(cfg.enqueue):
        for name, value in entry.items():
            if name in cfg.search_space and name not in dists:
                problems.append(src.problem(("enqueue", i, name), "a derived parameter cannot be enqueued"))
            elif name not in dists:
                problems.append(src.problem(("enqueue", i, name), f"not in search_space{did_you_mean(name, dists)}"))
            elif not _contains(dists[name], value):
                problems.append(src.problem(("enqueue", i, name), f"{value!r} is outside the search space"))
            else:  # the space's own spelling: 8.0 for a choice of 8 would reach TrainingArguments as a float
                entry[name] = dists[name].to_external_repr(dists[name].to_internal_repr(value))
        key = repr(sorted(entry.items()))
        if key in seen_entries:
            problems.append(src.problem(("enqueue", i), f"the same configuration as enqueue[{seen_entries[key]}]"))
        seen_entries.setdefault(key, i)
    return problems


def _when_problems(cfg: StudyConfig, name: str, p: Param, defined: set[str]) -> list[Problem]:
    """``name``'s ``when:``: parameters ``defined`` above it, and values they can take."""
    src, dists = cfg._source, cfg.distributions
    problems = []
    for ref, want in (p.when or {}).items():
        if ref not in defined:
            problems.append(
                src.problem(("search_space", name, "when", ref), f"{ref!r} must be a parameter defined above {name!r}")
            )
        elif isinstance(dists.get(ref), CategoricalDistribution):
            unknown = [v for v in (want if isinstance(want, list) else [want]) if v not in dists[ref].choices]
            if unknown:
                problems.append(
                    src.problem(
                        ("search_space", name, "when", ref),
                        f"{unknown[0]!r} is not one of {ref}'s choices {list(dists[ref].choices)}",
                    )
                )
        elif ref in dists:  # a number range: only values it can sample, and never a continuous one
            d = dists[ref]
            if getattr(d, "step", None) is None and not isinstance(d, IntDistribution):
                problems.append(
                    src.problem(
                        ("search_space", name, "when", ref),
                        f"{ref} is continuous: it never equals one value (make it categorical or give it a step)",
                    )
                )
            else:
                unknown = [v for v in (want if isinstance(want, list) else [want]) if not _contains(d, v)]
                if unknown:
                    problems.append(
                        src.problem(
                            ("search_space", name, "when", ref),
                            f"{unknown[0]!r} is not a value {ref} takes ({d.low}..{d.high})",
                        )
                    )
    return problems


def _contains(d: BaseDistribution, value: Any) -> bool:
    return optuna_private.contains(d, value)  # Optuna's own membership test
