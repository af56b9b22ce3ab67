"""Memory: a trial's peak, the fallback to smaller micro-batches, and trials that cannot fit (injected, on CPU)."""

import contextlib

import optuna
import pytest
import torch
from optuna.trial import TrialState
from rich.console import Console

import hpo
from hpo import load_study
from hpo.attrs import MICRO_BATCH, OOM_AT, OOM_RETRIES, OUT_OF_MEMORY
from hpo.study.loop import StopRule, run_study
from hpo.trial import memory

quiet = Console(quiet=True)


def test_micro_batches_divide_the_batch_so_the_effective_batch_stays_exact():
    assert memory.divisors_below(12, 13) == [12, 6, 4, 3, 2, 1]
    assert memory.divisors_below(12, 7) == [6, 4, 3, 2, 1]
    assert memory.divisors_below(5, 3) == [1]
    assert memory.divisors_below(1, 1) == []


def test_a_plan_at_a_smaller_micro_batch_keeps_the_effective_batch():
    from hpo.trial.plan import TrialPlan

    plan = TrialPlan({"per_device_train_batch_size": 12, "gradient_accumulation_steps": 2}, None, {}, None)
    args = memory.with_micro_batch(plan, 3).training_arguments
    assert (args["per_device_train_batch_size"], args["gradient_accumulation_steps"]) == (3, 8)
    assert memory.with_micro_batch(plan, 12) is plan


@pytest.mark.parametrize(
    "a, b, expected",
    [
        ({"r": 16, "learning_rate": 1e-3}, {"r": 8, "learning_rate": 1e-5}, True),  # a rate changes no shape
        ({"r": 8}, {"r": 16}, False),
        ({"gradient_checkpointing": False}, {"gradient_checkpointing": True}, True),
        ({"gradient_checkpointing": True}, {"gradient_checkpointing": False}, False),
        ({"target_modules": "all-linear"}, {"target_modules": "query,value"}, True),
        ({"target_modules": "query"}, {"target_modules": "query,value"}, False),
        ({"bits": 8}, {"bits": 4}, True),
        ({"optimizer": "sgd"}, {"optimizer": "adamw"}, False),  # unknown order: only equal values compare
        ({"r": 8}, {"r": 8, "lora_alpha": 16}, True),  # lora_alpha is a scale
        ({"r": 8}, {"r": 8, "optimizer": "sgd"}, False),
    ],
)
def test_memory_demand_order(a, b, expected):
    assert memory.at_least_as_demanding(a, b) is expected


def test_a_trial_starts_below_what_ran_out_in_an_earlier_trial_of_no_greater_demand():
    earlier = [{"params": {"r": 8}, OOM_AT: [16, 8]}]
    assert memory.start_micro_batch({"r": 16}, 16, earlier) == 4
    assert memory.start_micro_batch({"r": 16}, 12, earlier) == 6  # the largest divisor of 12 below 8
    assert memory.start_micro_batch({"r": 4}, 16, earlier) is None  # needs less: learns nothing
    assert memory.start_micro_batch({"r": 8}, 16, [{"params": {"r": 8}, OOM_AT: [2, 1]}]) == 1  # never untrained


def test_the_cpu_peak_counts_from_the_start_of_the_measurement():
    meter = memory.PeakMeter("cpu")
    block = torch.ones(200 * 2**20 // 4)  # 200 MB, written
    del block
    assert 180 < meter.peak_mb < 260
    meter.reset()
    assert meter.peak_mb < 40


def test_a_checkpoint_folder_is_held_by_one_running_trial(tmp_path):
    from hpo.trial import checkpoints

    folder = tmp_path / "key"
    assert checkpoints.claim(folder, 1, running=lambda n: True)
    assert not checkpoints.claim(folder, 2, running=lambda n: n == 1)  # same parameters, trial 1 still running
    assert checkpoints.claim(folder, 2, running=lambda n: False)  # trial 1 died: its retry takes it over


def test_a_trial_that_ran_out_of_memory_does_not_count_toward_failures_in_a_row():
    stop = StopRule(max_failures=2)
    fail = optuna.trial.create_trial(state=TrialState.FAIL)
    oom = optuna.trial.create_trial(state=TrialState.FAIL, user_attrs={OUT_OF_MEMORY: True})
    for trial in (fail, oom, oom, oom):
        assert not stop.after(trial)
    assert stop.after(fail)


def test_a_run_where_nothing_fits_stops_instead_of_trying_forever():
    from hpo.study.loop import MAX_OUT_OF_MEMORY_IN_A_ROW

    stop = StopRule(max_failures=2)
    oom = optuna.trial.create_trial(state=TrialState.FAIL, user_attrs={OUT_OF_MEMORY: True})
    for _ in range(MAX_OUT_OF_MEMORY_IN_A_ROW - 1):
        assert not stop.after(oom)
    assert "ran out of memory at micro-batch 1" in stop.after(oom)


@contextlib.contextmanager
def out_of_memory(above_rows: int = 10**9, adapter_rank: int | None = None, eval_above_rows: int = 10**9):
    """Raise CUDA's out-of-memory error in training forwards of more than ``above_rows`` rows, in every
    training forward of a LoRA adapter of rank ``adapter_rank`` (a configuration that fits at no micro-batch),
    and in evaluation forwards of more than ``eval_above_rows`` rows.

    A global forward hook of torch: the Trainer, transformers and peft run unchanged.
    """

    def hook(module, inputs):
        if not module.training:
            if isinstance(module, torch.nn.Embedding) and inputs[0].shape[0] > eval_above_rows:
                raise torch.OutOfMemoryError(f"CUDA out of memory (injected at {inputs[0].shape[0]} eval rows)")
            return
        if isinstance(module, torch.nn.Embedding) and inputs[0].shape[0] > above_rows:
            raise torch.OutOfMemoryError(f"CUDA out of memory (injected at {inputs[0].shape[0]} rows)")
        if isinstance(module, torch.nn.Linear) and module.out_features == adapter_rank:
            raise torch.OutOfMemoryError("CUDA out of memory (injected: adapter)")

    handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def test_out_of_memory_trains_again_at_smaller_micro_batches_with_the_same_effective_batch(write_study):
    space = {
        "learning_rate": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
        "per_device_train_batch_size": {"type": "categorical", "choices": [8]},
    }
    reference = run_study(load_study(write_study("ref.yaml", study="ref", search_space=space, n_trials=1)), quiet)
    with out_of_memory(above_rows=2):
        study = run_study(load_study(path := write_study(search_space=space, n_trials=2)), quiet)
    first, second = study.trials
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2
    assert first.user_attrs[OOM_AT] == [8, 4] and first.user_attrs[OOM_RETRIES] == 2
    assert first.user_attrs[MICRO_BATCH] == 2
    # The next trial of the same demand starts at the micro-batch that fit, instead of running out twice again.
    assert second.user_attrs[OOM_RETRIES] == 0 and second.user_attrs[MICRO_BATCH] == 2
    full = reference.trials[0].user_attrs
    for t in study.trials:  # the same optimizer steps and schedule length, evaluated on the same grid
        assert t.user_attrs["optimizer_steps"] == full["optimizer_steps"]
        assert t.user_attrs["planned_steps"] == full["planned_steps"]
        assert sorted(t.intermediate_values) == sorted(reference.trials[0].intermediate_values)
    args, rest = hpo.best(path)  # the sampled batch; the micro-batch it needed beside it, for hpo train --best
    assert args["per_device_train_batch_size"] == 8 and rest["micro_batch"] == 2


def test_a_configuration_that_fits_at_no_micro_batch_fails_and_the_study_goes_on(write_study, tiny_model):
    path = write_study(
        n_trials=2,
        max_failures_in_a_row=1,  # an out-of-memory failure must not stop the run
        model={"name": str(tiny_model), "lora": {"target_modules": ["query", "value"]}},
        search_space={
            "learning_rate": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True},
            "r": {"type": "categorical", "choices": [2, 4]},
        },
        enqueue=[{"r": 4, "learning_rate": 1e-3}, {"r": 4, "learning_rate": 2e-3}, {"r": 2}],
    )
    with out_of_memory(above_rows=2, adapter_rank=4):
        study = run_study(load_study(path), quiet)
    first, second = study.trials[:2]
    assert first.state == TrialState.FAIL and first.user_attrs[OUT_OF_MEMORY] is True
    assert first.user_attrs["fail_reason"].startswith("OutOfMemory: out of memory at micro-batch 1 (peak ")
    assert first.user_attrs[OOM_AT] == [8, 4, 2, 1]  # TrainingArguments' batch of 8, halved down to 1
    # The same demand again starts at micro-batch 1, where the first ran out last, instead of at 8.
    assert second.state == TrialState.FAIL and second.user_attrs[OOM_AT] == [1]
    assert len([t for t in study.trials if t.state == TrialState.COMPLETE]) == 2


def test_quantized_weights_need_a_cuda_device_then_bitsandbytes_said_in_one_line(write_study, tiny_model):
    from hpo.errors import ConfigError
    from hpo.trial.workbench import check_quantization

    cfg = load_study(write_study(model={"name": str(tiny_model), "lora": {}, "quantization": {"bits": 4}}))
    with pytest.raises(ConfigError, match=r"model\.quantization: 4- and 8-bit weights need a CUDA GPU") as e:
        check_quantization(cfg, cuda=False)
    assert len(e.value.problems) == 1
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        with pytest.raises(
            ConfigError, match=r"needs bitsandbytes, which is not installed: pip install 'hpo\[qlora\]'"
        ):
            check_quantization(cfg, cuda=True)
    searched = load_study(
        write_study(
            model={"name": str(tiny_model), "lora": {}},
            search_space={
                "learning_rate": {"type": "float", "low": 1e-4, "high": 1e-2},
                "bits": {"type": "categorical", "choices": [4, 8]},
            },
        )
    )
    with pytest.raises(ConfigError, match=r"search_space\.bits: 4- and 8-bit"):
        check_quantization(searched, cuda=False)
    from hpo.trial.plan import make_plan

    plan = make_plan(searched, {"learning_rate": 1e-3, "bits": 8})
    assert plan.quantization == {"bits": 8, "type": "nf4", "double_quant": True, "compute_dtype": "bfloat16"}
    assert "bits" not in plan.model_params and plan.exported(searched)[1]["quantization"]["bits"] == 8


def test_gradient_checkpointing_trains_lora_adapters(write_study, tiny_model):
    from safetensors.torch import load_file

    path = write_study(
        n_trials=1,
        model={"name": str(tiny_model), "lora": {"target_modules": ["query", "value"]}},
        train={"num_train_epochs": 1, "seed": 0, "gradient_checkpointing": True},
    )
    study = run_study(load_study(path), quiet)
    assert study.trials[0].state == TrialState.COMPLETE
    adapter = load_file(path.parent / "outputs" / "tiny" / "best_model" / "adapter_model.safetensors")
    lora_b = [t for name, t in adapter.items() if "lora_B" in name]
    assert lora_b and all(t.abs().sum() > 0 for t in lora_b)  # B starts at zero: only gradients move it


def test_an_evaluation_that_runs_out_of_memory_halves_the_eval_batch_not_the_training_one(write_study):
    with out_of_memory(eval_above_rows=3):  # 6 eval rows, 64 at a time: fits at batches of 2 (64 → 32 → … → 2)
        study = run_study(load_study(write_study(n_trials=2)), quiet)
    first, second = study.trials
    assert first.user_attrs[OOM_RETRIES] == 5  # 64 → 32 → 16 → 8 → 4 → 2
    assert second.user_attrs[OOM_RETRIES] == 0  # it starts at the eval batch that fitted in the first
    for trial in study.trials:
        assert trial.state == TrialState.COMPLETE and trial.user_attrs["eval_batch"] == 2
        assert OOM_AT not in trial.user_attrs
        assert trial.user_attrs[MICRO_BATCH] == trial.params["per_device_train_batch_size"]
