"""Memory: a trial's peak, the fallback to smaller micro-batches, and trials that cannot fit (injected, on CPU)."""

import optuna
import pytest
import torch
from optuna.trial import TrialState

from hpo import load_study
from hpo.attrs import OOM_AT, OUT_OF_MEMORY
from hpo.study.loop import StopRule
from hpo.trial import memory


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


def test_workers_per_gpu_fit_the_hungriest_peak_and_a_context_each():
    from hpo.trial.preflight import CheckReport, Corner, workers_per_gpu

    assert workers_per_gpu(80_000, 9_000) == 6  # 80 GB free, 9 GB × 1.25 (the allocator's cache) + 0.6 GB
    assert workers_per_gpu(80_000, 90_000) == 1  # at least one: the trial says when it does not fit
    hungry = Corner("hungriest", {}, 32, 128, 19_000.0, {}, 0.1, 60.0)
    report = CheckReport("s", "cuda", 80_000.0, "free GPU memory", 12, [hungry], 0.0, "")
    assert report.workers_per_gpu == 3 and report.as_json()["workers_per_gpu"] == 3
    assert CheckReport("s", "cpu", 80_000.0, "available memory", 12, [hungry], 0.0, "").workers_per_gpu is None
    ran_out = Corner("hungriest", {}, 32, 128, 90_000.0, {}, 0.0, 0.0, fits=False, ran_out="CUDA out of memory")
    assert CheckReport("s", "cuda", 80_000.0, "free GPU memory", 12, [ran_out], 0.0, "").workers_per_gpu is None


def test_pack_auto_holds_the_base_once_and_each_trials_share_of_the_hungriest_peak(write_study):
    from hpo.trial.preflight import CheckReport, Corner, _pack_size, pack_size

    assert pack_size(80_000, 17_000, 15_000, 32) == 26  # (80 - 15 GB) // (2 GB × 1.25)
    assert pack_size(80_000, 90_000, 15_000, 32) == 1  # at least one: the trial says when it does not fit
    assert pack_size(80_000, 15_010, 15_000, 32) == 32  # at most resources.pack's largest
    hungry = Corner("hungriest", {}, 32, 128, 19_000.0, {}, 0.1, 60.0, base_mb=15_000.0)
    lora = {"name": "m", "lora": {"r": 8}}
    cfg = lambda **changes: load_study(write_study(model=lora, **changes))
    on = lambda device, c=hungry: CheckReport("s", device, 80_000.0, "free GPU memory", 12, [c], 0.0, "")

    k, why = _pack_size(cfg(), on("cuda"))
    assert k == 13 and why.startswith("the base's 14.65 GB once and 3.91 GB per trial at the hungriest corner")
    assert _pack_size(cfg(), on("cpu"))[0] == 1  # measured no faster there
    dropout = {"dropout": {"type": "categorical", "choices": [0.0, 0.1]}}
    assert _pack_size(cfg(search_space=dropout), on("cuda")) == (
        1,
        "search_space.dropout builds the base model more than one way",
    )
    ran_out = Corner("hungriest", {}, 32, 128, 90_000.0, {}, 0.0, 0.0, fits=False, ran_out="CUDA out of memory")
    assert _pack_size(cfg(), on("cuda", ran_out))[0] == 1
    assert _pack_size(load_study(write_study()), on("cuda")) == (None, "")  # no LoRA: no pack
