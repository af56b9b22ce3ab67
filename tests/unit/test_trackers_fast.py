"""Experiment tracker settings refused before any trial (the runs read back are in integration/test_trackers.py)."""

import pytest
from conftest import study_dict

import hpo
from hpo.errors import ConfigError


@pytest.mark.parametrize("value", ["soon", "1e300", "1e10"])
def test_a_tracker_timeout_that_is_not_seconds_is_refused(tiny_model, monkeypatch, value):
    # 1e300 validated, then every wait on the tracker overflowed time_t: the tracker was dropped as unreachable.
    monkeypatch.setenv("HPO_TRACKER_TIMEOUT_S", value)
    with pytest.raises(ConfigError, match=f"HPO_TRACKER_TIMEOUT_S='{value}' is not a number of seconds"):
        hpo.validate(study_dict(tiny_model, train={"num_train_epochs": 1, "report_to": "mlflow"}))
