"""Packed LoRA trials (hpo.trial.pack): a trial trained in a pack reports what it reports alone, to 1e-4.

Dropout 0 everywhere (the base's and the adapters'): a pack's dropout masks are drawn for all its rows at once, so
only then are the curves the same number for number. The members differ in what a pack lets them differ in: the
learning rate, the batch size, the accumulation, the weight decay, the LoRA rank and alpha.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import shutil
import signal

import optuna
import pytest
import torch
from conftest import DATA, TINY_GPT2, reevaluated, study_dict
from optuna.trial import TrialState
from procs import RUN_S, WAIT_S, slow_study, start, wait_for, wait_for_running, wait_until_stale
from rich.console import Console

import hpo
from hpo import load_study
from hpo.trial import memory, pack
from hpo.trial.finetune import run_trial
from hpo.trial.lanes import owner
from hpo.trial.memory import release
from hpo.trial.plan import make_plan
from hpo.trial.workbench import prepare

NO_DROPOUT = {"dropout": {"type": "categorical", "choices": [0.0]}}
SPACE = {
    **NO_DROPOUT,
    "learning_rate": {"type": "float", "low": 1e-4, "high": 1e-2},
    "per_device_train_batch_size": {"type": "categorical", "choices": [2, 4, 8]},
    "gradient_accumulation_steps": {"type": "categorical", "choices": [1, 2]},
    "r": {"type": "categorical", "choices": [2, 4, 8]},
    "lora_alpha": {"type": "categorical", "choices": [8, 16]},
    "weight_decay": {"type": "categorical", "choices": [0.0, 0.1]},
}
MEMBERS = [
    {"learning_rate": 5e-3, "per_device_train_batch_size": 4, "r": 4, "lora_alpha": 16},
    {"learning_rate": 2e-3, "per_device_train_batch_size": 8, "r": 8, "lora_alpha": 8, "weight_decay": 0.1},
    {"learning_rate": 1e-3, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2, "r": 2},
    {"learning_rate": 8e-3, "per_device_train_batch_size": 4, "r": 4, "lora_alpha": 8},
]


def _classifier(write_study, tiny_model):
    lora = {"target_modules": ["query", "value"], "r": 4, "lora_dropout": 0.0}
    return load_study(
        write_study(
            model={"name": str(tiny_model), "lora": lora},
            train={"num_train_epochs": 2, "seed": 0},
            search_space=SPACE,
        )
    )


def _lm(write_study, tokenizer):
    return load_study(
        write_study(
            task="causal-lm",
            model={"config": TINY_GPT2, "tokenizer": str(tokenizer), "lora": {"r": 4, "lora_dropout": 0.0}},
            objective={"metric": "eval_loss"},
            data={"train": str(DATA / "train.csv"), "eval": str(DATA / "eval.csv"), "max_length": 32},
            train={"num_train_epochs": 2, "seed": 0, "label_smoothing_factor": 0.1},  # smoothed over shifted labels
            search_space=SPACE,
        )
    )


def _roberta(write_study, tokenizer):
    # RoBERTa's classifier head is a module of its own (dense, dropout, out_proj), not one Linear
    config = {"architecture": "roberta", "num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 2}
    config.update(intermediate_size=64, max_position_embeddings=80)
    return load_study(
        write_study(
            model={"config": config, "tokenizer": str(tokenizer), "lora": {"r": 4, "lora_dropout": 0.0}},
            train={"num_train_epochs": 2, "seed": 0},
            search_space=SPACE,
        )
    )


TASKS = {
    "classifier": lambda write_study, bert, bpe: _classifier(write_study, bert),
    "lm": lambda write_study, bert, bpe: _lm(write_study, bpe),
    "roberta": lambda write_study, bert, bpe: _roberta(write_study, bpe),
}


def _params(p: dict) -> dict:
    return {"dropout": 0.0, "gradient_accumulation_steps": 1, "lora_alpha": 16, "weight_decay": 0.0, **p}


def _curve(result) -> list[tuple[int, float]]:
    if isinstance(result, BaseException):
        raise result
    curve = [(h["step"], h["eval_loss"]) for h in result.history]
    release(result)
    return curve


def _alone(cfg, members, trials) -> list:
    out = []
    for p, trial in zip(members, trials, strict=True):
        out.append(_curve(run_trial(prepare(cfg), make_plan(cfg, _params(p)), trial)))
    return out


def _packed(cfg, members, trials, size: int | None = None) -> tuple[list, pack.Pack]:
    bench = prepare(cfg)
    group = pack.Pack(cfg.task, bench.tokenizer.pad_token_id)
    work = [
        (f"trial-{i}", lambda p=p, t=t: run_trial(bench, make_plan(cfg, _params(p)), t))
        for i, (p, t) in enumerate(zip(members, trials, strict=True))
    ]
    results = pack.run(group, work, size)
    return [_curve(results[name]) for name, _ in work], group


def _same(packed: list, alone: list) -> None:
    for mine, theirs in zip(packed, alone, strict=True):
        assert [s for s, _ in mine] == [s for s, _ in theirs]
        assert [v for _, v in mine] == pytest.approx([v for _, v in theirs], abs=1e-4)


@pytest.mark.parametrize(("task", "size"), [("classifier", 2), ("classifier", 4), ("lm", 2), ("lm", 4), ("roberta", 2)])
def test_a_packed_trial_reports_what_it_reports_alone(write_study, tiny_model, tiny_bpe_tokenizer, task, size):
    cfg = TASKS[task](write_study, tiny_model, tiny_bpe_tokenizer)
    members = MEMBERS[:size]
    fixed = [optuna.trial.FixedTrial(_params(p)) for p in members]
    packed, group = _packed(cfg, members, fixed)
    _same(packed, _alone(cfg, members, fixed))
    # one forward for every member's micro-batch at a time: as many as the member with the most has
    rows = len(prepare(cfg).train_rows)
    assert group.passes == max(2 * math.ceil(rows / p["per_device_train_batch_size"]) for p in members)


def test_a_pruned_member_leaves_the_pack_and_the_others_train_on_as_alone(write_study, tiny_model):
    cfg = _classifier(write_study, tiny_model)
    members = MEMBERS[:3]

    def trials() -> list[optuna.Trial]:  # a threshold between the members' first evaluations prunes two of them
        study = optuna.create_study(pruner=optuna.pruners.ThresholdPruner(upper=1.1))
        return [study.ask() for _ in members]

    packed, _ = _packed(cfg, members, trials())
    alone = _alone(cfg, members, trials())
    _same(packed, alone)
    assert sorted(len(c) for c in alone)[0] == 1 < max(len(c) for c in alone)  # one pruned at once, one not


def test_a_member_takes_the_place_of_one_that_ended(write_study, tiny_model):
    # Three members two at a time: the third joins the pack mid-way, when the shortest of the first two ends.
    cfg = _classifier(write_study, tiny_model)
    members = [MEMBERS[1], MEMBERS[0], MEMBERS[3]]  # 10, 18 and 18 micro-batches
    fixed = [optuna.trial.FixedTrial(_params(p)) for p in members]
    packed, group = _packed(cfg, members, fixed, size=2)
    _same(packed, _alone(cfg, members, fixed))
    assert group.passes == 10 + 18  # 10 together; the third beside the second's last 8, then its own last 10


def test_a_member_resumes_from_its_checkpoint_as_alone(write_study, tiny_model, tmp_path):
    # A trial stopped after its first epoch (its checkpoint there kept, the later one removed) resumes in a pack
    # and trains the rest of the curve it trains alone.
    lora = {"target_modules": ["query", "value"], "r": 4, "lora_dropout": 0.0}
    cfg = load_study(
        write_study(
            model={"name": str(tiny_model), "lora": lora},
            train={"num_train_epochs": 2, "seed": 0},
            search_space=SPACE,
            checkpoint_every={"epochs": 1},
        )
    )
    first, other = _params(MEMBERS[0]), _params(MEMBERS[1])
    saved = tmp_path / "checkpoints"
    alone = _curve(run_trial(prepare(cfg), make_plan(cfg, first), optuna.trial.FixedTrial(first), checkpoint_dir=saved))
    *earlier, last = sorted(saved.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    shutil.rmtree(last)
    assert earlier  # the first epoch's

    bench = prepare(cfg)
    work = [
        (
            "trial-0",
            lambda: run_trial(bench, make_plan(cfg, first), optuna.trial.FixedTrial(first), checkpoint_dir=saved),
        ),
        ("trial-1", lambda: run_trial(bench, make_plan(cfg, other), optuna.trial.FixedTrial(other))),
    ]
    results = pack.run(pack.Pack(cfg.task, bench.tokenizer.pad_token_id), work)
    resumed = _curve(results["trial-0"])
    assert resumed and len(resumed) < len(alone)
    _same([resumed], [alone[-len(resumed) :]])
    _same([_curve(results["trial-1"])], _alone(cfg, [MEMBERS[1]], [optuna.trial.FixedTrial(other)]))


def test_the_base_comes_out_of_packs_unchanged(write_study, tiny_model):
    # Members named as parts of the model's module paths ("query", "classifier": peft matches adapter names as
    # substrings, so the pack names the adapters); the base's frozen weights come out of two packs as they went in.
    cfg = _classifier(write_study, tiny_model)
    bench = prepare(cfg)
    members = MEMBERS[:2]
    fixed = [optuna.trial.FixedTrial(_params(p)) for p in members]
    group = pack.Pack(cfg.task, bench.tokenizer.pad_token_id)
    work = [
        (name, lambda p=p, t=t: run_trial(bench, make_plan(cfg, _params(p)), t))
        for name, p, t in zip(["query", "classifier"], members, fixed, strict=True)
    ]
    base = bench.resident
    pack.run(group, work[:1])  # loads the base, which stays resident
    before = _digest(base.loaded[0])
    results = pack.run(group, work)
    _same([_curve(results[name]) for name, _ in work], _alone(cfg, members, fixed))
    assert base.loads == 1 and _digest(base.loaded[0]) == before
    # and it stayed frozen when a lane left while the other trained on (what stays trainable is the adapters')
    assert not [n for n, p in base.loaded[0].named_parameters() if p.requires_grad and owner(n) is None]


def test_a_lane_that_trains_again_trains_as_alone(write_study, tiny_model):
    # An out-of-memory retry or the other seeds of `repeats` train again in the same lane: a fresh adapter each time.
    cfg = _classifier(write_study, tiny_model)
    bench = prepare(cfg)
    first, other = _params(MEMBERS[0]), _params(MEMBERS[1])
    twice = lambda: [run_trial(bench, make_plan(cfg, first), optuna.trial.FixedTrial(first)) for _ in range(2)]
    results = pack.run(
        pack.Pack(cfg.task, bench.tokenizer.pad_token_id),
        [("again", twice), ("other", lambda: run_trial(bench, make_plan(cfg, other), optuna.trial.FixedTrial(other)))],
    )
    alone = _alone(cfg, [MEMBERS[0]], [optuna.trial.FixedTrial(first)])
    _same([_curve(r) for r in results["again"]], alone * 2)


class _Tight(pack.Pack):
    """A pack on a device whose memory holds one lane's pass: a packed forward of more runs out, as CUDA's would."""

    def _forward(self, batches):
        if len(batches) > 1:
            self.crowded.append(len(batches))
            raise torch.OutOfMemoryError(f"CUDA out of memory (a test's device: a pass of {len(batches)} lanes)")
        return super()._forward(batches)


def test_a_pack_that_runs_out_of_memory_holds_fewer_trials_before_any_trains_smaller(write_study, tiny_model):
    # Three trials in a pack whose every packed pass runs out: the pack shrinks to 2, then 1 (the others parked
    # until a lane ends), each trial trains again at its own micro-batch (none halved), and reports what it
    # reports alone.
    cfg = _classifier(write_study, tiny_model)
    bench = prepare(cfg)
    members = MEMBERS[:3]
    fixed = [optuna.trial.FixedTrial(_params(p)) for p in members]
    group = _Tight(cfg.task, bench.tokenizer.pad_token_id)
    group.crowded, retries = [], []

    def trial(p, t):
        plan = make_plan(cfg, _params(p))
        fitted = memory.fit(
            plan,
            lambda at, meter: run_trial(bench, at, t, meter=meter),
            bench.device,
            on_retry=lambda *a: retries.append(a),
        )
        result, micro, ran_out, _ = fitted
        assert (micro, ran_out) == (p["per_device_train_batch_size"], [])
        return result

    work = [(f"trial-{i}", lambda p=p, t=t: trial(p, t)) for i, (p, t) in enumerate(zip(members, fixed, strict=True))]
    results = pack.run(group, work)
    _same([_curve(results[name]) for name, _ in work], _alone(cfg, members, fixed))
    assert group.limit == 1 and group.crowded == [3, 2]  # then every pass of one lane: none ran out
    # every lane of the pass of 3 trained again, then both of the pass of 2; no micro-batch ran out
    shrunk = [why.split(":")[0] for _, why in retries]
    assert (
        shrunk
        == ["a pack of 3 ran out of memory, now at most 2 at once"] * 3
        + ["a pack of 2 ran out of memory, now at most 1 at once"] * 2
    )
    assert all(ran_out == [] for ran_out, _ in retries)


def _digest(model) -> str:
    """A digest of the base's own weights (no adapter, no head copy)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if "lora_" not in name and "modules_to_save" not in name:
            digest.update(name.encode() + tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def test_hpo_run_packs_its_trials_and_finds_what_one_at_a_time_finds(tiny_model, tmp_path):
    # resources.pack: 2 in a study file: the same trials (a seeded sampler), the same values and test metrics, the
    # best adapter staged.
    def study(name: str, k: int) -> dict:
        lora = {"target_modules": ["query", "value"], "r": 4, "lora_dropout": 0.0}
        space = {key: SPACE[key] for key in ("dropout", "learning_rate", "per_device_train_batch_size")}
        return study_dict(
            tiny_model,
            study=name,
            n_trials=4,
            model={"name": str(tiny_model), "lora": lora},
            search_space=space,
            resources={"pack": k},
            data={"train": str(DATA / "train.csv"), "eval": str(DATA / "eval.csv"), "test": str(DATA / "eval.csv")}
            | {"max_length": 16},
            storage=f"sqlite:///{tmp_path}/{name}.db",
            output_dir=str(tmp_path / name),
        )

    one, packed = (hpo.run(study(name, k), console=Console(quiet=True)) for name, k in (("one", 1), ("packed", 2)))
    for a, b in zip(one.trials, packed.trials, strict=True):
        assert (b.state, b.params) == (TrialState.COMPLETE, a.params)
        assert b.value == pytest.approx(a.value, abs=1e-4)
        assert b.user_attrs["packed"] and not a.user_attrs["packed"]
        # the test set, evaluated in the lane (here the eval rows again: the value)
        assert b.user_attrs["test_metrics"]["test_loss"] == pytest.approx(
            a.user_attrs["test_metrics"]["test_loss"], abs=1e-4
        )
    saved = json.loads((tmp_path / "packed" / "best_model" / "hpo_trial.json").read_text())
    assert (saved["trial"], saved["value"]) == (packed.best_trial.number, packed.best_value)
    # the staged adapter is the one the best trial trained: evaluated again, it scores its value
    assert reevaluated(study("packed", 2), tmp_path / "packed" / "best_model") == pytest.approx(
        packed.best_value, rel=1e-5
    )


def test_sigterm_stops_every_lane_of_a_packed_run(write_study, tiny_model):
    # Each lane stops at its next safe point: both running trials end "interrupted" (queued again), none RUNNING.
    model = {"name": str(tiny_model), "lora": {"target_modules": ["query", "value"], "r": 4}}
    path = slow_study(write_study, n_trials=4, resources={"pack": 2}, model=model)
    storage = f"sqlite:///{path.with_suffix('.db')}"
    proc = start(path)
    wait_for_running(storage, n=2)  # both lanes past their first evaluation
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=WAIT_S)[0]
    assert proc.returncode == 130, output
    trials = optuna.load_study(study_name="tiny", storage=storage).trials
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    stopped = [t for t in trials if t.state == TrialState.FAIL]
    assert len(stopped) == 2 and {t.user_attrs["fail_reason"] for t in stopped} == {"interrupted"}


@pytest.mark.parametrize(
    ("pack_size", "space", "said"),
    [
        ("auto", {}, "resources.pack: auto falls back to one trial at a time: on the CPU a pack trains no faster"),
        (
            2,
            {"dropout": {"type": "categorical", "choices": [0.0, 0.1]}},
            "resources.pack: 2 falls back to one trial at a time: search_space.dropout builds the base model more "
            "than one way",
        ),
    ],
)
def test_a_run_that_cannot_pack_trains_one_at_a_time_and_says_so_once(tiny_model, tmp_path, pack_size, space, said):
    lora = {"target_modules": ["query", "value"], "r": 4}
    out = io.StringIO()
    study = hpo.run(
        study_dict(
            tiny_model,
            model={"name": str(tiny_model), "lora": lora},
            search_space={"learning_rate": SPACE["learning_rate"], **space},
            resources={"pack": pack_size},
            storage=f"sqlite:///{tmp_path}/s.db",
            output_dir=str(tmp_path / "out"),
        ),
        console=Console(file=out, width=300),
    )
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2
    assert not any(t.user_attrs["packed"] for t in study.trials)
    assert out.getvalue().count(said) == 1, out.getvalue()


def test_a_killed_packed_run_loses_no_trial_and_its_rerun_resumes_each_from_its_checkpoint(write_study, tiny_model):
    # SIGKILL: no handler runs, both lanes' trials stay RUNNING. Once stale, the rerun fails them and retries each
    # with its parameters, in a pack again, from its own checkpoint; the study ends with n_trials finished.
    # Dropout 0: a packed trial's masks are drawn for the whole pass, so with dropout the steps after the
    # checkpoint would be trained again with other masks than before the kill.
    lora = {"target_modules": ["query", "value"], "r": 4, "lora_dropout": 0.0}
    space = {**NO_DROPOUT, "learning_rate": SPACE["learning_rate"]}
    path = slow_study(
        write_study,
        n_trials=2,
        search_space=space,
        resources={"pack": 2},
        model={"name": str(tiny_model), "lora": lora},
        heartbeat_interval=1,
        grace_period=3,
        checkpoint_every={"epochs": 4},
    )
    storage = f"sqlite:///{path.with_suffix('.db')}"
    proc = start(path)
    folder = path.parent / "outputs" / "tiny" / "checkpoints"
    wait_for(lambda: len({p.parts[-3] for p in folder.glob("*/checkpoint-*/hpo-complete")}) == 2, "both checkpoints")
    proc.kill()
    proc.wait(timeout=WAIT_S)
    victims = optuna.load_study(study_name="tiny", storage=storage).get_trials(states=(TrialState.RUNNING,))
    assert len(victims) == 2
    for v in victims:
        wait_until_stale(storage, "tiny", v.number, heartbeat_interval=1, grace_period=3)

    rerun = start(path)
    output = rerun.communicate(timeout=RUN_S)[0]
    assert rerun.returncode == 0, output
    study = optuna.load_study(study_name="tiny", storage=storage)
    assert {study.trials[v.number].state for v in victims} == {TrialState.FAIL}
    retries = {t.user_attrs["resumed_from_trial"]: t for t in study.get_trials(states=(TrialState.COMPLETE,))}
    assert sorted(retries) == sorted(v.number for v in victims)
    for v in victims:
        retry = retries[v.number]
        assert retry.params == v.params and retry.user_attrs["packed"]
        assert retry.user_attrs["resumed_from_step"] > 0
        kept = {s: x for s, x in v.intermediate_values.items() if s in retry.intermediate_values}
        assert kept and [retry.intermediate_values[s] for s in kept] == pytest.approx(list(kept.values()), abs=1e-4)
