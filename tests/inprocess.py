"""``hpo ARGS`` in the test's own process, through the CLI's library call (typer's runner on ``hpo.cli.app``).

A Python process per command costs ~3 s of imports on a busy 2-core machine; the corpora and CLI tests
run ~250 commands. The command sees what a process of its own would: Python's default warning filters,
with warnings printed to its stderr (not recorded by pytest), and the log lines of Optuna and transformers
on its stderr too, so a test of "one line on stderr" is as strict as before. What it changes in the process
is put back after it: the folder it ran in, the environment, signal handlers, warning filters, logging
handlers and levels, Optuna's and transformers' verbosity, torch's thread count. What only a real process
shows (signals, workers, torchrun, the installed ``hpo`` script, a memory peak) stays in subprocess tests
(tests/procs.py, tests/measure.py).
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


class _Current:
    """A stream that is whatever ``sys.stdout``/``sys.stderr`` is now: the command's own, under the runner."""

    def __init__(self, name: str):
        self.name = name

    def write(self, text: str) -> int:
        return getattr(sys, self.name).write(text)

    def flush(self) -> None:
        getattr(sys, self.name).flush()


def _libraries_configured() -> None:
    # Optuna and transformers make their log handler once, on sys.stderr as it is then: made here, not under
    # the runner (whose streams close after the command), and pointed at the command's streams by hpo() below.
    import optuna
    import transformers

    optuna.logging.get_verbosity()
    transformers.logging.get_verbosity()


@contextlib.contextmanager
def _streams_of_the_command():
    """Log handlers on the process's stdout/stderr write to the command's while it runs."""
    std = {
        id(sys.stdout): "stdout",
        id(sys.stderr): "stderr",
        id(sys.__stdout__): "stdout",
        id(sys.__stderr__): "stderr",
    }
    moved = []
    for name in LOGGERS:
        for handler in logging.getLogger(name).handlers:
            if type(handler) is logging.StreamHandler and id(handler.stream) in std:
                moved.append((handler, handler.stream))
                handler.stream = _Current(std[id(handler.stream)])
    try:
        yield
    finally:
        for handler, stream in moved:
            handler.stream = stream


def _print_warning(message, category, filename, lineno, file=None, line=None) -> None:
    sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


@contextlib.contextmanager
def process_kept():
    """Put back, on exit, what a command may change in the process it runs in."""
    import optuna
    import transformers

    cwd, environ = os.getcwd(), dict(os.environ)
    handlers = {s: signal.getsignal(s) for s in SIGNALS}
    loggers = {name: logging.getLogger(name) for name in LOGGERS}
    logging_state = {name: (log.level, list(log.handlers), log.propagate) for name, log in loggers.items()}
    verbosity = optuna.logging.get_verbosity(), transformers.logging.get_verbosity()
    torch = sys.modules.get("torch")
    threads = torch.get_num_threads() if torch else None
    try:
        with warnings.catch_warnings():
            warnings.resetwarnings()  # Python's defaults, as a fresh process has them (pytest's are stricter)
            for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
                warnings.simplefilter("ignore", category)
            warnings.filterwarnings("default", category=DeprecationWarning, module="__main__")
            warnings.showwarning = _print_warning  # not recorded by pytest
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
        optuna.logging.set_verbosity(verbosity[0])
        transformers.logging.set_verbosity(verbosity[1])
        if threads is not None:
            torch.set_num_threads(threads)


def hpo(*args, cwd: Path | str | None = None, env: dict[str, str] | None = None) -> Ran:
    """``hpo *args`` run in this process (in ``cwd``, with ``env`` added to the environment), to its exit code.

    An exception the command lets out is printed to stderr as the real process would print it, so a test's
    ``"Traceback" not in stderr`` still catches it.
    """
    from typer.testing import CliRunner

    from hpo.cli import app

    _libraries_configured()
    with process_kept(), _streams_of_the_command():
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
