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
nor outputs, and stay within a CPU time and peak memory measured with ``os.wait4``.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

CORPUS = Path(__file__).parent / "broken_data"
FILES = sorted(CORPUS.glob("*.yaml"))

# A broken data file fails in well under 5 s of CPU and 300 MB: `hpo run` reads and checks the data
# (hpo.data.load_examples, pandas only) before it imports torch, which alone takes ~470 MB.
MAX_CPU_S, MAX_RSS_MB = 5, 300


def test_the_corpus_covers_each_format_and_task():
    assert len(FILES) >= 25
    suffixes = {p.suffix for p in (CORPUS / "data").iterdir()}
    assert {".csv", ".jsonl", ".json", ".conll"} <= suffixes
    tasks = {line.split(": ", 1)[1] for p in FILES for line in p.read_text().splitlines() if line.startswith("task:")}
    assert tasks == {"sequence-classification", "token-classification", "causal-lm"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A private copy, so a regression that writes files cannot touch the repository."""
    root = tmp_path_factory.mktemp("corpus")
    shutil.copytree(CORPUS, root / "broken_data")
    return root


# Runs a command and reports its rusage from os.wait4. A launcher in between, because Linux gives a
# process exec'd from a fork of pytest (hundreds of MB, torch imported) pytest's peak RSS as its own.
LAUNCHER = """
import json, os, resource, signal, subprocess, sys, threading
cpu_s, mb, timeout, out, err, *args = sys.argv[1:]

def limits():  # a regression dies (SIGXCPU, or a failed allocation), never hangs or takes the machine
    resource.setrlimit(resource.RLIMIT_CPU, (int(cpu_s), int(cpu_s)))
    resource.setrlimit(resource.RLIMIT_AS, (int(mb) << 20, int(mb) << 20))

with open(out, "w") as o, open(err, "w") as e:
    proc = subprocess.Popen(args, stdout=o, stderr=e, preexec_fn=limits)
killer = threading.Timer(float(timeout), lambda: os.kill(proc.pid, signal.SIGKILL))
killer.start()
_, status, usage = os.wait4(proc.pid, 0)
killer.cancel()
print(json.dumps([os.waitstatus_to_exitcode(status), usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024]))
"""


def run_measured(args: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 300,
                 limit_cpu_s: int = 300, limit_mb: int = 8192) -> tuple[int, str, str, float, float]:
    """Run ``args`` in ``cwd``: its exit code, stdout, stderr, CPU seconds and peak RSS in MB (``os.wait4``)."""
    out, err = cwd / ".measured.stdout", cwd / ".measured.stderr"
    report = subprocess.run([sys.executable, "-c", LAUNCHER, str(limit_cpu_s), str(limit_mb), str(timeout),
                             str(out), str(err), *args], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=timeout + 60, check=True)
    code, cpu_s, rss_mb = json.loads(report.stdout)
    stdout, stderr = out.read_text(), err.read_text()
    out.unlink()
    err.unlink()
    return code, stdout, stderr, cpu_s, rss_mb


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_broken_data_fails_cleanly(path, corpus, tiny_model):
    expected = path.read_text().splitlines()[0].removeprefix("# expect: ")
    line, _, rest = expected.partition(": ")
    key, _, message = rest.partition(": ")
    name = f"broken_data/{path.name}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "400", "HPO_TEST_MODEL": str(tiny_model)}
    code, stdout, stderr, cpu_s, rss_mb = run_measured([sys.executable, "-m", "hpo.cli", "run", name], corpus, env)
    assert code == 2, stdout + stderr
    assert "Traceback" not in stdout + stderr
    (error,) = stderr.strip().splitlines()
    assert error.startswith(f"error {name}:{line}: {key}: "), error
    assert message in error, error
    assert f"broken_data/data/{path.stem}." in error, "the error names the data file"
    assert not (corpus / "broken_data" / f"{path.stem}.db").exists()
    assert not (corpus / "broken_data" / "outputs").exists()
    assert cpu_s < MAX_CPU_S and rss_mb < MAX_RSS_MB, f"{cpu_s:.1f} s CPU, {rss_mb:.0f} MB"
