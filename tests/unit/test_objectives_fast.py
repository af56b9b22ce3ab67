"""Several objectives: what is checked before any trial (the Pareto front of MiniLM fine-tunes is in integration/)."""

from pathlib import Path

import pytest
import yaml

import hpo
from hpo.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def quickstart(tmp_path: Path, **changes) -> dict:
    """The quickstart study as a dict: its data and model, 96 rows, one epoch, no objective: of its own."""
    study = yaml.safe_load((ROOT / "studies" / "quickstart.yaml").read_text())
    for key in ("environments", "objective", "pruner"):
        study.pop(key)
    study["data"] = {**study["data"], "max_train_rows": 96}
    study["data"].update({k: str(ROOT / "studies" / study["data"][k]) for k in ("train", "eval")})
    study["train"] = {**study["train"], "num_train_epochs": 1}
    study.update(storage=f"sqlite:///{tmp_path}/q.db", output_dir=str(tmp_path / "out"), **changes)
    return study


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
