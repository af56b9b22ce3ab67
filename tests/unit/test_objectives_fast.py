"""Several objectives: what is checked before any trial (the Pareto front of MiniLM fine-tunes is in integration/)."""

import pytest
from conftest import quickstart

import hpo
from hpo.errors import ConfigError


def test_several_objectives_are_checked_before_any_trial(tmp_path):
    two = [{"metric": "eval_loss"}, {"metric": "peak_memory_mb"}]
    for changes, message in [
        ({"objectives": two, "pruner": {"name": "median"}}, "pruner: Optuna cannot prune a study of several"),
        ({"objectives": two, "sampler": {"name": "cmaes"}}, "sampler.name: cmaes optimizes one objective"),
        (
            {"objectives": [{"metric": "eval_loss"}, {"metric": "flops"}]},
            r"objectives\[1\]\.metric: 'flops' is neither",
        ),
        (
            {"objectives": [two[1], two[0]]},
            r"objectives\[0\]\.metric: 'peak_memory_mb' is not reported by sequence-classification \(the first",
        ),
        ({"objectives": two, "objective": {"metric": "eval_loss"}}, "objectives: objective and objectives both set"),
    ]:
        with pytest.raises(ConfigError, match=message):
            hpo.validate(quickstart(tmp_path, **changes))
