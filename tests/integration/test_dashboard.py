"""The study in the browser: hpo dashboard in a real Chromium, TensorBoard runs, artifacts, the study note."""

import os
import shutil
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import optuna
import pytest
from procs import WAIT_S, wait_for

from hpo.results.dashboard import exposed

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(os.environ.get("HPO_TEST_ARTIFACTS", Path(__file__).parents[2] / "test-artifacts"))


@pytest.fixture
def study_file(trained_study):
    return trained_study  # read only: the session's trained study (tests/conftest.py)


def test_tensorboard_run_per_trial(study_file):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runs = sorted((study_file.parent / "outputs" / "tiny" / "tensorboard").iterdir())
    assert [r.name for r in runs] == ["trial-0000", "trial-0001", "trial-0002"]
    events = EventAccumulator(str(runs[0]))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/learning_rate", "train/grad_norm", "eval/loss"} <= tags
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{study_file.with_suffix('.db')}")
    eval_steps = [e.value for e in events.Scalars("eval/loss")]
    assert eval_steps == pytest.approx(list(study.trials[0].intermediate_values.values()))


def test_artifacts_and_note(study_file):
    from optuna.artifacts import get_all_artifact_meta
    from optuna_dashboard import get_note

    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{study_file.with_suffix('.db')}")
    for t in study.trials:  # complete and pruned alike
        names = {m.filename for m in get_all_artifact_meta(t, storage=study._storage)}
        assert names == {"config.json", "metrics.json", "training_arguments.json"}, t.number
    assert get_note(study).startswith("## Resolved study file") and "study: tiny" in get_note(study)


def test_only_loopback_is_quiet():
    assert not exposed("127.0.0.1") and not exposed("localhost") and not exposed("::1")
    assert exposed("0.0.0.0") and exposed("192.168.1.10") and exposed("example.org")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_dashboard_in_chromium(trained_copy):  # the dashboard writes the study's note
    study_file = trained_copy
    if not shutil.which(CHROMIUM):
        if os.environ.get("CI"):
            pytest.fail("CI must install chromium (apt) for the browser tests")
        pytest.skip("Debian chromium is not installed")
    from playwright.sync_api import sync_playwright

    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "hpo.cli", "dashboard", str(study_file), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base = f"http://127.0.0.1:{port}/dashboard"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)

    def answers() -> bool:
        if server.poll() is not None:
            pytest.fail(f"hpo dashboard exited with {server.returncode}:\n{server.stdout.read()}")
        try:
            with urllib.request.urlopen(base, timeout=5):
                return True
        except OSError:
            return False

    try:
        wait_for(answers, f"hpo dashboard to answer at {base}")
        with sync_playwright() as p:
            browser = p.chromium.launch(
                executable_path=CHROMIUM,
                timeout=WAIT_S * 1000,
                args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
            )
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(WAIT_S * 1000)  # each wait_for and goto: a loaded machine renders slowly
            page.goto(base)
            page.get_by_text("1. tiny").wait_for()
            page.screenshot(path=str(ARTIFACTS / "dashboard-studies.png"))
            page.get_by_text("1. tiny").click()
            page.get_by_text("tiny (id=1)").first.wait_for()
            page.get_by_text("Best Trial (number=").wait_for()
            page.screenshot(path=str(ARTIFACTS / "dashboard-study.png"))
            page.goto(f"{base}/studies/1/trials")
            page.get_by_text("3 Trials").wait_for()
            body = page.inner_text("body")
            page.screenshot(path=str(ARTIFACTS / "dashboard-trial.png"), full_page=True)
            browser.close()
    finally:
        server.terminate()
        output = server.communicate(timeout=WAIT_S)[0]
    assert f"serving {base}" in output
    assert "Intermediate Values" in body and "\n18 " in f"\n{body}"  # steps are examples seen: 18, 36, ...
    for artifact in ("config.json", "metrics.json", "training_arguments.json"):
        assert artifact in body
