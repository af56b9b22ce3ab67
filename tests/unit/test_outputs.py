"""The output folder: hpo writes only into a folder it made for the study, and there only over what it wrote."""

import json
import os
import shutil
from pathlib import Path

import optuna
import pytest
import yaml
from conftest import DATA, study_dict, users_folder

from hpo.config import load_study
from hpo.errors import ConfigError
from hpo.study import outputs, revisions
from hpo.trial.finetune import replace_folder


@pytest.fixture
def model(tmp_path) -> Path:
    """A model folder as from_pretrained reads it (its files are never loaded here)."""
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "bert"}')
    (folder / "model.safetensors").write_bytes(b"weights")
    return folder


def config(tmp_path: Path, model: Path, /, **changes):
    path = tmp_path / "project" / "study.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(yaml.safe_dump(study_dict(model, **changes), sort_keys=False))
    return load_study(path)


def refusal(cfg) -> str:
    with pytest.raises(ConfigError) as e:
        outputs.check_paths(cfg)
    (problem,) = e.value.problems
    assert str(problem).startswith(f"{cfg.file}:") and ": output_dir: " in str(problem), problem
    return str(problem)


def tree(folder: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(folder)): None if p.is_dir() else p.read_bytes() for p in sorted(folder.rglob("*"))}


def mark(cfg) -> None:
    """The owner mark ``hpo run`` writes in the folder it made."""
    cfg.output_path.mkdir(parents=True, exist_ok=True)
    (cfg.output_path / outputs.OWNER_FILE).write_text(json.dumps({"study": cfg.study, "storage": cfg.storage_label}))


def test_a_folder_of_the_users_is_refused_and_left_as_it_is(tmp_path, model):
    # was taken over: best_model/ moved aside and deleted at the first install, report/trials.csv overwritten
    mine = users_folder(tmp_path / "mine")
    before = tree(mine)
    message = refusal(config(tmp_path, model, output_dir=str(mine)))
    assert f"{mine} is not empty (best_model/, report/) and hpo did not make it (no hpo_study.json)" in message
    assert tree(mine) == before
    (mine / "notes.txt").write_text("a single file is enough")
    shutil.rmtree(mine / "best_model")
    shutil.rmtree(mine / "report")
    assert "(notes.txt)" in refusal(config(tmp_path, model, output_dir=str(mine)))
    (mine / "notes.txt").unlink()
    outputs.check_paths(config(tmp_path, model, output_dir=str(mine)))  # empty: usable
    outputs.check_paths(config(tmp_path, model, output_dir=str(tmp_path / "new" / "folder")))  # new: usable


@pytest.mark.parametrize(
    ("where", "says"),
    [
        ("model", "is the model's folder (model)"),
        ("tokenizer", "is the tokenizer's folder (model.tokenizer)"),
        ("data", f"holds the train data (data.train: {DATA / 'train.csv'})"),
        ("study", "holds the study file"),
        ("above the data", "holds the train data (data.train: "),
    ],
)
def test_the_folders_a_study_reads_are_refused_by_name(tmp_path, model, where, says):
    # output_dir: the model's own folder wrote hpo_study.json among the model's files, and the unchanged study
    # then refused to resume ("model.files.hpo_study.json: added")
    folder = {
        "model": model,
        "tokenizer": model,
        "data": DATA,
        "study": tmp_path / "project",
        "above the data": DATA.parent,
    }[where]
    changes = {}
    if where == "tokenizer":  # the model elsewhere, the tokenizer from the folder
        (tmp_path / "other-model").mkdir()
        changes["model"] = {"name": str(tmp_path / "other-model"), "tokenizer": str(model)}
    cfg = config(tmp_path, model, output_dir=str(folder), **changes)
    before = tree(folder)
    assert says in refusal(cfg)
    assert tree(folder) == before


def test_the_models_folder_is_refused_even_where_an_earlier_run_marked_it(tmp_path, model):
    cfg = config(tmp_path, model, output_dir=str(model))
    mark(cfg)
    assert "is the model's folder (model)" in refusal(cfg)


def test_files_hpo_wrote_beside_a_model_are_not_the_models(tmp_path, model):
    before = revisions.folder_digest(model)
    cfg = config(tmp_path, model, output_dir=str(model))
    mark(cfg)  # an output folder from before the model's folder was refused as one
    (model / "best.json").write_text("{}")
    (model / "best.model.json").write_text("{}")
    assert revisions.folder_digest(model) == before
    (model / "tokenizer.json").write_text("{}")  # a model file is still one
    assert revisions.folder_digest(model) != before


def test_an_output_folder_inside_the_models_folder_leaves_its_fingerprint(tmp_path, model):
    before = revisions.folder_digest(model)
    cfg = config(tmp_path, model, output_dir=str(model / "outputs"))
    outputs.check_paths(cfg)
    outputs.prepare(cfg, optuna.create_study())
    assert (model / "outputs" / outputs.OWNER_FILE).is_file()
    assert revisions.folder_digest(model) == before


def test_in_its_own_folder_hpo_replaces_only_what_it_wrote(tmp_path, model):
    cfg = config(tmp_path, model, output_dir=str(tmp_path / "out"))
    mark(cfg)
    best = cfg.output_path / "best_model"
    best.mkdir()
    (best / "model.safetensors").write_bytes(b"dropped here by the user")
    assert f"{best} is not a model hpo saved for study 'tiny' (no hpo_trial.json of it)" in refusal(cfg)
    (best / "hpo_trial.json").write_text(json.dumps({"study": "other", "storage": cfg.storage_label, "trial": 0}))
    assert "is not a model hpo saved" in refusal(cfg)
    (best / "hpo_trial.json").write_text(json.dumps({"study": "tiny", "storage": cfg.storage_label, "trial": 0}))
    outputs.check_paths(cfg)  # hpo's own: replaced when a better trial finishes
    (cfg.output_path / "notes.txt").write_text("the user's, beside hpo's outputs: left alone")
    outputs.check_paths(cfg)


@pytest.mark.parametrize("entry", ["best_model", "resolved.yaml", "trials", ".staged"])
def test_a_symlink_where_hpo_writes_is_refused_before_training(tmp_path, model, entry):
    # a symlinked best_model/ crashed the run after every trial had finished (NotADirectoryError), leaving the
    # worse trial installed and a stale .best_model.old.<pid>
    cfg = config(tmp_path, model, output_dir=str(tmp_path / "out"))
    mark(cfg)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("the user's")
    (cfg.output_path / entry).symlink_to(elsewhere)
    assert f"{cfg.output_path / entry} is a symlink" in refusal(cfg)
    (cfg.output_path / entry).unlink()
    (cfg.output_path / entry).symlink_to(tmp_path / "nowhere")  # dangling, too
    assert f"{cfg.output_path / entry} is a symlink" in refusal(cfg)
    assert tree(elsewhere) == {"keep.txt": b"the user's"}


def test_replace_folder_never_follows_or_leaves_a_symlink(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("the user's")
    target = tmp_path / "best_model"
    for points_at in (elsewhere, tmp_path / "nowhere"):
        target.symlink_to(points_at)
        for number in (0, 1):  # the second swap is where the old code crashed
            staged = tmp_path / f"trial-{number}"
            staged.mkdir()
            with pytest.raises(FileExistsError):
                replace_folder(staged, target)
            assert staged.is_dir() and target.is_symlink()
        assert not list(tmp_path.glob(".best_model.old.*"))
        assert tree(elsewhere) == {"keep.txt": b"the user's"}
        for number in (0, 1):
            os.rmdir(tmp_path / f"trial-{number}")
        target.unlink()


def test_replace_folder_swaps_hpos_own_folder(tmp_path):
    target, staged = tmp_path / "best_model", tmp_path / "trial-1"
    target.mkdir()
    (target / "hpo_trial.json").write_text('{"trial": 0}')
    staged.mkdir()
    (staged / "hpo_trial.json").write_text('{"trial": 1}')
    (tmp_path / f".best_model.old.{os.getpid()}").symlink_to(tmp_path / "nowhere")  # a stale link: only it goes
    replace_folder(staged, target)
    assert (target / "hpo_trial.json").read_text() == '{"trial": 1}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best_model"]


def test_a_stale_old_best_model_is_removed_when_a_run_starts(tmp_path, model):
    # a process killed in the middle of a swap left .best_model.old.<pid> for good
    cfg = config(tmp_path, model, output_dir=str(tmp_path / "out"))
    mark(cfg)
    stale = cfg.output_path / ".best_model.old.999999"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"the worse model")
    outputs.check_paths(cfg)
    outputs.prepare(cfg, optuna.create_study())
    assert not stale.exists()


def test_the_same_database_under_another_login_or_driver_owns_the_same_folder(tmp_path, model):
    # A reporting role (or psycopg2 for psycopg) reads the study its owner wrote: its report goes where the run's did.
    owner = config(tmp_path, model, storage="postgresql+psycopg://writer:pw@db.example:5432/studies")
    outputs.check_paths(owner)
    mark(owner)
    (owner.output_path / "resolved.yaml").write_text("study: tiny\n")
    for url in ("postgresql+psycopg://reader@db.example:5432/studies", "postgresql://writer@db.example:5432/studies"):
        outputs.check_paths(config(tmp_path, model, storage=url))
    assert "holds the outputs of study 'tiny'" in refusal(
        config(tmp_path, model, storage="postgresql+psycopg://writer@db.example:5432/other")
    )


@pytest.mark.parametrize(
    "entry", ["hpo_study.json", "resolved.yaml", "best_model/config.json", "final_model/x.json", "checkpoints/a.csv"]
)
def test_a_report_or_export_never_goes_over_or_into_the_runs_own_files(tmp_path, model, entry):
    # `hpo best --out <outputs>/best_model/config.json` overwrote the installed model's config, and --out over
    # hpo_study.json unmarked the folder: the next run refused it as not hpo's.
    from hpo.trial.folders import claim_paths, path_problems

    cfg = config(tmp_path, model, output_dir=str(tmp_path / "out"))
    mark(cfg)
    (cfg.output_path / "best_model").mkdir()
    (cfg.output_path / "best_model" / "hpo_trial.json").write_text(json.dumps({"study": "tiny", "trial": 0}))
    (cfg.output_path / "best_model" / "config.json").write_text("the model's")
    before = tree(cfg.output_path)
    with pytest.raises(ConfigError, match=r"is the run's own .*never over or into it"):
        claim_paths(cfg, cfg.output_path / entry)
    assert tree(cfg.output_path) == before
    claim_paths(cfg, cfg.output_path / "report" / "trials.csv", cfg.output_path / "best.json")  # beside them: fine
    assert path_problems(cfg, cfg.output_path / "final_model") == []  # hpo train's own model
