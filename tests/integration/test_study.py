"""End to end on a tiny BERT: real Trainer, real SQLite, real pruners."""

import contextlib
import io
import json
import os
import resource
import signal
import sqlite3
import subprocess
import sys

import inprocess
import optuna
import pytest
from inject import broken_weights
from optuna.trial import TrialState
from rich.console import Console

from hpo import load_study
from hpo.study.loop import run_study

quiet = Console(quiet=True)


def test_study_runs_to_n_trials_and_resumes(write_study, storage_url, request):
    name = f"tiny-{request.node.callspec.id}-{id(storage_url)}"  # PostgreSQL is shared by the session
    path = write_study(n_trials=2, storage=storage_url, study=name)
    study = run_study(load_study(path), quiet)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2

    run_study(load_study(path), quiet)  # holds 2 already: adds none
    study = optuna.load_study(study_name=name, storage=storage_url)
    assert len(study.trials) == 2

    run_study(load_study(path, {"n_trials": 3}), quiet)  # raise the target: adds exactly 1
    study = optuna.load_study(study_name=name, storage=storage_url)
    assert len(study.trials) == 3
    assert study.user_attrs["config"]["storage"].startswith(storage_url.split(":")[0])  # storage round-trip


def test_default_storage_is_sqlite_beside_the_study_file(write_study):
    path = write_study(n_trials=1)
    run_study(load_study(path), quiet)
    assert optuna.load_study(study_name="tiny", storage=f"sqlite:///{path.with_suffix('.db')}").trials
    with contextlib.closing(sqlite3.connect(path.with_suffix(".db"))) as db:  # readers never block the writer
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_trial_records_measurements_and_best_model(write_study, tmp_path):
    path = write_study(n_trials=2)
    study = run_study(load_study(path), quiet)
    attrs = study.best_trial.user_attrs
    for key in (
        "best_eval_loss",
        "last_eval_loss",
        "eval_accuracy",
        "eval_f1_macro",
        "optimizer_steps",
        "train_seconds",
        "samples_per_second",
        "peak_memory_mb",
        "device",
    ):
        assert key in attrs, key
    assert attrs["device"] == "cpu"
    assert attrs["last_eval_loss"] == study.best_value
    assert 0 < attrs["seconds_to_first_step"] < attrs["train_seconds"] + 60 and attrs["rss_mb"] > 50
    best = tmp_path / "outputs" / "tiny" / "best_model"
    assert json.loads((best / "hpo_trial.json").read_text())["trial"] == study.best_trial.number
    assert (best / "model.safetensors").exists() and (best / "tokenizer.json").exists()
    config = study.user_attrs["config"]
    assert config["n_trials"] == 2 and config["storage"].startswith("sqlite:///")
    assert (tmp_path / "outputs" / "tiny" / "resolved.yaml").exists()


def test_steps_count_examples_seen_on_one_grid(write_study):
    # 36 train rows, eval every 0.5 epochs = 18 examples: batch 4 and batch 8 x accumulation 2
    # report at the same steps, whatever their number of optimizer steps.
    path = write_study(
        n_trials=2,
        search_space={
            "per_device_train_batch_size": {"type": "categorical", "choices": [4, 8]},
            "gradient_accumulation_steps": {"type": "categorical", "choices": [1, 2]},
        },
        sampler={"name": "grid"},
    )
    study = run_study(load_study(path, {"n_trials": 4}), quiet)
    steps = {tuple(sorted(t.intermediate_values)) for t in study.trials}
    assert steps == {(18, 36, 54, 72)}
    assert {t.user_attrs["optimizer_steps"] for t in study.trials} == {
        18,
        10,
        6,
    }  # 4x1, 4x2 and 8x1, 8x2 (last batch of an epoch is short)


def test_how_often_a_trial_is_evaluated_does_not_change_what_it_trains(write_study):
    # An evaluation drew from torch's global generator (each eval DataLoader's base seed), which then gives the
    # training's dropout masks and the next epoch's shuffle: one configuration and seed ended at one value
    # evaluated 4 times and at another evaluated once.
    config = {"learning_rate": 1e-3, "per_device_train_batch_size": 4}
    values = []
    for every in (0.25, 1.0):
        path = write_study(
            name=f"every-{every}.yaml",
            study=f"every-{every}",
            n_trials=1,
            eval_every={"epochs": every, "subsample": 1.0},
            train={"num_train_epochs": 2, "seed": 0},
            enqueue=[config],
        )
        (trial,) = run_study(load_study(path), quiet).trials
        values.append((trial.value, trial.intermediate_values[max(trial.intermediate_values)]))
    assert values[0] == values[1]


def test_pruner_prunes(write_study):
    # ThresholdPruner(upper=0) prunes every trial at its first report: deterministic.
    path = write_study(n_trials=2, pruner={"name": "threshold", "upper": 0.0})
    study = run_study(load_study(path), quiet)
    assert [t.state for t in study.trials] == [TrialState.PRUNED] * 2
    for t in study.trials:
        assert list(t.intermediate_values) == [18]
        assert t.user_attrs["pruned_at_step"] == 18
    assert not (path.parent / "outputs" / "tiny" / "best_model").exists()


def test_median_pruner_prunes_a_bad_trial(write_study):
    from hpo.study.storage import open_study

    path = write_study(
        n_trials=2,
        pruner={"name": "median", "n_startup_trials": 1},
        search_space={"learning_rate": {"type": "categorical", "choices": [3e-3, 1e-9]}},
    )
    cfg = load_study(path)
    for lr in (3e-3, 1e-9):  # a good trial first, then one that cannot learn
        open_study(cfg).enqueue_trial({"learning_rate": lr})
    study = run_study(cfg, quiet)
    assert [(t.params["learning_rate"], t.state) for t in study.trials] == [
        (3e-3, TrialState.COMPLETE),
        (1e-9, TrialState.PRUNED),
    ]


def test_lora_trials_train_adapters_only(write_study, tiny_model):
    path = write_study(
        n_trials=2,
        search_space={
            "learning_rate": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True},
            "r": {"type": "categorical", "choices": [2, 4]},
            "lora_alpha": {"type": "categorical", "choices": [4, 8]},
        },
        model={"name": str(tiny_model), "lora": {"target_modules": ["query", "value"]}},
    )
    study = run_study(load_study(path), quiet)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2
    for t in study.trials:  # adapters + the new head: a small share of the tiny BERT's ~30k parameters
        assert 0 < t.user_attrs["trainable_parameters"] < 5000
    assert (path.parent / "outputs" / "tiny" / "best_model" / "adapter_config.json").exists()


def test_failure_is_recorded_with_its_cause_and_the_study_goes_on(write_study, tiny_model, tmp_path):
    path = write_study(n_trials=1, max_failures_in_a_row=2, model=str(broken_weights(tiny_model, tmp_path / "m")))
    from hpo.errors import TrialsFailed

    with pytest.raises(TrialsFailed, match="2 trials failed in a row") as stopped:
        run_study(load_study(path), quiet)
    failed = [t for t in stopped.value.study.trials if t.state == TrialState.FAIL]
    assert len(failed) == 2  # stopped after max_failures_in_a_row instead of looping forever
    assert "safetensor" in failed[0].user_attrs["fail_reason"].lower()
    assert failed[0].value is None  # a failure is a state, never a number


def test_every_failure_carries_its_cause(write_study):
    # The derive divides by zero only at a learning rate queued through Optuna (validation checks the file's
    # enqueue: entries, corners and random points): the trial fails at sampling, before training. It used
    # to end FAIL with no reason, printed "interrupted".
    from hpo.study.storage import open_study

    path = write_study(
        n_trials=1,
        search_space={
            "learning_rate": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
            "max_grad_norm": {"derive": "1 / (learning_rate * 1000 - 1) ** 2"},
        },
    )
    cfg = load_study(path)
    open_study(cfg).enqueue_trial({"learning_rate": 0.001})
    console = Console(file=io.StringIO(), width=300)
    study = run_study(cfg, console)
    failed = study.trials[0]
    assert failed.state == TrialState.FAIL
    assert failed.user_attrs["fail_reason"].startswith("DeriveError: search_space.max_grad_norm.derive")
    assert "division by zero" in failed.user_attrs["fail_reason"] and "Traceback" in failed.user_attrs["fail_traceback"]
    output = console.file.getvalue()
    assert "trial   0 failed: DeriveError" in output and "interrupted" not in output
    assert study.trials[1].state == TrialState.COMPLETE  # and the study went on


def test_a_resumed_seeded_study_does_not_replay_its_first_configurations(write_study):
    path = write_study(n_trials=2)  # random sampler, seed 0
    run_study(load_study(path), quiet)
    study = run_study(load_study(path, {"n_trials": 4}), quiet)
    params = [repr(sorted(t.params.items())) for t in study.trials]
    assert len(set(params)) == len(params) == 4, params


def test_a_finished_configuration_is_not_trained_again_until_the_space_is_exhausted(write_study):
    space = {
        "learning_rate": {"type": "categorical", "choices": [1e-3, 1e-2]},
        "per_device_train_batch_size": {"type": "categorical", "choices": [4, 8]},
    }
    path = write_study(n_trials=4, search_space=space)  # 4 configurations in all
    study = run_study(load_study(path), quiet)
    finished = study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))
    assert len({repr(sorted(t.params.items())) for t in finished}) == 4
    for t in study.get_trials(states=(TrialState.FAIL,)):  # repeats were rejected before training
        assert "rejected_duplicate" in t.user_attrs and "train_seconds" not in t.user_attrs
    study = run_study(load_study(path, {"n_trials": 5}), quiet)  # exhausted: a repeat is the only way on
    assert len(study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))) == 5


def test_a_run_stopped_by_failures_exits_non_zero(write_study, tiny_model, tmp_path):
    path = write_study(n_trials=1, max_failures_in_a_row=2, model=str(broken_weights(tiny_model, tmp_path / "m")))
    result = inprocess.hpo("run", path, env={"COLUMNS": "300"})
    assert result.returncode == 1, result.stdout + result.stderr
    assert "no trial completed" in result.stdout and "stopping: 2 trials failed in a row" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr


def test_a_model_that_cannot_be_saved_keeps_its_trial_and_leaves_nothing_behind(write_study, tmp_path):
    # A write that fails as on a full disk (RLIMIT_FSIZE: any file past 8 MiB fails with EFBIG): the 30 MB
    # model cannot be saved; the study file's SQLite and logs stay far smaller.
    from transformers import BertConfig, BertModel, BertTokenizerFast

    from tests.conftest import DATA

    big = tmp_path / "big-bert"
    words = sorted(
        {
            w
            for f in ("train.csv", "eval.csv")
            for line in (DATA / f).read_text().splitlines()[1:]
            for w in line.rsplit(",", 1)[0].split()
        }
    )
    BertTokenizerFast(
        vocab={t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words])}
    ).save_pretrained(big)
    BertModel(
        BertConfig(
            vocab_size=len(words) + 5,
            hidden_size=768,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=768,
            max_position_embeddings=64,
        )
    ).save_pretrained(big)
    path = write_study(n_trials=2, model=str(big), train={"num_train_epochs": 1, "seed": 0})

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write, not a killed process
        resource.setrlimit(resource.RLIMIT_FSIZE, (8 * 2**20, 8 * 2**20))

    result = subprocess.run(
        [sys.executable, "-m", "hpo.cli", "run", str(path)],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "300"},
        timeout=600,
        preexec_fn=limit_file_size,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{path.with_suffix('.db')}")
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2  # the values are kept
    assert "the model was not saved" in study.trials[0].user_attrs["save_error"]
    assert "warning: best_model/ is empty" in result.stdout
    outputs = tmp_path / "outputs" / "tiny"
    assert not [p.name for p in outputs.rglob("*") if p.name.startswith(".") or "staged" in p.name]
    assert not (outputs / "best_model").exists()


def test_a_classifier_with_another_number_of_labels_gets_a_new_head(write_study, tmp_path, tiny_model):
    # The seed article's strict=False case: a 5-label checkpoint fine-tuned on 3-label data.
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    five = tmp_path / "five-labels"
    config = BertConfig.from_pretrained(tiny_model, num_labels=5)
    BertForSequenceClassification(config).save_pretrained(five)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(five)
    study = run_study(load_study(write_study(n_trials=1, model=str(five))), quiet)
    (trial,) = study.trials
    assert trial.state == TrialState.COMPLETE, trial.user_attrs.get("fail_reason")
    report = trial.user_attrs["load_report"]
    assert report["new_heads"] == ["classifier"]
    assert report["mismatched_keys"] == ["classifier.bias: (5,) → (3,)", "classifier.weight: (5, 32) → (3, 32)"]


def test_a_dropped_storage_connection_does_not_fail_the_trial(write_study, fresh_postgres_url, postgres_admin):
    # The server ends every connection of the study mid-trial (a restart, a failover, an idle timeout).
    # It used to fail the trial with Optuna's "invalid data in the commit"; the pool now pings and reconnects.
    from procs import start, wait_for_running

    database = fresh_postgres_url.rsplit("/", 1)[1]
    path = write_study(
        n_trials=1, storage=fresh_postgres_url, train={"num_train_epochs": 20, "seed": 0}, eval_every=1.0
    )
    proc = start(path)
    wait_for_running(fresh_postgres_url)
    ended = postgres_admin.execute(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
        (database,),
    ).fetchone()[0]
    output = proc.communicate(timeout=600)[0]
    assert ended > 0 and proc.returncode == 0, output
    assert "invalid data" not in output
    study = optuna.load_study(study_name="tiny", storage=fresh_postgres_url)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE]


def test_a_run_that_only_rejects_samples_gives_up_and_says_so(write_study):
    # Only the highest learning rate meets the constraint: validation's corners find it feasible, random
    # samples never are. The run gives up after 100 rejections and raises, rather than exiting 0 with nothing.
    from hpo.errors import TrialsFailed

    path = write_study(
        n_trials=1,
        search_space={"learning_rate": {"type": "float", "low": 1e-4, "high": 1e-2}},
        constraints=["learning_rate >= 0.01"],
    )
    with pytest.raises(TrialsFailed, match="100 samples in a row broke the constraints"):
        run_study(load_study(path), quiet)


def test_a_number_that_yaml_reads_as_text_trains_as_the_number(write_study):
    # YAML 1.1 reads 1e-3 (no dot) as the text "1e-3": it validated, then every trial failed on it.
    path = write_study(n_trials=1, train={"num_train_epochs": 1, "seed": 0, "weight_decay": "1e-3"})
    (trial,) = run_study(load_study(path), quiet).trials
    assert trial.state == TrialState.COMPLETE, trial.user_attrs.get("fail_reason")
    assert {g["weight_decay"] for g in trial.user_attrs["param_groups"]} <= {0.001, 0.0}


def test_a_diverged_trial_fails_whatever_the_objective(write_study):
    from hpo.errors import TrialsFailed

    # At a learning rate of 1e30 the weights become NaN; argmax over NaN logits still gives an "accuracy"
    # (the majority class), which was ranked, saved as best_model/ and exported by hpo best.
    path = write_study(
        n_trials=1,
        objective={"metric": "eval_accuracy", "direction": "maximize"},
        train={"num_train_epochs": 1, "seed": 0, "optimizer": "sgd"},
        search_space={"learning_rate": {"type": "categorical", "choices": [1e30]}},
    )
    with pytest.raises(TrialsFailed):
        run_study(load_study(path, {"max_failures_in_a_row": 1}), quiet)
    (trial,) = optuna.load_study(study_name="tiny", storage=f"sqlite:///{path.with_suffix('.db')}").trials
    assert trial.state == TrialState.FAIL and "the model diverged" in trial.user_attrs["fail_reason"]
    assert not (path.parent / "outputs" / "tiny" / "best_model").exists()


def test_a_conditional_space_is_exhausted_at_its_real_size(write_study):
    # optim sgd with two momentums, or adamw without one: 3 configurations, not 2 x 2 = 4. Counting 4,
    # the study never saw the space exhausted and rejected 100 repeats before giving up.
    path = write_study(
        n_trials=5,
        search_space={
            "optim": {"type": "categorical", "choices": ["sgd", "adamw_torch"]},
            "learning_rate": {"type": "categorical", "choices": [1e-3]},
            "adam_beta2": {"type": "categorical", "choices": [0.99, 0.999], "when": {"optim": "adamw_torch"}},
        },
    )
    study = run_study(load_study(path), quiet)
    assert len(study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))) == 5
    assert len({repr(sorted(t.params.items())) for t in study.trials if t.params}) == 3
    assert len(study.get_trials(states=(TrialState.FAIL,))) < 20


def test_a_best_model_whose_value_is_not_the_best_trials_is_flagged(write_study, tmp_path):
    # Two storages with one study name once shared an output folder (a relative storage=... override): the
    # best_model/ of the other's trial 0 passed as this study's trial 0, for the number alone was compared.
    path = write_study(n_trials=1, train={"num_train_epochs": 1, "seed": 0})
    first = inprocess.hpo("run", path, env={"COLUMNS": "300"})
    assert first.returncode == 0 and "warning" not in first.stdout, first.stdout + first.stderr
    saved = tmp_path / "outputs" / "tiny" / "best_model" / "hpo_trial.json"
    info = json.loads(saved.read_text())
    saved.write_text(json.dumps({**info, "value": info["value"] + 0.5}))  # another storage's trial 0
    again = inprocess.hpo("run", path, env={"COLUMNS": "300"})
    assert again.returncode == 0, again.stdout + again.stderr
    assert (
        f"warning: best_model/ holds a trial 0 of value {info['value'] + 0.5}, not this study's trial 0" in again.stdout
    )


def test_training_batches_mix_labels_even_where_length_follows_the_label(write_study, tmp_path):
    import random

    from transformers import TrainerCallback

    from hpo.trial.finetune import run_trial
    from hpo.trial.plan import make_plan
    from hpo.trial.workbench import prepare

    # transformers' group_by_length (hpo's default before) sorts windows of batches longest first: here every
    # "long" row would come before every "short" one of its window, and nearly every batch held one label.
    words = ["hello", "there", "cold", "and", "windy", "please", "rain", "tomorrow", "maybe", "sunny", "day", "today"]
    rng = random.Random(0)
    for split, n in (("train", 64), ("eval", 8)):
        rows = [(" ".join(rng.choices(words, k=8 if i % 2 else 2)), "long" if i % 2 else "short") for i in range(n)]
        (tmp_path / f"{split}.csv").write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in rows))
    data = {"train": str(tmp_path / "train.csv"), "eval": str(tmp_path / "eval.csv"), "max_length": 16}

    def batches(**train) -> list[set]:
        cfg = load_study(write_study(data=data, n_trials=1, train={"num_train_epochs": 1, "seed": 0, **train}))
        labels: list[set] = []

        class Batches(TrainerCallback):
            def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
                labels.extend(set(batch["labels"].tolist()) for batch in train_dataloader)

        params = {"learning_rate": 1e-3, "per_device_train_batch_size": 4}
        run_trial(prepare(cfg), make_plan(cfg, params), optuna.trial.FixedTrial(params), callbacks=[Batches()])
        return labels

    mixed = batches()
    assert len(mixed) == 16 and sum(len(b) > 1 for b in mixed) >= 12, mixed  # 7 in 8 batches of 4, by chance
    grouped = batches(train_sampling_strategy="group_by_length")  # the study file's choice wins
    assert sum(len(b) > 1 for b in grouped) <= 4, grouped
