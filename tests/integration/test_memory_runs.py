"""Memory: a trial's peak, the fallback to smaller micro-batches, and trials that cannot fit (injected, on CPU)."""

from inject import out_of_memory
from optuna.trial import TrialState
from rich.console import Console

import hpo
from hpo import load_study
from hpo.attrs import MICRO_BATCH, OOM_AT, OOM_RETRIES, OUT_OF_MEMORY
from hpo.study.loop import run_study

quiet = Console(quiet=True)


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
