"""Which trials may share a worker's resident base (hpo.trial.resident.key): what is built into the model."""

import pytest

from hpo import load_study
from hpo.trial.plan import make_plan
from hpo.trial.resident import key


@pytest.fixture
def keyed(write_study, tiny_model):
    cfg = load_study(write_study(model={"name": str(tiny_model), "lora": {"r": 4}}))

    def keyed(**train):
        return key(make_plan(cfg, {"learning_rate": 1e-3, **train}), from_config=False)

    return keyed


@pytest.mark.parametrize(
    "setting",
    [
        {"activation_checkpointing": True},  # the Trainer turns it on, never off
        {"gradient_checkpointing": True},  # its deprecated alias
        {"bf16": True},  # accelerate wraps a full fine-tune's forward in the first trial's autocast
        {"use_liger_kernel": True},
    ],
)
def test_a_setting_the_trainer_leaves_on_the_model_is_part_of_the_key(keyed, setting):
    assert keyed(**setting) != keyed() and keyed(**setting) == keyed(**setting)
    assert keyed(per_device_train_batch_size=4) == keyed(), "what only the Trainer uses shares the base"


@pytest.mark.parametrize(
    "setting",
    [
        {"torch_compile": True},
        {"torch_compile_mode": "reduce-overhead"},  # sets torch_compile
        {"neftune_noise_alpha": 5.0},  # its hook stays on the embeddings when training fails
        {"bf16_full_eval": True},  # casts the model in place
        {"fsdp": "full_shard"},
    ],
)
def test_a_setting_that_changes_the_model_for_good_loads_its_own(keyed, setting):
    assert keyed(**setting) is None
