"""A trial's plan is computed once: what the artifacts, ``hpo best`` and ``hpo train`` save is what the trial ran."""

import json

from conftest import DATA
from rich.console import Console

from hpo import api
from hpo.config import load_study
from hpo.results.export import best_config


def test_what_is_saved_is_what_ran(write_study, tiny_model, tmp_path):
    from hpo.study.loop import run_study

    # A comma-separated target_modules string, and a learning rate that lr_scaling changes: once the trial
    # split the string and scaled the rate while best.model.json recorded the string as written.
    path = write_study(
        n_trials=1,
        model={"name": str(tiny_model), "lora": {"target_modules": "query, value"}},
        train={"num_train_epochs": 1, "seed": 0, "lr_scaling": "linear", "lr_base_batch_size": 16},
        data={"train": str(DATA / "train.csv"), "eval": str(DATA / "eval.csv"), "max_length": 16},
    )
    cfg = load_study(path)
    study = run_study(cfg, Console(quiet=True))
    trial = study.best_trial
    adapter = json.loads((cfg.output_path / "best_model" / "adapter_config.json").read_text())
    args, rest = best_config(cfg, study)
    assert sorted(rest["lora"]["target_modules"]) == sorted(adapter["target_modules"]) == ["query", "value"]
    assert rest["lora"]["r"] == adapter["r"] and rest["lora"]["lora_alpha"] == adapter["lora_alpha"]
    ran = trial.user_attrs["param_groups"][0]["lr"]  # the rate the optimizer had
    assert trial.user_attrs["devices"] == 1  # what lr_scaling counted, for the export
    assert args["learning_rate"] == ran != trial.params["learning_rate"]
    assert args["per_device_train_batch_size"] == trial.params["per_device_train_batch_size"]
    assert api.best(cfg, out=tmp_path / "best.json") == (args, rest)
    assert json.loads((tmp_path / "best.json").read_text()) == args
    assert json.loads((tmp_path / "best.model.json").read_text())["lora"] == rest["lora"]
