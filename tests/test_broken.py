"""A corpus of broken study files: each fails `hpo run` with exit 2 and one line naming file, line and key.

Each file in tests/broken/ holds one defect and says what it expects on its
first line: ``# expect: LINE: key.path: message``. The run must print exactly
that one error (no traceback) and create neither a storage file nor outputs.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

CORPUS = Path(__file__).parent / "broken"
FILES = sorted(CORPUS.glob("*.yaml"))


def test_the_corpus_is_large():
    assert len(FILES) >= 30


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A private copy, so a regression that writes files cannot touch the repository."""
    root = tmp_path_factory.mktemp("corpus")
    shutil.copytree(CORPUS, root / "broken")
    return root


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_broken_file_fails_cleanly(path, corpus):
    expected = path.read_text().splitlines()[0].removeprefix("# expect: ")
    line, _, rest = expected.partition(": ")
    key, _, message = rest.partition(": ") if ": " in rest else ("", "", rest)
    name = f"broken/{path.name}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "400"}
    env.pop("HPO_BROKEN_UNSET", None)
    result = subprocess.run([sys.executable, "-m", "hpo.cli", "run", name], cwd=corpus, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    (error,) = result.stderr.strip().splitlines()
    prefix = f"error {name}:{line}: {key + ': ' if key else ''}"
    assert error.startswith(prefix), error
    assert message in error, error
    assert not (corpus / "broken" / f"{path.stem}.db").exists()
    assert not (corpus / "broken" / "outputs").exists()
