"""hpo check: the corners it measures, its peak against a real trial's, and its verdict."""

from rich.console import Console

from hpo import api, load_study
from hpo.trial.preflight import corner, print_report
from tests.conftest import DATA


def test_corners_take_the_hungriest_and_cheapest_memory_values(write_study, tiny_model):
    cfg = load_study(
        write_study(
            model={"name": str(tiny_model), "lora": {}},
            search_space={
                "learning_rate": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
                "per_device_train_batch_size": {"type": "categorical", "choices": [16, 4, 8]},
                "r": {"type": "int", "low": 2, "high": 16},
                "target_modules": {"type": "categorical", "choices": ["query", "all-linear", "query,value"]},
                "gradient_checkpointing": {"type": "categorical", "choices": [True, False]},
                "gradient_accumulation_steps": {"derive": "32 // per_device_train_batch_size"},
            },
        )
    )
    hungry, cheap = corner(cfg, hungry=True), corner(cfg, hungry=False)
    assert hungry == {
        "learning_rate": 1e-4,
        "per_device_train_batch_size": 16,
        "r": 16,
        "target_modules": "all-linear",
        "gradient_checkpointing": False,
        "gradient_accumulation_steps": 2,
    }
    assert (cheap["per_device_train_batch_size"], cheap["r"], cheap["target_modules"]) == (4, 2, "query")
    assert cheap["gradient_checkpointing"] is True and cheap["gradient_accumulation_steps"] == 8


def test_a_corner_that_breaks_a_constraint_gives_way_to_the_hungriest_that_meets_them(write_study, tiny_model):
    cfg = load_study(
        write_study(
            model={"name": str(tiny_model), "lora": {}},
            search_space={
                "per_device_train_batch_size": {"type": "categorical", "choices": [4, 8, 16]},
                "r": {"type": "categorical", "choices": [4, 32]},
            },
            constraints=["per_device_train_batch_size * r <= 128"],
        )
    )
    assert corner(cfg, hungry=True) == {"per_device_train_batch_size": 16, "r": 4}  # the batch ranks first
    assert corner(cfg, hungry=False) == {"per_device_train_batch_size": 4, "r": 4}


def test_a_corner_that_ran_out_of_memory_does_not_fit(write_study):
    from inject import out_of_memory

    with out_of_memory(above_rows=4):  # the hungriest corner's batch of 8 runs out; the cheapest's 4 fits
        report = api.check(write_study())
    hungriest, cheapest = report.corners
    assert hungriest.ran_out.startswith("CUDA out of memory") and not hungriest.fits
    assert cheapest.fits and not report.fits


def test_gradient_checkpointing_shows_in_the_activation_estimate(write_study):
    path = write_study(
        search_space={
            "learning_rate": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
            "gradient_checkpointing": {"type": "categorical", "choices": [False, True]},
        },
    )
    hungriest, cheapest = api.check(path).corners
    assert hungriest.params["gradient_checkpointing"] is False and cheapest.params["gradient_checkpointing"] is True
    assert hungriest.breakdown_mb["activations"] > 1.5 * cheapest.breakdown_mb["activations"]


def test_a_multi_process_study_is_measured_at_its_trials_global_batch(write_study, tmp_path):
    # 2 ranks × micro-batch 4: the trial steps on 8 examples. One process at batch 4 alone would count twice the
    # optimizer steps (and time) per trial; here it accumulates 2 micro-batches per step, at the same memory.
    path = write_study(
        resources={"processes_per_trial": 2},
        train={"num_train_epochs": 2, "seed": 0, "gradient_accumulation_steps": 1},
        search_space={"per_device_train_batch_size": {"type": "categorical", "choices": [4]}},
    )
    report = api.check(path)
    n_train = len((DATA / "train.csv").read_text().strip().splitlines()) - 1  # less the header
    for c in report.corners:
        assert (c.processes, c.micro_batch, c.global_batch) == (2, 4, 8)
        assert c.trial_steps == 2 * -(-n_train // 8)
    out = Console(record=True, width=200)
    print_report(out, report)
    assert (
        "2 ranks measured in one process as 2 accumulation steps of 4: the same global batch of 8" in out.export_text()
    )
    assert not (tmp_path / "study.db").exists()
