"""Config on a real run: enqueued configurations."""

from hpo import load_study


def test_enqueued_configurations_run_first_and_only_once(write_study):
    from optuna.trial import TrialState
    from rich.console import Console

    from hpo.study.loop import run_study

    start = {"learning_rate": 1e-3, "per_device_train_batch_size": 8}
    path = write_study(n_trials=2, enqueue=[start])
    study = run_study(load_study(path), Console(quiet=True))
    assert study.trials[0].params == start
    study = run_study(load_study(path, {"n_trials": 3}), Console(quiet=True))
    assert [t.params == start for t in study.trials] == [True, False, False]
    assert all(t.state == TrialState.COMPLETE for t in study.trials)
