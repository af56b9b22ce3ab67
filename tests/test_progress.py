"""What a run prints: the summary names the commands that reach the same study."""

import json

import optuna
from conftest import study_dict
from rich.console import Console

from hpo.config import load_study
from hpo.progress import print_summary


def test_the_summary_names_the_environment_that_chose_the_study(tmp_path):
    path = tmp_path / "study.yaml"
    path.write_text(json.dumps(study_dict(tmp_path, environments={"dev": {"study": "tiny-dev"}})))
    study = optuna.create_study()
    study.add_trial(optuna.trial.create_trial(value=0.5, params={}, distributions={}))
    for env, expected in ((None, f"hpo dashboard {path}\n"), ("dev", f"hpo dashboard {path} --env dev\n")):
        console = Console(record=True, width=500)
        print_summary(console, load_study(path, env=env), study)
        assert expected in console.export_text()  # without --env, the dashboard would open another study
