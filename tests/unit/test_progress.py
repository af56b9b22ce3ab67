"""What a run prints: the summary names the commands that reach the same study."""

import gc
import json

import optuna
import pytest
from conftest import study_dict
from rich.console import Console

from hpo.config import load_study
from hpo.study.progress import Progress, print_summary


def test_the_summary_names_the_environment_that_chose_the_study(tmp_path):
    path = tmp_path / "study.yaml"
    path.write_text(json.dumps(study_dict(tmp_path, environments={"dev": {"study": "tiny-dev"}})))
    study = optuna.create_study()
    study.add_trial(optuna.trial.create_trial(value=0.5, params={}, distributions={}))
    for env, expected in ((None, f"hpo dashboard {path}\n"), ("dev", f"hpo dashboard {path} --env dev\n")):
        console = Console(record=True, width=500)
        print_summary(console, load_study(path, env=env), study)
        assert expected in console.export_text()  # without --env, the dashboard would open another study


def test_the_status_line_stops_however_the_run_ends(tmp_path):
    path = tmp_path / "study.yaml"
    path.write_text(json.dumps(study_dict(tmp_path)))
    progress = Progress(Console(force_terminal=True), load_study(path))

    def interrupted_trial():  # Ctrl-C mid-trial: Optuna runs no callback
        with progress:
            progress.trial_start(0, {})
            assert progress.status._live.is_started
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        interrupted_trial()
    assert not progress.status._live.is_started  # it used to keep drawing "trial 0: training…"


def test_a_callers_frozen_objects_stay_frozen():
    from hpo.study.loop import _frozen_heap

    gc.freeze()
    try:
        with _frozen_heap():
            pass
        # An unfreeze would have thawed the caller's objects too (the count drops to 0). Not an exact count:
        # frozen objects that lose their last reference are freed, and the count falls with them.
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()


def test_the_summary_warns_when_the_best_value_sits_at_the_edge_of_its_range(tmp_path):
    path = tmp_path / "study.yaml"
    path.write_text(json.dumps(study_dict(tmp_path)))
    rate = optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)
    study = optuna.create_study()
    for value, lr in [(0.4, 1.1e-4), (0.6, 1e-3)]:
        study.add_trial(
            optuna.trial.create_trial(value=value, params={"learning_rate": lr}, distributions={"learning_rate": rate})
        )
    console = Console(record=True, width=500)
    print_summary(console, load_study(path), study)
    assert "at the edge: search_space.learning_rate: the best value 0.00011 is at the low end of [0.0001, 0.01]" in (
        console.export_text()
    )


def test_the_summary_says_what_pruning_saved(tmp_path):
    study = optuna.create_study()
    for state, steps, seconds in [("COMPLETE", 100, 10.0), ("PRUNED", 25, 2.5), ("PRUNED", 50, 5.0)]:
        attrs = {"planned_steps": 100, "optimizer_steps": steps, "train_seconds": seconds}
        study.add_trial(
            optuna.trial.create_trial(
                state=optuna.trial.TrialState[state],
                value=0.5 if state == "COMPLETE" else None,
                intermediate_values={steps: 0.9},
                params={},
                distributions={},
                user_attrs=attrs,
            )
        )
    printed = {}
    for pruner in ("median", "none"):
        path = tmp_path / f"{pruner}.yaml"
        path.write_text(json.dumps(study_dict(tmp_path, pruner={"name": pruner})))
        console = Console(record=True, width=500)
        print_summary(console, load_study(path), study)
        printed[pruner] = console.export_text()
    # 175 of 300 steps; the pruned trials would have taken 10 s each: 12.5 s saved of 30 s
    expected = "pruning: 2 of 3 trials stopped early; the study ran 175 of 300 optimizer steps (58%) and saved ~12 s of training (42%)"
    assert expected in printed["median"] and "pruning:" not in printed["none"]
