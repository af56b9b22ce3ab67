"""A corpus of broken study files: each fails `hpo run` with exit 2 and one line naming file, line and key.

Each file in tests/broken/ holds one defect and says what it expects on its
first line: ``# expect: LINE: key.path: message`` (``-`` for LINE when the
file has no line to point at, e.g. it is not UTF-8 at all). The run must print
exactly that one error (no traceback), create neither a storage file nor
outputs, and stay within a CPU-time budget. Each file runs in this process,
through the CLI's library call (tests/inprocess.py); the files whose defect is
their size (an alias bomb, 1,000 levels of nesting) also run as a real ``hpo
run`` process within a CPU-time and peak-memory budget measured with
``os.wait4``, so they fail fast instead of eating the machine. A file whose
defect shows only once the model and TrainingArguments are loaded says
``# stage: model`` on its second line: importing torch and transformers alone
takes more than the budget of the other files (one such file runs as a process
too: the others must fail before torch is imported).
"""

import os
import shutil
from pathlib import Path

import inprocess
import pytest
from measure import run_corpus

CORPUS = Path(__file__).parents[1] / "broken"
FILES = sorted(CORPUS.glob("*.yaml"))
BUDGET = {"config": (5.0, 300), "model": (60.0, 2000)}  # (CPU seconds, peak RSS MiB) per stage
WALL_CAP_S = 300  # only against a hang: the budget above is CPU time, which a busy machine does not inflate
#: Run as real processes too: the files whose defect is their size, and one of the model stage.
HOSTILE = [
    CORPUS / f"{stem}.yaml"
    for stem in (
        "59_yaml_alias_bomb",
        "63_yaml_deep_nesting",
        "64_yaml_recursive_alias",
        "67_derive_huge_constant",
        "73_expression_deep_nesting",
        "87_grid_too_large",
        "104_optimizer_package_missing",
    )
]


def test_the_corpus_is_large():
    assert len(FILES) >= 80
    assert set(HOSTILE) <= set(FILES) and any(stage(p) == "model" for p in HOSTILE)


def header(path: Path) -> list[str]:
    """The first two lines, read in the file's own encoding (some files are UTF-16 or latin-1 on purpose)."""
    raw = path.read_bytes()
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        return raw.decode("utf-16").splitlines()[:2]
    return [line.decode("utf-8", errors="replace") for line in raw.splitlines()[:2]]


def stage(path: Path) -> str:
    second = header(path)[1]
    return second.removeprefix("# stage: ") if second.startswith("# stage: ") else "config"


def expected(path: Path) -> tuple[str, str]:
    """The one stderr line's start (``error broken/FILE:LINE: key: ``) and the message it holds."""
    line, _, rest = header(path)[0].removeprefix("# expect: ").partition(": ")
    key, _, message = rest.partition(": ") if ": " in rest else ("", "", rest)
    where = f"broken/{path.name}:{line}" if line != "-" else f"broken/{path.name}"
    return f"error {where}: {key + ': ' if key else ''}", message


def assert_failed_cleanly(path: Path, corpus: Path, returncode: int, stdout: str, stderr: str) -> None:
    prefix, message = expected(path)
    assert returncode == 2, stdout + stderr
    assert "Traceback" not in stdout + stderr
    (error,) = stderr.strip().splitlines()
    assert error.startswith(prefix), error
    assert message in error, error
    assert not list((corpus / "broken").glob("*.db*"))
    assert not (corpus / "broken" / "outputs").exists()


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_broken_file_fails_cleanly(path, tmp_path, monkeypatch):
    shutil.copytree(CORPUS, tmp_path / "broken")  # a private copy: what a regression writes is pinned on its file
    monkeypatch.delenv("HPO_BROKEN_UNSET", raising=False)
    result = inprocess.hpo("run", f"broken/{path.name}", cwd=tmp_path)
    assert_failed_cleanly(path, tmp_path, result.returncode, result.stdout, result.stderr)
    assert result.cpu_s < BUDGET[stage(path)][0], f"{result.cpu_s:.1f} s of CPU"


@pytest.fixture(scope="module")
def runs(request, tmp_path_factory) -> dict[str, tuple[Path, object]]:
    """``hpo run`` of every selected hostile file as a process, one per core at a time, each in a private copy
    of the corpus."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "400"}
    env.pop("HPO_BROKEN_UNSET", None)
    return run_corpus(
        request,
        tmp_path_factory.mktemp("corpus"),
        CORPUS,
        HOSTILE,
        "test_hostile_file_fails_fast_in_a_process",
        env,
        limits=lambda path: {"timeout": WALL_CAP_S, "limit_cpu_s": int(BUDGET[stage(path)][0]) * 4},
    )


@pytest.mark.parametrize("path", HOSTILE, ids=lambda p: p.stem)
def test_hostile_file_fails_fast_in_a_process(path, runs):
    corpus, result = runs[path.stem]
    assert_failed_cleanly(path, corpus, result.returncode, result.stdout, result.stderr)
    cpu_s, rss_mib = BUDGET[stage(path)]
    assert result.cpu_s < cpu_s, f"{result.cpu_s:.1f} s of CPU"
    assert result.rss_mib < rss_mib, f"{result.rss_mib:.0f} MiB"


@pytest.fixture(scope="module")
def corpus_copy(tmp_path_factory) -> Path:
    import shutil

    root = tmp_path_factory.mktemp("validate")
    shutil.copytree(CORPUS, root / CORPUS.name)
    return root


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_validate_refuses_what_run_refuses(path, corpus_copy, monkeypatch):
    # `hpo validate` runs the checks `hpo run` makes before it creates anything (hpo.study.workers.check_before_run): each
    # file of the corpus, whose expected line is that of `hpo run`, is refused by hpo.validate with the same line.
    import hpo
    from hpo.errors import ConfigError

    monkeypatch.chdir(corpus_copy)
    monkeypatch.delenv("HPO_BROKEN_UNSET", raising=False)
    prefix, message = expected(path)
    with pytest.raises(ConfigError) as e:
        hpo.validate(f"broken/{path.name}")
    (error,) = map(str, e.value.problems)
    assert error.startswith(prefix.removeprefix("error ")), error
    assert message in error, error
    assert not list((corpus_copy / "broken").glob("*.db*"))
    assert not (corpus_copy / "broken" / "outputs").exists()
