"""Shared test parts: a tiny random-init BERT with an offline tokenizer, and study files."""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path
from typing import ClassVar

import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs two pytest workers (xdist): one core each, not two
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported; the processes a test starts inherit it

DATA = Path(__file__).parent / "data"


def build_tiny_bert(folder: Path) -> Path:
    """Save a 2-layer, hidden-32 BERT with a WordPiece tokenizer built from the test data into ``folder``."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    words = sorted(
        {
            w
            for f in ("train.csv", "eval.csv")
            for line in (DATA / f).read_text().splitlines()[1:]
            for w in line.rsplit(",", 1)[0].split()
        }
    )
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    BertTokenizerFast(vocab={token: i for i, token in enumerate(vocab)}).save_pretrained(folder)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        initializer_range=0.2,
    )
    torch.manual_seed(0)  # the same tiny model every run: test outcomes must not depend on luck
    BertModel(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """The tiny BERT of :func:`build_tiny_bert`, built once per session."""
    return build_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def tiny_bpe_tokenizer(tmp_path_factory) -> Path:
    """A byte-level BPE tokenizer (GPT-2 style, 300 tokens) trained on the test texts in milliseconds."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    texts = [line.rsplit(",", 1)[0] for f in ("train.csv", "eval.csv") for line in (DATA / f).read_text().splitlines()]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=300, min_frequency=1, special_tokens=["<|endoftext|>"])
    folder = tmp_path_factory.mktemp("tiny-bpe")
    PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", bos_token="<|endoftext|>").save_pretrained(
        folder
    )
    return folder


#: A 2-layer GPT-2 that hpo builds from the study file: model: {config: TINY_GPT2, tokenizer: ...}
TINY_GPT2 = {"architecture": "gpt2", "n_layer": 2, "n_head": 2, "n_embd": 32, "n_positions": 64}
#: Prompt/response pairs for a causal LM (the loss on the response): tests/data/chat_*.jsonl
CHAT_PAIRS = {
    "train": str(DATA / "chat_train.jsonl"),
    "eval": str(DATA / "chat_eval.jsonl"),
    "prompt_column": "prompt",
    "response_column": "response",
    "max_length": 32,
}


#: ChatML, as Qwen's and many others' templates write it
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def chat_study(write_study, tiny_bpe_tokenizer, train="conversations_train.jsonl", **data):
    return write_study(
        task="causal-lm",
        model={"config": {**TINY_GPT2, "n_positions": 256}, "tokenizer": str(tiny_bpe_tokenizer)},
        objective={"metric": "eval_loss"},
        data={
            "train": str(DATA / train) if "/" not in train else train,
            "eval": str(DATA / "conversations_eval.jsonl"),
            "format": "chat",
            "max_length": 256,  # a conversation is ~150 of this tiny tokenizer's tokens
            **data,
        },
    )


def study_dict(model_dir: Path, **changes) -> dict:
    """A small valid study as a dict; ``changes`` replace top-level keys."""
    study = {
        "study": "tiny",
        "task": "sequence-classification",
        "model": str(model_dir),
        "data": {"train": str(DATA / "train.csv"), "eval": str(DATA / "eval.csv"), "max_length": 16},
        "train": {"num_train_epochs": 2, "seed": 0, "warmup_ratio": 0.1},  # warmup_ratio: a transformers-4 name
        "eval_every": 0.5,
        "search_space": {
            "learning_rate": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
            "per_device_train_batch_size": {"type": "categorical", "choices": [4, 8]},
        },
        "sampler": {"name": "random", "seed": 0},
        "pruner": {"name": "none"},
        "n_trials": 2,
    }
    study.update(changes)
    return study


def reevaluated(study: dict, model: Path) -> float:
    """The eval loss of the saved ``model`` (a model folder, or a LoRA adapter) on the study's eval rows, in this
    one process."""
    from transformers import AutoModelForSequenceClassification, Trainer, TrainingArguments

    from hpo.api import load
    from hpo.tasks import TASKS
    from hpo.trial.model import collator
    from hpo.trial.workbench import prepare

    bench = prepare(load(study))
    args = TrainingArguments(output_dir=str(model.parent / "reeval"), report_to="none", use_cpu=True)
    if (model / "adapter_config.json").exists():  # a LoRA trial's adapter, over the base its config names
        from peft import AutoPeftModelForSequenceClassification

        loaded = AutoPeftModelForSequenceClassification.from_pretrained(model, num_labels=len(bench.labels))
    else:
        loaded = AutoModelForSequenceClassification.from_pretrained(model)
    trainer = Trainer(
        model=loaded,
        args=args,
        eval_dataset=bench.eval_rows,
        data_collator=collator(TASKS[bench.cfg.task], bench.tokenizer),
    )
    return trainer.evaluate()["eval_loss"]


ROOT = Path(__file__).resolve().parents[1]


def quickstart(tmp_path: Path, **changes) -> dict:
    """The quickstart study as a dict: its data and model, 96 rows, one epoch, no objective: of its own."""
    study = yaml.safe_load((ROOT / "studies" / "quickstart.yaml").read_text())
    for key in ("environments", "objective", "pruner"):
        study.pop(key)
    study["data"] = {**study["data"], "max_train_rows": 96}
    study["data"].update({k: str(ROOT / "studies" / study["data"][k]) for k in ("train", "eval")})
    study["train"] = {**study["train"], "num_train_epochs": 1}
    study.update(storage=f"sqlite:///{tmp_path}/q.db", output_dir=str(tmp_path / "out"), **changes)
    return study


LR = {"learning_rate": {"type": "float", "low": 3e-3, "high": 3e-2, "log": True}}


def ner_study(write_study, eval_file="ner_eval.jsonl", **changes):
    return write_study(
        task="token-classification",
        n_trials=2,
        objective={"metric": "eval_f1", "direction": "maximize"},
        data={"train": str(DATA / "ner_train.jsonl"), "eval": str(DATA / eval_file), "max_length": 16},
        train={"num_train_epochs": 8, "seed": 0},
        search_space=LR,
        **changes,
    )


def spying(cls):
    """``cls`` (a real tokenizer class) that also records the longest text and word list each call was given."""

    class Spy(cls):
        seen: ClassVar[list[int]] = []

        def __call__(self, text, *args, **kwargs):
            texts = [text] if isinstance(text, str) else text
            flat = [w for t in texts for w in ([t] if isinstance(t, str) else t)]
            Spy.seen.append(max([len(w) for w in flat] + [len(t) for t in texts if isinstance(t, list)]))
            return super().__call__(text, *args, **kwargs)

    return Spy


@pytest.fixture(params=["wordpiece", "byte-bpe"])
def tokenizer(request, tmp_path):
    from transformers import BertTokenizerFast, PreTrainedTokenizerFast

    if request.param == "wordpiece":
        words = sorted(
            {w for line in (DATA / "train.csv").read_text().splitlines()[1:] for w in line.split(",")[0].split()}
        )
        BertTokenizerFast(
            vocab={t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *words])}
        ).save_pretrained(tmp_path / "wp")
        return spying(BertTokenizerFast).from_pretrained(tmp_path / "wp")
    return spying(PreTrainedTokenizerFast).from_pretrained(request.getfixturevalue("tiny_bpe_tokenizer"))


@pytest.fixture
def write_study(tmp_path, tiny_model):
    """Write a study file into tmp_path: ``write_study(n_trials=3)`` → its path."""

    def write(name: str = "study.yaml", **changes) -> Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(study_dict(tiny_model, **changes), sort_keys=False))
        return path

    return write


@pytest.fixture(scope="session")
def trained_study(tmp_path_factory, tiny_model) -> Path:
    """One tiny study trained once per session for the tests that only read a study (report, best, dashboard):
    its study file, with the SQLite storage and outputs/ beside it. 3 trials and a median pruner: complete
    and pruned trials. A test that writes (hpo report and the dashboard write the study's note) takes
    :func:`trained_copy` instead."""
    from rich.console import Console

    from hpo import load_study
    from hpo.study.loop import run_study

    path = tmp_path_factory.mktemp("trained") / "study.yaml"
    study = study_dict(tiny_model, n_trials=3, pruner={"name": "median", "n_startup_trials": 1})
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    run_study(load_study(path), Console(quiet=True))
    return path


@pytest.fixture
def trained_copy(trained_study, tmp_path) -> Path:
    """A private copy of :func:`trained_study` for a test that writes: its study file and SQLite storage in
    tmp_path/trained. Not outputs/: hpo marks that folder as its study's (by storage URL) and refuses it to a copy."""
    import shutil

    folder = tmp_path / "trained"
    folder.mkdir()
    for f in trained_study.parent.glob(f"{trained_study.stem}.*"):  # study.yaml, study.db (and -wal, -shm)
        shutil.copy(f, folder / f.name)
    return folder / trained_study.name


def users_folder(folder: Path) -> Path:
    """A folder of the user's that hpo must never take over: their own best_model/ and report/trials.csv."""
    (folder / "best_model").mkdir(parents=True)
    (folder / "best_model" / "model.safetensors").write_bytes(b"the user's model")
    (folder / "report").mkdir()
    (folder / "report" / "trials.csv").write_text("the user's table\n")
    return folder


POSTGRES = os.environ.get("HPO_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")


@pytest.fixture(scope="session")
def postgres_admin():
    """A connection to the PostgreSQL server, or a skip (a failure in CI, where ``CI`` is set)."""
    psycopg = pytest.importorskip("psycopg")
    try:
        admin = psycopg.connect(POSTGRES, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as e:
        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL unreachable at {POSTGRES}: {e}")
        pytest.skip(f"PostgreSQL unreachable at {POSTGRES}")
    with admin:
        yield admin


@contextlib.contextmanager
def _fresh_database(admin):
    name = f"hpo_test_{uuid.uuid4().hex[:12]}"
    admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield POSTGRES.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://") + f"/{name}"
    finally:
        admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def postgres_url(postgres_admin):
    """A fresh PostgreSQL database for this test session, dropped at the end."""
    with _fresh_database(postgres_admin) as url:
        yield url


@pytest.fixture
def fresh_postgres_url(postgres_admin):
    """A PostgreSQL database of this test alone, without even optuna's tables."""
    with _fresh_database(postgres_admin) as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def storage_url(request, tmp_path):
    """Every storage mode hpo supports: the default SQLite file and PostgreSQL (one schema per test)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'study.db'}"
    return request.getfixturevalue("postgres_url")


# --- Tiers by directory: tests/unit/ trains nothing, spawns nothing and drives no browser (`make test-fast`);
# tests/integration/ does (`make test` and CI run both). The mark follows the folder, so `-m integration` still works.
INTEGRATION = Path(__file__).parent / "integration"


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.is_relative_to(INTEGRATION):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(autouse=True)
def _unit_tests_spawn_nothing(request, monkeypatch):
    """Keep the unit tier honest: a test under tests/unit/ that starts a process fails, saying where it goes."""
    if request.node.get_closest_marker("integration"):
        return
    import multiprocessing.process
    import subprocess

    def refuse(*args, **kwargs):
        raise AssertionError("a unit test starts no process: it belongs in tests/integration/")

    monkeypatch.setattr(subprocess.Popen, "_execute_child", refuse)
    monkeypatch.setattr(multiprocessing.process.BaseProcess, "start", refuse)
