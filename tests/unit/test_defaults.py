"""TrainingArguments' defaults in hpo are transformers' own (hpo.knobs.training_default), read, never copied."""

import dataclasses

import pytest
from transformers import TrainingArguments

from hpo import knobs
from hpo.trial.plan import DEFAULT_BATCH

#: The defaults hpo falls back on: its lr scaling, step estimates, seeds and batch sizes
READ = (
    "learning_rate",
    "num_train_epochs",
    "seed",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "max_steps",
)
OWN = {f.name: f.default for f in dataclasses.fields(TrainingArguments)}


def test_the_defaults_hpo_reads_are_training_arguments_own(tmp_path):
    made = TrainingArguments(output_dir=str(tmp_path))  # what a trial that sets none of them trains with
    for name in READ:
        assert knobs.training_default(name) == OWN[name] == getattr(made, name), name
        assert type(knobs.training_default(name)) is type(OWN[name]), name
    assert OWN["per_device_train_batch_size"] == DEFAULT_BATCH
    assert set(READ) <= set(knobs._literal_training_defaults())  # read from the source: no transformers import


def test_every_default_read_from_the_source_is_the_dataclass_own():
    literal = knobs._literal_training_defaults()
    assert len(literal) > 50  # the source's shape is still what the reader expects
    assert {name: OWN[name] for name in literal} == literal
    with pytest.raises(KeyError):
        knobs.training_default("no_such_field")


def test_a_set_value_wins_over_the_default():
    assert knobs.training_value({"seed": 7}, "seed") == 7 and knobs.training_value({}, "seed") == OWN["seed"]
    args, _ = knobs.split({"lr_scaling": "linear", "lr_base_batch_size": 4})  # linear scaling of the defaults
    batch = OWN["per_device_train_batch_size"] * OWN["gradient_accumulation_steps"]
    assert args["learning_rate"] == pytest.approx(OWN["learning_rate"] * batch / 4)
