"""Experiment trackers, for real and offline: MLflow with a local SQLite store, read back through its client."""

from conftest import study_dict
from rich.console import Console

import hpo


def test_mlflow_runs_hold_what_the_study_holds(tiny_model, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    train = {"num_train_epochs": 2, "seed": 0, "report_to": ["mlflow"]}
    studies = [
        hpo.run(
            study_dict(tiny_model, study=name, train=train, storage=f"sqlite:///{tmp_path}/{name}.db", **changes),
            console=Console(quiet=True),
        )
        for name, changes in [
            ("complete", {"output_dir": str(tmp_path / "a")}),
            (
                "pruned",
                {"output_dir": str(tmp_path / "b"), "n_trials": 1, "pruner": {"name": "threshold", "upper": 0.0}},
            ),
        ]
    ]
    client = MlflowClient(uri)
    states = set()
    for study in studies:
        experiment = client.get_experiment_by_name(study.study_name)  # the experiment is the study
        runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
        assert set(runs) == {f"trial-{t.number:04d}" for t in study.trials}
        for trial in study.trials:
            run = runs[f"trial-{trial.number:04d}"]
            assert run.data.params == {k: str(v) for k, v in trial.params.items()}
            assert run.data.tags["hpo.state"] == trial.state.name and run.info.status == "FINISHED"
            history = client.get_metric_history(run.info.run_id, "eval_loss")  # at examples seen, once each
            assert sorted((m.step, m.value) for m in history) == sorted(trial.intermediate_values.items())
            for cost in ("train_seconds", "peak_memory_mb", "optimizer_steps"):
                assert run.data.metrics[cost] == trial.user_attrs[cost]
            states.add(trial.state.name)
    assert states == {"COMPLETE", "PRUNED"}
