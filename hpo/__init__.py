"""hpo: hyperparameter optimization for fine-tuning transformer models.

>>> from hpo import load_study, run_study
>>> study = run_study(load_study("studies/quickstart.yaml"))  # doctest: +SKIP
"""

from hpo.config import StudyConfig, load_study
from hpo.errors import ConfigError


def run_study(cfg: StudyConfig, console=None, allow_changes: bool = False):
    """Run ``cfg``'s study to ``n_trials`` finished trials; see :func:`hpo.study.run_study`."""
    from hpo.study import (
        run_study as _run,  # torch/transformers load only when trials run
    )

    return _run(cfg, console, allow_changes=allow_changes)


__all__ = ["ConfigError", "StudyConfig", "load_study", "run_study"]
