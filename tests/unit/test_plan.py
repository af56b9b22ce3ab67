"""A trial's plan is computed once: what the artifacts, ``hpo best`` and ``hpo train`` save is what the trial ran."""

import json

from conftest import study_dict

from hpo import api
from hpo.config import StudyConfig, load_study
from hpo.trial.plan import make_plan


def _config(tmp_path, **changes) -> StudyConfig:
    path = tmp_path / "study.yaml"
    path.write_text(json.dumps(study_dict(tmp_path, **changes)))
    return load_study(path)


def test_the_plan_splits_what_each_library_reads(tmp_path):
    cfg = _config(
        tmp_path,
        model={"name": str(tmp_path), "lora": {"r": 4, "target_modules": "query , value"}},
        train={"num_train_epochs": 1, "optimizer": "sgd", "lr_scheduler_type": "step", "hub_token": "x"},
    )
    plan = make_plan(cfg, {"learning_rate": 0.01, "dropout": 0.2, "lora_alpha": 16})
    assert plan.training_arguments == {
        "num_train_epochs": 1,
        "lr_scheduler_type": "constant",
        "hub_token": "x",
        "learning_rate": 0.01,
    }
    assert (plan.knobs.optimizer, plan.knobs.schedule) == ("sgd", "step")
    assert plan.model_params == {"dropout": 0.2}
    assert plan.lora["target_modules"] == ["query", "value"]  # as peft gets them: a list of module names
    assert (plan.lora["r"], plan.lora["lora_alpha"]) == (4, 16)
    args, rest = plan.exported(cfg)
    assert "hub_token" not in args  # credentials are never exported
    assert rest["lora"] == plan.lora and rest["knobs"] == {"optimizer": "sgd", "schedule": "step"}
    assert make_plan(_config(tmp_path), {"learning_rate": 0.01}).lora is None  # a full fine-tune


def test_lr_scaling_counts_the_devices_the_trial_had(tmp_path):
    cfg = _config(tmp_path, train={"lr_scaling": "linear", "lr_base_batch_size": 8})
    here = make_plan(cfg, {"learning_rate": 0.01, "per_device_train_batch_size": 8})
    assert (here.devices, here.training_arguments["learning_rate"]) == (1, 0.01)  # this machine: CPU, 1 device
    # A trial that ran on 4 GPUs is exported with its own count, whatever the exporting machine has.
    scaled = make_plan(cfg, {"learning_rate": 0.01, "per_device_train_batch_size": 8}, devices=4)
    assert scaled.training_arguments["learning_rate"] == 0.04
    assert make_plan(_config(tmp_path), {"learning_rate": 0.01}).devices is None  # no lr_scaling, nothing counted


def test_lr_scaling_counts_the_ranks_of_a_multi_process_trial(tiny_model):
    # 4 per rank × 2 ranks = 8 = lr_base_batch_size: the rate stays as sampled (it was halved: the machine's
    # device count, 1 here; on an 8-GPU box with 2 ranks it would have been scaled by 8).
    train = {"lr_scaling": "linear", "lr_base_batch_size": 8}
    cfg = api.load(study_dict(tiny_model, train=train, resources={"processes_per_trial": 2}))
    plan = make_plan(cfg, {"learning_rate": 1e-3, "per_device_train_batch_size": 4})
    assert plan.training_arguments["learning_rate"] == 1e-3 and plan.devices == 2
