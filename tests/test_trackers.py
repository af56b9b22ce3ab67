"""Experiment trackers, for real and offline: MLflow with a local SQLite store read back through its client,
and W&B in offline mode, its run files read back record by record. No network."""

import json
import struct
from pathlib import Path

from conftest import study_dict
from rich.console import Console

import hpo


def wandb_records(path: Path):
    """The protobuf records of a W&B run file (``run-ID.wandb``): a LevelDB-style log of 32 KiB blocks, each record
    split into chunks with a 7-byte header (CRC, length, type: 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    pos, chunks = 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        chunks = chunk if kind in (1, 2) else chunks + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunks)
            yield record


def key(item) -> str:
    return item.key or "/".join(item.nested_key)


def wandb_run(folder: Path) -> dict:
    """A W&B offline run folder as {name, group, project, config, history: {step: metrics}, summary, exit}."""
    (path,) = folder.glob("run-*.wandb")
    run = {"history": {}, "summary": {}}
    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.update(name=record.run.display_name, group=record.run.run_group, project=record.run.project)
            run["config"] = {key(i): json.loads(i.value_json) for i in record.run.config.update if key(i) != "_wandb"}
        elif kind == "history":
            items = {key(i): json.loads(i.value_json) for i in record.history.item}
            run["history"][record.history.step.num] = {k: v for k, v in items.items() if not k.startswith("_")}
        elif kind == "summary":
            run["summary"].update({key(i): json.loads(i.value_json) for i in record.summary.update})
        elif kind == "exit":
            run["exit"] = record.exit.exit_code
    return run


def test_mlflow_and_wandb_runs_hold_what_the_study_holds(tiny_model, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    for name, value in {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true"}.items():
        monkeypatch.setenv(name, value)
    train = {"num_train_epochs": 2, "seed": 0, "report_to": ["mlflow", "wandb"]}
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
    wandb_runs = {(r["project"], r["name"]): r for r in map(wandb_run, (tmp_path / "wandb").glob("offline-run-*"))}
    states = set()
    for study in studies:
        experiment = client.get_experiment_by_name(study.study_name)  # the experiment is the study
        runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
        assert set(runs) == {f"trial-{t.number:04d}" for t in study.trials}
        for trial in study.trials:
            name = f"trial-{trial.number:04d}"
            run = runs[name]
            assert run.data.params == {k: str(v) for k, v in trial.params.items()}
            assert run.data.tags["hpo.state"] == trial.state.name and run.info.status == "FINISHED"
            history = client.get_metric_history(run.info.run_id, "eval_loss")  # at examples seen, once each
            assert sorted((m.step, m.value) for m in history) == sorted(trial.intermediate_values.items())
            for cost in ("train_seconds", "peak_memory_mb", "optimizer_steps"):
                assert run.data.metrics[cost] == trial.user_attrs[cost]

            offline = wandb_runs[(study.study_name, name)]  # the project and the group are the study
            assert offline["group"] == study.study_name and offline["config"] == trial.params
            assert {step: m["eval_loss"] for step, m in offline["history"].items()} == trial.intermediate_values
            assert offline["summary"]["hpo.state"] == trial.state.name and offline["exit"] == 0
            assert offline["summary"]["train_seconds"] == trial.user_attrs["train_seconds"]
            states.add(trial.state.name)
    assert states == {"COMPLETE", "PRUNED"}
    assert len(wandb_runs) == sum(len(s.trials) for s in studies)
