"""Every study and search-space file we ship loads and validates (model and data included)."""

from pathlib import Path

import pytest
import yaml

from hpo import load_study
from hpo.trial import prepare

ROOT = Path(__file__).parent.parent
STUDIES = sorted((ROOT / "studies").glob("*.yaml"))  # not outputs/
SPACES = sorted((ROOT / "search_spaces").rglob("*.yaml"))


@pytest.mark.parametrize("path", STUDIES, ids=lambda p: str(p.relative_to(ROOT)))
def test_shipped_study_validates(path):
    assert path.read_text().startswith(f"# {path.relative_to(ROOT)} — run: hpo run {path.relative_to(ROOT)}")
    bench = prepare(load_study(path))
    assert len(bench.train_rows) >= 2


@pytest.mark.parametrize("path", SPACES, ids=lambda p: str(p.relative_to(ROOT)))
def test_shipped_search_space_loads(path, write_study):
    assert "search_space" in yaml.safe_load(path.read_text())
    load_study(write_study(search_space=str(path), train={"num_train_epochs": 1}))


def test_quickstart_data_is_big_enough():
    cfg = load_study(ROOT / "studies" / "quickstart.yaml")
    bench = prepare(cfg)
    assert len(bench.train_rows) + len(bench.eval_rows) >= 400 and len(bench.labels) >= 4
    assert cfg.n_trials >= 8
