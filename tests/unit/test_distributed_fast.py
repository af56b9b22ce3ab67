"""Multi-process trials (resources.processes_per_trial): the checks made before any process starts."""

import pytest
from conftest import study_dict

from hpo.errors import ConfigError


def test_more_processes_than_devices_is_one_line_before_any_trial(tiny_model, tmp_path):
    from hpo.api import load
    from hpo.study.devices import check_devices, worker_env

    cfg = load(study_dict(tiny_model, resources={"processes_per_trial": 3}, storage=f"sqlite:///{tmp_path}/d.db"))
    with pytest.raises(
        ConfigError, match=r"resources\.processes_per_trial: 64 worker\(s\) × 3 processes per trial need 192 CPU"
    ):
        check_devices(cfg, 64, [])
    with pytest.raises(ConfigError, match=r"need 3 GPU\(s\); this machine has 2"):
        check_devices(cfg, 1, ["0", "1"])
    check_devices(cfg, 1, ["0", "1", "2"])
    one = load(study_dict(tiny_model, storage=f"sqlite:///{tmp_path}/d.db"))
    check_devices(one, 64, [])  # one-process workers share cores (and GPUs, round robin) as they always could
    assert worker_env(1, 2, ["0", "1", "2", "3"], per_trial=2) == {"CUDA_VISIBLE_DEVICES": "2,3"}  # GPUs of its own
    assert not (tmp_path / "d.db").exists()


def test_deepspeed_needs_cuda_and_deepspeed_in_one_line(tiny_model, tmp_path):
    from hpo.api import load
    from hpo.trial.workbench import check_engines

    cfg = load(study_dict(tiny_model, train={"deepspeed": {"zero_optimization": {"stage": 2}}}))
    with pytest.raises(ConfigError, match=r"train\.deepspeed: DeepSpeed's ZeRO needs a CUDA GPU"):
        check_engines(cfg, cuda=False)
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match=r"pip install 'hpo\[deepspeed\]'"):
            check_engines(cfg, cuda=True)
