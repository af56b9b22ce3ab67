"""The corners of a study's space that ``hpo check`` measures: every memory-relevant parameter at its hungriest
value (the largest batch, LoRA ``r`` and ``target_modules``, more bits, gradient checkpointing off), or at its
cheapest, where no trial would break a ``constraints:`` entry there."""

from __future__ import annotations

import math
from typing import Any

from optuna.distributions import BaseDistribution, CategoricalDistribution

from hpo import distributions
from hpo.config import StudyConfig
from hpo.trial import memory
from hpo.trial.plan import lora_target_list

#: How each memory-relevant parameter's choices rank, hungriest last (others take their first choice or low end).
DEMAND = {
    memory.BATCH: lambda v: v,
    "per_device_eval_batch_size": lambda v: v,
    "r": lambda v: v,
    "target_modules": lambda v: math.inf if v == "all-linear" else len(lora_target_list(v)),
    "gradient_checkpointing": lambda v: not v,
    "packing": lambda v: bool(v),  # a flattened batch's attention spans every row's tokens: measured, and checked
    "bits": lambda v: v or 32,
    "num_train_epochs": lambda v: v,
    "max_steps": lambda v: v,
}


def corner(cfg: StudyConfig, hungry: bool) -> dict[str, Any]:
    """The parameters of the hungriest (or cheapest) corner of the space, derived ones computed.

    Each memory-relevant parameter at its hungriest (cheapest) value, the others at their first choice or low
    end. When that point breaks a ``constraints:`` entry (no trial would run it), the hungriest (cheapest) of
    the space's corners that meet every constraint.
    """

    def pick(name: str, d: BaseDistribution) -> Any:
        rank = DEMAND.get(name)
        if isinstance(d, CategoricalDistribution):
            choices = list(d.choices)
            return (max if hungry else min)(choices, key=rank) if rank else choices[0]
        return (d.high if hungry else d.low) if rank else d.low

    def walked(choose) -> dict[str, Any] | None:
        try:
            sampled, derived = distributions.walk(cfg.search_space, cfg.distributions, choose, cfg.train)
        except ValueError:  # a derive that fails there: no trial runs it
            return None
        params = {**sampled, **derived}
        return None if distributions.broken_constraint(cfg.constraint_expressions, {**cfg.train, **params}) else params

    params = walked(pick)
    if params is not None:
        return params
    feasible = [
        p
        for point in distributions.corners(cfg.distributions, n_random=64)
        if (p := walked(lambda name, d, point=point: point[name])) is not None
    ]
    if not feasible:  # validation found a feasible point; these did not: measure the plain corner
        sampled, derived = distributions.walk(cfg.search_space, cfg.distributions, pick, cfg.train)
        return {**sampled, **derived}

    def demand(params: dict[str, Any]) -> tuple:
        return tuple(rank(params[name]) if name in params else 0 for name, rank in DEMAND.items())

    return (max if hungry else min)(feasible, key=demand)
