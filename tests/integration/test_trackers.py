"""Experiment trackers, for real and offline: MLflow with a local SQLite store read back through its client,
and W&B in offline mode, its run files read back record by record. No network."""

import contextlib
import io
import json
import signal
import struct
import subprocess
from pathlib import Path

import optuna
import pytest
from conftest import study_dict
from optuna.trial import TrialState
from procs import WAIT_S, start, wait_for
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
    console = Console(record=True, width=300, file=io.StringIO())
    studies = [
        hpo.run(
            study_dict(tiny_model, study=name, train=train, storage=f"sqlite:///{tmp_path}/{name}.db", **changes),
            console=console,
        )
        for name, changes in [
            ("complete", {"output_dir": str(tmp_path / "a")}),
            (
                "pruned",
                {"output_dir": str(tmp_path / "b"), "n_trials": 1, "pruner": {"name": "threshold", "upper": 0.0}},
            ),
        ]
    ]
    assert f"mlflow ui --backend-store-uri {uri}" in console.export_text()  # the store holds the study
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
            assert run.data.tags["hpo.trial"] == str(trial.number)  # a tag's name, not a module's: the move kept it
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


class SilentServer:
    """An HTTP server on 127.0.0.1 that answers the paths ending in one of ``answers`` with ``{}`` and never answers
    any other request: it reads it, records it in ``hung``, and holds the connection open. A tracking server that
    went silent (a hung proxy, a stopped VM): the connection is accepted and no reply ever comes."""

    def __init__(self, answers: tuple[str, ...] = ()):
        import http.server
        import threading

        self.hung: list[str] = []
        self.asked = threading.Event()  # a request is being held
        self.release = threading.Event()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                if self.path.split("?")[0].endswith(answers):
                    body = b"{}"
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                server.hung.append(self.path)
                server.asked.set()
                server.release.wait()  # until the test ends: never a reply

            do_POST = do_GET

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def silent_server():
    servers = []

    def make(answers: tuple[str, ...] = ()) -> SilentServer:
        servers.append(SilentServer(answers))
        return servers[-1]

    yield make
    for server in servers:
        server.close()


def finished(proc: subprocess.Popen, timeout: float) -> str:
    """The output of ``proc`` once it exits; fails the test, and kills it, if it runs past ``timeout`` s."""
    try:
        return proc.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        proc.kill()
        output = proc.communicate()[0]
        pytest.fail(f"hpo run still running after {timeout:.0f} s; its output:\n{output[-3000:]}")


@pytest.mark.parametrize("server", ["refused", "silent"])
def test_an_unreachable_mlflow_is_one_warning_and_the_study_trains_untracked(write_study, silent_server, server):
    # refused: nothing listens on port 1, a connection fails at once. silent: a server that accepts and never
    # answers; MLflow's own defaults would wait 120 s a request, 8 times, per call (each trial hung for minutes).
    uri = "http://hpo:s3cret@127.0.0.1:1" if server == "refused" else silent_server().url
    path = write_study(train={"num_train_epochs": 1, "seed": 0, "report_to": "mlflow"})
    proc = start(path, MLFLOW_TRACKING_URI=uri, HPO_TRACKER_TIMEOUT_S="3")
    output = finished(proc, WAIT_S + 60)  # a trial here trains in seconds: minutes means a tracker held it up
    assert proc.returncode == 0, output
    warnings = [line for line in output.splitlines() if "mlflow:" in line and "untracked" in line]
    assert len(warnings) == 1 and "not tracked" not in output, output  # once, not once per trial
    assert "s3cret" not in output and "mlflow ui" not in output and "\nmlflow:" not in output, output
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{path.with_suffix('.db')}")
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2


def test_an_unreachable_wandb_server_is_one_warning_and_the_study_trains_untracked(write_study, tmp_path):
    # W&B online with its server refused: wandb.init retried for its init_timeout (90 s) each trial, a warning each.
    path = write_study(train={"num_train_epochs": 1, "seed": 0, "report_to": "wandb"})
    env = {"WANDB_MODE": "online", "WANDB_BASE_URL": "http://127.0.0.1:1", "WANDB_API_KEY": "0" * 40}
    env |= {"WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true", "WANDB_ERROR_REPORTING": "false"}
    proc = start(path, HPO_TRACKER_TIMEOUT_S="3", **env)
    output = finished(proc, WAIT_S + 60)
    assert proc.returncode == 0, output
    warnings = [line for line in output.splitlines() if "wandb:" in line and "untracked" in line]
    assert len(warnings) == 1 and "not tracked" not in output, output
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{path.with_suffix('.db')}")
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_during_a_tracker_call_that_hangs_ends_the_run_at_once(write_study, silent_server, sig):
    # The server answers the probe, then holds the trial's first call: a server that went silent mid-run.
    server = silent_server(answers=("experiments/search",))
    path = write_study(train={"num_train_epochs": 1, "seed": 0, "report_to": "mlflow"})
    storage = f"sqlite:///{path.with_suffix('.db')}"
    proc = start(path, MLFLOW_TRACKING_URI=server.url, HPO_TRACKER_TIMEOUT_S="600")  # a call waits its whole time

    def held_in_a_trial():
        if not server.asked.is_set():
            return False
        with contextlib.suppress(KeyError):
            return optuna.load_study(study_name="tiny", storage=storage).get_trials(states=(TrialState.RUNNING,))

    wait_for(held_in_a_trial, "a trial's tracker call to hang")
    proc.send_signal(sig)
    output = finished(proc, 60)  # before: the signal waited for the call, 8 x 120 s
    assert proc.returncode == 130, output
    study = optuna.load_study(study_name="tiny", storage=storage)
    (trial,) = study.get_trials(states=(TrialState.FAIL,))
    assert trial.user_attrs["fail_reason"] == "interrupted"
    assert not study.get_trials(states=(TrialState.RUNNING,))


def test_a_store_mlflow_refuses_is_one_warning_and_no_ui_hint(tiny_model, tmp_path, monkeypatch, recwarn):
    # MLflow 3 refuses a file store ("maintenance mode"): the summary offered `mlflow ui` for a store never written.
    store = tmp_path / "mlruns"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.as_uri())
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    console = Console(record=True, width=200, file=io.StringIO())
    train = {"num_train_epochs": 1, "seed": 0, "report_to": ["mlflow"]}
    where = {"storage": f"sqlite:///{tmp_path}/s.db", "output_dir": str(tmp_path / "out")}
    study = hpo.run(study_dict(tiny_model, train=train, **where), console=console)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2
    messages = [str(w.message) for w in recwarn if str(w.message).startswith("mlflow:")]
    assert len(messages) == 1 and "untracked" in messages[0], messages
    summary = console.export_text()
    assert "mlflow ui" not in summary and "tensorboard --logdir" in summary, summary
    assert not store.exists()
