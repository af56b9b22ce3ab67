"""A study's storage deleted or replaced while it runs, seen by the storage watch without a run (the runs with
deleted files and full disks are in integration/test_storage_faults.py)."""

import os

import optuna
import pytest


def test_a_study_deleted_from_its_storage_is_seen_at_the_next_trial_boundary(write_study, storage_url, request):
    # The same class without a file to watch: the study (or its tables) deleted on the server while the run goes on.
    from hpo.config import load_study
    from hpo.errors import StorageLost
    from hpo.study.faults import StorageWatch
    from hpo.study.storage import rdb_storage

    name = f"gone-{request.node.callspec.id}"
    cfg = load_study(write_study(storage=storage_url, study=name))
    study = optuna.create_study(study_name=name, storage=rdb_storage(cfg))
    study.tell(study.ask(), 0.5)
    watch, (told,) = StorageWatch(cfg, study), study.trials
    watch.check(told)  # all there
    optuna.delete_study(study_name=name, storage=storage_url)
    with pytest.raises(StorageLost, match=f"the study '{name}' was deleted in .* while the study ran: trial 0"):
        watch.check(told)


def test_a_replaced_sqlite_file_is_seen_even_when_it_holds_the_same_study(write_study, tmp_path):
    # A copy of the study put in its place (a restore from backup): the run's connections still write to the old one.
    import shutil

    from hpo.config import load_study
    from hpo.errors import StorageLost
    from hpo.study.faults import StorageWatch
    from hpo.study.storage import rdb_storage

    cfg = load_study(write_study())
    study = optuna.create_study(study_name="tiny", storage=rdb_storage(cfg))
    watch = StorageWatch(cfg, study)
    database = tmp_path / "study.db"
    shutil.copy(database, tmp_path / "copy.db")
    os.replace(tmp_path / "copy.db", database)
    with pytest.raises(StorageLost, match="was replaced by another file while the study ran"):
        watch.check()
