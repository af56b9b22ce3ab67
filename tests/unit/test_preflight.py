"""hpo check: the corners it measures, its peak against a real trial's, and its verdict."""

from hpo import load_study
from hpo.trial.corners import corner


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
