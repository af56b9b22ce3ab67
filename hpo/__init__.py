"""hpo: hyperparameter optimization for fine-tuning transformer models.

Each command of the ``hpo`` CLI is one call here; a study is a file path or a dict shaped like one.

>>> import hpo
>>> study = hpo.run("studies/quickstart.yaml", n_trials=8)  # doctest: +SKIP
>>> trials, studies = hpo.report(["studies/quickstart.yaml"])  # doctest: +SKIP
>>> args, rest = hpo.best("studies/quickstart.yaml")  # doctest: +SKIP
>>> hpo.check("studies/quickstart.yaml").fits  # doctest: +SKIP
True
"""

from hpo.api import best, check, report, run, status, submit, train, validate
from hpo.config import StudyConfig, load_study
from hpo.errors import ConfigError, NoCompleteTrial, TrialsFailed

__all__ = [
    "ConfigError",
    "NoCompleteTrial",
    "StudyConfig",
    "TrialsFailed",
    "best",
    "check",
    "load_study",
    "report",
    "run",
    "status",
    "submit",
    "train",
    "validate",
]
