"""``hpo ARGS`` in the test's own process, through the CLI's library call (typer's runner on ``hpo.cli.app``).

A Python process per command costs ~3 s of imports on a busy 2-core machine; the corpora and CLI tests
run ~250 commands. What a command changes in the process is put back after it: the folder it ran in, the
environment, signal handlers, warning filters, logging handlers and levels, Optuna's and transformers'
verbosity, torch's thread count. What only a real process shows (signals, workers, torchrun, the installed
``hpo`` script) stays in subprocess tests (tests/procs.py).
"""

import contextlib
import logging
import os
import signal
import sys
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)
LOGGERS = ("", "hpo", "optuna", "transformers", "torch", "peft")


@dataclass
class Ran:
    """What ``subprocess.run(..., capture_output=True, text=True)`` gives, plus the command's CPU time."""

    returncode: int
    stdout: str
    stderr: str
    cpu_s: float


@contextlib.contextmanager
def process_kept():
    """Put back, on exit, what a command may change in the process it runs in."""
    cwd, environ = os.getcwd(), dict(os.environ)
    handlers = {s: signal.getsignal(s) for s in SIGNALS}
    loggers = {name: logging.getLogger(name) for name in LOGGERS}
    logging_state = {name: (log.level, list(log.handlers), log.propagate) for name, log in loggers.items()}
    optuna_verbosity = _optuna().logging.get_verbosity()
    transformers = sys.modules.get("transformers")
    transformers_verbosity = transformers.logging.get_verbosity() if transformers else None
    torch = sys.modules.get("torch")
    threads = torch.get_num_threads() if torch else None
    try:
        with warnings.catch_warnings():
            yield
    finally:
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(environ)
        for s, handler in handlers.items():
            signal.signal(s, handler)
        for name, (level, log_handlers, propagate) in logging_state.items():
            loggers[name].setLevel(level)
            loggers[name].handlers[:] = log_handlers
            loggers[name].propagate = propagate
        _optuna().logging.set_verbosity(optuna_verbosity)
        if transformers_verbosity is not None:
            transformers.logging.set_verbosity(transformers_verbosity)
        elif "transformers" in sys.modules:  # imported by the command: back to its own default
            sys.modules["transformers"].logging.set_verbosity_warning()
        if threads is not None:
            torch.set_num_threads(threads)


def _optuna():
    import optuna

    return optuna


def hpo(*args, cwd: Path | str | None = None, env: dict[str, str] | None = None) -> Ran:
    """``hpo *args`` run in this process (in ``cwd``, with ``env`` added to the environment), to its exit code.

    An exception the command lets out is printed to stderr as the real process would print it, so a test's
    ``"Traceback" not in stderr`` still catches it.
    """
    from typer.testing import CliRunner

    from hpo.cli import app

    with process_kept():
        os.environ.update({"HF_HUB_OFFLINE": "1", "COLUMNS": "400", **(env or {})})
        if cwd is not None:
            os.chdir(cwd)
        start = time.process_time()
        result = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=True)
        cpu_s = time.process_time() - start
    stderr = result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        stderr += "Traceback (most recent call last):\n" + "".join(traceback.format_exception(result.exception))
    return Ran(result.exit_code, result.stdout, stderr, cpu_s)
