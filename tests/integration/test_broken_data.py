"""A corpus of broken data files: each fails `hpo run` with exit 2 and one line naming the data file and line.

Each case in tests/broken_data/ is a study file ``NN_name.yaml`` whose train or eval file,
``data/NN_name.<csv|jsonl|json|conll>``, holds one defect (the other split is a good file
from ``data/``). As in tests/broken/, the study's first line says what it expects:
``# expect: LINE: key.path: message``, where LINE and key.path point into the study file
(``5: data.train``) and the message starts with the data file and its line as the run
shows them (``broken_data/data/01_null_label.jsonl:2: 'label' is null, ...``); a JSON
array adds the record's index (``:5: [2]: ...``). The model is ``${HPO_TEST_MODEL}``: the
test's tiny BERT. By hand: ``HPO_TEST_MODEL=<a model folder> hpo run tests/broken_data/01_null_label.yaml``.

The run must print exactly that one error (no traceback), create neither a storage file
nor outputs, and stay within a CPU time. Each case runs in this process, through the CLI's
library call (tests/inprocess.py); a few run as real ``hpo run`` processes too, within a CPU
time and peak memory measured with ``os.wait4``: the data is checked before torch is imported.
"""

import os
import shutil
from pathlib import Path

import inprocess
import pytest
from measure import run_corpus

CORPUS = Path(__file__).parents[1] / "broken_data"
FILES = sorted(CORPUS.glob("*.yaml"))

# A broken data file fails in well under 5 s of CPU and 300 MB: `hpo run` reads and checks the data
# (hpo.data.load_examples, pandas only) before it imports torch, which alone takes ~470 MB.
MAX_CPU_S, MAX_RSS_MB = 5, 300
#: Run as real processes too: one case per format.
IN_A_PROCESS = [
    CORPUS / f"{stem}.yaml"
    for stem in ("01_null_label", "06_csv_missing_label_cell", "10_conll_tag_not_iob", "21_json_not_a_list")
]


def test_the_corpus_covers_each_format_and_task():
    assert len(FILES) >= 25
    suffixes = {p.suffix for p in (CORPUS / "data").iterdir()}
    assert {".csv", ".jsonl", ".json", ".conll"} <= suffixes
    tasks = {line.split(": ", 1)[1] for p in FILES for line in p.read_text().splitlines() if line.startswith("task:")}
    assert tasks == {"sequence-classification", "token-classification", "causal-lm"}


def assert_failed_cleanly(path: Path, corpus: Path, returncode: int, stdout: str, stderr: str) -> None:
    expected = path.read_text().splitlines()[0].removeprefix("# expect: ")
    line, _, rest = expected.partition(": ")
    key, _, message = rest.partition(": ")
    name = f"broken_data/{path.name}"
    assert returncode == 2, stdout + stderr
    assert "Traceback" not in stdout + stderr
    (error,) = stderr.strip().splitlines()
    assert error.startswith(f"error {name}:{line}: {key}: "), error
    assert message in error, error
    assert f"broken_data/data/{path.stem}." in error, "the error names the data file"
    assert not (corpus / "broken_data" / f"{path.stem}.db").exists()
    assert not (corpus / "broken_data" / "outputs").exists()


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_broken_data_fails_cleanly(path, tmp_path, tiny_model):
    shutil.copytree(CORPUS, tmp_path / "broken_data")  # a private copy: what a regression writes is pinned on its case
    result = inprocess.hpo("run", f"broken_data/{path.name}", cwd=tmp_path, env={"HPO_TEST_MODEL": str(tiny_model)})
    assert_failed_cleanly(path, tmp_path, result.returncode, result.stdout, result.stderr)
    assert result.cpu_s < MAX_CPU_S, f"{result.cpu_s:.1f} s CPU"


@pytest.fixture(scope="module")
def runs(request, tmp_path_factory, tiny_model) -> dict[str, tuple[Path, object]]:
    """``hpo run`` of every selected case as a process, one per core at a time, each in a private copy of the
    corpus."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "400", "HPO_TEST_MODEL": str(tiny_model)}
    return run_corpus(
        request,
        tmp_path_factory.mktemp("corpus"),
        CORPUS,
        IN_A_PROCESS,
        "test_broken_data_fails_fast_in_a_process",
        env,
    )


@pytest.mark.parametrize("path", IN_A_PROCESS, ids=lambda p: p.stem)
def test_broken_data_fails_fast_in_a_process(path, runs):
    corpus, result = runs[path.stem]
    assert_failed_cleanly(path, corpus, result.returncode, result.stdout, result.stderr)
    assert result.cpu_s < MAX_CPU_S and result.rss_mib < MAX_RSS_MB, (
        f"{result.cpu_s:.1f} s CPU, {result.rss_mib:.0f} MB"
    )
