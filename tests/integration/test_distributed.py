"""Multi-process trials (resources.processes_per_trial): gloo on this CPU, real torchrun ranks, real signals."""

import contextlib
import json
import signal
from pathlib import Path

import optuna
import pytest
from conftest import reevaluated, study_dict
from optuna.trial import TrialState
from procs import RUN_S, SLOW_EPOCHS, WAIT_S, alive, slow_study, start, wait_for, wait_for_running
from rich.console import Console

import hpo

TWO = {"processes_per_trial": 2}


def trial_processes(folder: Path) -> list[int]:
    """The pids of the launcher and the ranks (``... -m hpo.study.distributed JOB``) of trials under ``folder``."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if b"hpo.study.distributed" in args and any(str(folder).encode() in a for a in args):
            found.append(int(cmdline.parent.name))
    return [pid for pid in found if alive(pid)]


def same_curves(tiny_model, tmp_path, layouts: dict[str, tuple[int, dict]]) -> tuple[dict, dict]:
    """One trial per layout (``name: (per-device batch, resources)``), the same global batch in each; they train
    the same curve. The rows in order and no dropout: the batches are the same, so the curves are too, up to
    the order of floating-point sums (DDP averages the ranks' gradients)."""
    trials, studies = {}, {}
    for name, (batch, resources) in layouts.items():
        study = study_dict(
            tiny_model,
            study=name,
            n_trials=1,
            resources=resources,
            train={
                "num_train_epochs": 1,
                "seed": 0,
                "per_device_train_batch_size": batch,
                "learning_rate": 3e-3,
                "train_sampling_strategy": "sequential",
            },
            search_space={"dropout": {"type": "categorical", "choices": [0.0]}},
            storage=f"sqlite:///{tmp_path}/{name}.db",
            output_dir=str(tmp_path / name),
        )
        (trials[name],) = hpo.run(study, console=Console(quiet=True)).trials
        studies[name] = study
    first, *others = trials.values()
    for other in others:
        assert other.state == TrialState.COMPLETE
        for key in ("optimizer_steps", "examples_seen"):
            assert other.user_attrs[key] == first.user_attrs[key], key
        assert other.intermediate_values.keys() == first.intermediate_values.keys()  # examples seen, globally
        for step, value in first.intermediate_values.items():
            assert other.intermediate_values[step] == pytest.approx(value, rel=1e-4)
    return trials, studies


def test_a_two_process_trial_trains_what_one_process_does(tiny_model, tmp_path):
    # The same global batch: 4 = 4 × 1 process = 2 × 2 processes.
    trials, studies = same_curves(tiny_model, tmp_path, {"out1": (4, {}), "out2": (2, TWO)})
    one, two = trials["out1"], trials["out2"]
    assert two.user_attrs["processes"] == 2 and one.user_attrs["processes"] == 1
    # Every rank evaluated every eval row: the loss is the true one, as a re-evaluation of the saved model says
    # (the Trainer's own sharded evaluation pads with repeated rows and was 0.3% off here).
    assert two.value == pytest.approx(one.value, rel=1e-5)
    saved = json.loads((tmp_path / "out2" / "best_model" / "hpo_trial.json").read_text())  # staged by rank 0
    assert saved["trial"] == two.number and saved["value"] == two.value
    assert reevaluated(studies["out2"], tmp_path / "out2" / "best_model") == pytest.approx(two.value, rel=1e-5)


def test_a_trial_over_two_nodes_trains_what_two_processes_on_one_do(tiny_model, tmp_path):
    # Two torchrun agents of one process each, meeting at a c10d rendezvous on 127.0.0.1: two "nodes" here.
    nodes = {"nodes_per_trial": 2, "processes_per_trial": 1, "launcher": "local"}
    trials, _ = same_curves(tiny_model, tmp_path, {"within": (2, TWO), "across": (2, nodes)})
    within, across = trials["within"], trials["across"]
    assert across.user_attrs["processes"] == 2 and across.value == pytest.approx(within.value, rel=1e-5)
    saved = json.loads((tmp_path / "across" / "best_model" / "hpo_trial.json").read_text())  # staged by rank 0
    assert saved["trial"] == across.number and saved["value"] == across.value


def test_fsdp_runs_on_cpu_with_gloo_and_rank_0_saves_the_whole_model(tiny_model, tmp_path):
    study = study_dict(
        tiny_model,
        n_trials=1,
        resources=TWO,
        train={"num_train_epochs": 1, "seed": 0, "fsdp": "full_shard", "fsdp_config": {"use_orig_params": True}},
        storage=f"sqlite:///{tmp_path}/fsdp.db",
        output_dir=str(tmp_path / "outputs"),
    )
    (trial,) = hpo.run(study, console=Console(quiet=True)).trials
    assert trial.state == TrialState.COMPLETE, trial.user_attrs.get("fail_reason")
    assert trial.user_attrs["processes"] == 2
    best = tmp_path / "outputs" / "best_model"
    assert reevaluated(study, best) == pytest.approx(trial.value, rel=1e-5)


def test_the_pruners_answer_stops_every_rank_at_the_same_step(tiny_model, tmp_path):
    # A threshold nothing meets: each trial is pruned at its first evaluation. A rank that went on training alone
    # would wait for its peer's gradients; the launcher would end on the timeout and the trial FAIL, not PRUNED.
    study = study_dict(
        tiny_model,
        resources=TWO,
        pruner={"name": "threshold", "upper": 0.0, "min_optimizer_steps": 0},  # at 2 ranks x 8, 2 steps in
        storage=f"sqlite:///{tmp_path}/prune.db",
        output_dir=str(tmp_path / "outputs"),
    )
    trials = hpo.run(study, console=Console(quiet=True)).trials
    assert [t.state for t in trials] == [TrialState.PRUNED] * 2
    assert all(t.user_attrs["pruned_at_step"] == min(t.intermediate_values) for t in trials)


def test_no_rank_outlives_a_killed_worker(write_study, tmp_path):
    path = slow_study(write_study, n_trials=1, resources=TWO)
    proc = start(path)
    wait_for_running(f"sqlite:///{path.with_suffix('.db')}")
    assert len(trial_processes(tmp_path)) == 3  # torchrun and its 2 ranks
    proc.kill()  # SIGKILL: nothing in the worker runs; the kernel tells the launcher, which stops its ranks
    proc.wait(timeout=WAIT_S)
    wait_for(lambda: not trial_processes(tmp_path), "the launcher and every rank to end")


def test_sigterm_checkpoints_every_rank_and_the_rerun_resumes(write_study, tmp_path):
    # The only checkpoint is the one SIGTERM asks for: every rank saves at the same step, then stops. Two ranks
    # train 16 epochs of the tiny model in about 3 s: a busy CI machine once sent the signal after the last one.
    path = slow_study(write_study, n_trials=1, resources=TWO, checkpoint_every={"epochs": 10 * SLOW_EPOCHS})
    storage = f"sqlite:///{path.with_suffix('.db')}"
    proc = start(path)
    wait_for_running(storage)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=WAIT_S)[0]
    assert proc.returncode == 130, output
    assert not trial_processes(tmp_path)
    (stopped,) = optuna.load_study(study_name="tiny", storage=storage).get_trials(states=(TrialState.FAIL,))
    assert stopped.user_attrs["fail_reason"] == "interrupted"
    assert len(stopped.intermediate_values) < SLOW_EPOCHS  # the signal came while it trained
    (checkpoint,) = (tmp_path / "outputs" / "tiny" / "checkpoints").glob("*/checkpoint-*")
    assert (checkpoint / "hpo-complete").exists() and (checkpoint / "rng_state_1.pth").exists()  # rank 1's part

    rerun = start(path)
    output = rerun.communicate(timeout=RUN_S)[0]
    assert rerun.returncode == 0, output
    (done,) = optuna.load_study(study_name="tiny", storage=storage).get_trials(states=(TrialState.COMPLETE,))
    assert done.user_attrs["resumed_from_trial"] == stopped.number and done.user_attrs["processes"] == 2
    assert done.user_attrs["first_step"] == done.user_attrs["resumed_from_step"] + 1
    assert len(done.intermediate_values) == SLOW_EPOCHS


def test_a_sigterm_after_the_ranks_trained_keeps_the_trial(write_study, tmp_path):
    # The signal comes once every evaluation is in: the ranks are staging the model or ending, and the worker has
    # not seen them end (it looks every second). What they finished is kept: the trial COMPLETE, its model staged
    # as the best, and the run stops before the next trial. (Rank 0 used to die staging it, and the worker to
    # throw away a result written: the trial ended "interrupted", to be trained again.)
    epochs = 3
    path = slow_study(write_study, epochs, n_trials=2, resources=TWO)
    storage = f"sqlite:///{path.with_suffix('.db')}"
    proc = start(path)

    def evaluated() -> bool:
        with contextlib.suppress(Exception):  # no storage or study yet
            trials = optuna.load_study(study_name="tiny", storage=storage).trials
            return len(trials[0].intermediate_values) == epochs
        return False

    wait_for(evaluated, "trial 0's every evaluation")
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=WAIT_S)[0]
    assert proc.returncode == 130, output
    first, *rest = optuna.load_study(study_name="tiny", storage=storage).trials
    assert first.state == TrialState.COMPLETE, first.user_attrs.get("fail_reason")
    assert [t.user_attrs.get("fail_reason") for t in rest] in ([], ["interrupted"])  # the next one, if it began
    saved = json.loads((tmp_path / "outputs" / "tiny" / "best_model" / "hpo_trial.json").read_text())
    assert saved["trial"] == first.number and saved["value"] == first.value
    assert not trial_processes(tmp_path)


def test_the_best_of_a_two_process_study_retrains_as_its_trial_ran(tiny_model, tmp_path):
    # hpo train --best runs the trial's launcher: 2 ranks × batch 2, the rows in order and no dropout, so the
    # retrain is the trial again. In one process it took batches of 2: twice the optimizer steps, another model.
    study = study_dict(
        tiny_model,
        n_trials=1,
        resources=TWO,
        train={
            "num_train_epochs": 1,
            "seed": 0,
            "per_device_train_batch_size": 2,
            "learning_rate": 3e-3,
            "train_sampling_strategy": "sequential",
        },
        search_space={"dropout": {"type": "categorical", "choices": [0.0]}},
        storage=f"sqlite:///{tmp_path}/p2.db",
        output_dir=str(tmp_path / "outputs"),
    )
    (trial,) = hpo.run(study, console=Console(quiet=True)).trials
    assert trial.state == TrialState.COMPLETE and trial.user_attrs["processes"] == 2
    folder = hpo.train(study)
    saved = json.loads((folder / "hpo_trial.json").read_text())  # written by the retrain's rank 0
    assert saved["trial"] == trial.number and saved["value"] == pytest.approx(trial.value, rel=1e-5)
    assert reevaluated(study, folder) == pytest.approx(trial.value, rel=1e-5)
    card = (folder / "README.md").read_text()
    assert f"{trial.user_attrs['optimizer_steps']} optimizer steps" in card and "× 2 processes" in card
    assert not list((tmp_path / "outputs").glob(".trial-*"))  # the job folder is gone


def test_a_multi_node_trial_is_one_agent_per_node_at_one_rendezvous(write_study, tmp_path):
    from hpo.api import load
    from hpo.study.distributed import launch_commands

    local = load(write_study(resources={"nodes_per_trial": 2, "processes_per_trial": 2, "launcher": "local"}))
    first, second = launch_commands(local, tmp_path / "job")
    assert first == second and "--nnodes=2" in first and "--nproc-per-node=2" in first
    assert "--rdzv-backend=c10d" in first and any(a.startswith("--rdzv-endpoint=127.0.0.1:") for a in first)
    (srun,) = launch_commands(load(write_study(resources={"nodes_per_trial": 3})), tmp_path / "job")
    assert srun[:5] == ["srun", "--nodes=3", "--ntasks=3", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    (one,) = launch_commands(load(write_study()), tmp_path / "job")
    assert "--standalone" in one and not any(a.startswith("--rdzv") for a in one)
