"""The shipped quickstart, end to end on the packaged MiniLM: 8 of its 12 trials, of one epoch instead of two
(about a minute on 2 CPU cores; the full run's numbers are in docs/performance.md, "The quickstart")."""

from pathlib import Path

import pytest
from optuna.trial import TrialState
from rich.console import Console

from hpo import load_study
from hpo.study.loop import run_study

QUICKSTART = Path(__file__).parents[2] / "studies" / "quickstart.yaml"


@pytest.mark.slow
def test_quickstart_finds_better_configs_and_prunes(tmp_path):
    shorter = {"n_trials": 8, "train.num_train_epochs": 1}
    cfg = load_study(
        QUICKSTART, {**shorter, "storage": f"sqlite:///{tmp_path}/q.db", "output_dir": str(tmp_path / "out")}
    )
    study = run_study(cfg, Console(quiet=True))
    states = [t.state for t in study.trials]
    assert states.count(TrialState.COMPLETE) + states.count(TrialState.PRUNED) >= 8
    assert TrialState.PRUNED in states and TrialState.FAIL not in states
    first = next(t for t in study.trials if t.state == TrialState.COMPLETE)
    assert study.best_value < first.value
    assert (tmp_path / "out" / "best_model" / "model.safetensors").exists()
