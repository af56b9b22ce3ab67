"""Run a command and measure it the way a busy machine cannot distort: its own CPU time and peak memory."""

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

# A launcher in between, because Linux gives a process exec'd from a fork of pytest (hundreds of MB once a
# test imported torch) pytest's peak RSS as its own. The launcher is small; its child's ru_maxrss is honest.
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


@dataclass
class Measured:
    returncode: int
    stdout: str
    stderr: str
    cpu_s: float  # the child's user + system CPU time
    rss_mib: float  # the child's peak resident memory


def run_measured(
    cmd: list[str],
    cwd: Path | str | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 300,
    limit_cpu_s: int = 300,
    limit_mib: int = 8192,
) -> Measured:
    """``cmd`` to completion under hard limits (killed after ``timeout`` s), with its rusage from ``os.wait4``."""
    with tempfile.TemporaryDirectory() as tmp:
        out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
        report = subprocess.run(
            [sys.executable, "-c", LAUNCHER, str(limit_cpu_s), str(limit_mib), str(timeout), str(out), str(err), *cmd],
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout + 60,
            check=True,
        )
        code, cpu_s, rss_mib = json.loads(report.stdout)
        return Measured(code, out.read_text(), err.read_text(), cpu_s, rss_mib)


def run_measured_all(jobs: dict[str, dict], workers: int | None = None) -> dict[str, Measured]:
    """:func:`run_measured` for each job (its keyword arguments), ``workers`` at a time (default: one per core).

    For corpora of short ``hpo`` runs that mostly import: each has its own process, so its CPU time and
    peak memory are its own whatever runs beside it, and two cores run two at once.
    """
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(workers or os.cpu_count() or 2) as pool:
        futures = {key: pool.submit(run_measured, **job) for key, job in jobs.items()}
        return {key: future.result() for key, future in futures.items()}


def run_corpus(request, root: Path, corpus: Path, files: list[Path], test: str, env: dict, limits=None) -> dict:
    """``hpo run CORPUS/FILE`` for each of ``files`` that ``test`` was selected with (all of them when none),
    one per core at a time, each in a private copy of ``corpus`` under ``root``: a regression that writes files
    cannot touch the repository, and what it writes is pinned on its file. ``limits``: a function of the file
    giving :func:`run_measured`'s limits (default: its defaults). Returns ``{stem: (its folder, Measured)}``.
    """
    import shutil

    selected = [i.callspec.params["path"] for i in request.session.items if getattr(i, "originalname", "") == test]
    jobs = {}
    for path in selected or files:
        shutil.copytree(corpus, root / path.stem / corpus.name)
        jobs[path.stem] = {
            "cmd": [sys.executable, "-m", "hpo.cli", "run", f"{corpus.name}/{path.name}"],
            "cwd": root / path.stem,
            "env": env,
            **(limits(path) if limits else {}),
        }
    return {stem: (root / stem, result) for stem, result in run_measured_all(jobs).items()}
