"""Many trials at once on one machine: N worker processes that share the study's storage.

This is Optuna's own distributed design, local: every worker runs hpo's trial loop on the same
study and pulls its next trial from the storage, like an ``hpo run`` on another machine. hpo only
starts the processes, pins one GPU to each, forwards Ctrl-C/SIGTERM and waits. Separate processes,
not threads or a pool, so that a worker that crashes or is killed by the OOM killer takes down only
itself; its trial goes stale and another worker retries it. The other way round, a worker does not
outlive its parent: when ``hpo run`` dies (kill -9, the OOM killer), each worker gets SIGTERM and
ends its trial as interrupted, as on Ctrl-C, instead of going on starting trials that nothing can stop.

On CPU the workers are forked from the process that checked the model and data, so they start
with torch and transformers imported and the data tokenized: a fresh interpreter per worker spent
~5 s importing, most of a short trial (benchmarks/same_work.py). A process cannot fork once CUDA
is initialised, and libraries check for GPUs at import, so GPU workers start fresh ("spawn").
"""

from __future__ import annotations

import ctypes
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Sequence

from rich.console import Console
from rich.markup import escape

from hpo import optuna_private
from hpo.config import StudyConfig
from hpo.errors import ConfigError, StorageLost, TrialsFailed
from hpo.study import outputs
from hpo.study.devices import check_devices, check_launcher, gpu_ids, worker_env
from hpo.study.faults import StorageWatch
from hpo.study.loop import run_study, start_study
from hpo.study.progress import print_summary
from hpo.study.storage import check_storage, count_finished
from hpo.trial import interrupts
from hpo.trial.workbench import Workbench

STOPPED_ON_FAILURES = 3  # a worker's exit code when max_failures_in_a_row stopped it
STOP_WAIT_S = 60  # after Ctrl-C, how long workers get to end their trials before SIGKILL
JOIN_POLL_S = 0.5  # how often the parent, waiting for its workers, looks whether a signal asked it to stop
PARENT_POLL_S = 1.0  # where the kernel cannot signal a parent's death, how often a worker looks for it
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
PARENT_DEATH_SIGNAL = signal.SIGUSR1  # the kernel's word to a worker that its parent died; it becomes one SIGTERM


def check_before_run(cfg: StudyConfig, n: int = 1, gpus: Sequence[str] | None = None) -> None:
    """What ``hpo run`` refuses before it creates anything, once the study, its data and its model are checked
    (:func:`hpo.trial.workbench.prepare`): ``n`` workers' processes on this machine (:func:`check_devices`; ``gpus``,
    default the visible ones), a launcher for trials over several machines (:func:`check_launcher`), the output folder and the SQLite folder (:func:`hpo.study.outputs.check_paths`) and the
    storage (:func:`hpo.study.storage.check_storage`). ``hpo validate`` runs it too, so that it refuses whatever the run
    would: on the machine it runs on, which is the one the run checks.

    Raises:
        ConfigError: every problem found, each at its key.
    """
    problems = []
    for check in (
        lambda: check_devices(cfg, n, gpu_ids() if gpus is None else gpus),
        lambda: check_launcher(cfg),
        lambda: outputs.check_paths(cfg),
        lambda: check_storage(cfg),
    ):
        try:
            check()
        except ConfigError as e:
            problems += e.problems
    if problems:
        raise ConfigError(problems)


def run_workers(
    cfg: StudyConfig,
    n: int,
    gpus: Sequence[str],
    console: Console | None = None,
    bench: Workbench | None = None,
    allow_changes: bool = False,
) -> int:
    """Run the study with ``n`` worker processes; return the exit code.

    The study is created (or loaded) here first, so a bad model, data or storage fails once, before
    any worker starts. ``bench``: the model and data already checked; ``allow_changes``: as in
    :func:`hpo.study.loop.start_study`. Exit code: 0 when every worker ended normally or the study reached its target
    anyway; 1 when a worker crashed and the target was not reached.

    Raises:
        ConfigError: the model, the data or the storage cannot be loaded.
        StorageLost: the storage's SQLite file was deleted or replaced, or the study deleted, while the workers ran.
        KeyboardInterrupt: Ctrl-C or SIGTERM; the workers were stopped first (their trials end FAIL,
            ``fail_reason: interrupted``, and are queued for the next run).
    """
    console = console or Console()
    per = cfg.resources.processes_per_trial
    check_devices(cfg, n, gpus)
    study, bench = start_study(cfg, bench=bench, allow_changes=allow_changes)
    watch = StorageWatch(cfg, study)
    threads = worker_env(0, n, gpus).get("OMP_NUM_THREADS", "?")
    where = f"GPU {', '.join(gpus)}" if gpus else f"CPU, {threads} thread(s) each"
    console.print(
        f"[bold]{escape(cfg.study)}[/]: {count_finished(study)} finished trial(s) in {cfg.storage_label}; "
        f"target {cfg.n_trials}; {n} worker{'s' if n > 1 else ''} on {where}"
    )
    _close_connections(study)  # no database socket shared with a forked child: SQLAlchemy's rule for fork
    sys.stdout.flush()
    sys.stderr.flush()
    context = multiprocessing.get_context("spawn" if gpus else "fork")
    procs = [
        context.Process(
            target=_worker,
            name=f"w{k}",
            args=(cfg, None if gpus else bench, k, n, worker_env(k, n, gpus, per), os.getpid(), allow_changes),
        )
        for k in range(n)
    ]
    try:
        with interrupts.Guard():
            for p in procs:
                p.start()
            while any(p.is_alive() for p in procs):
                interrupts.stop_if_asked()  # a safe point: Ctrl-C or SIGTERM stops every worker
                multiprocessing.connection.wait([p.sentinel for p in procs if p.is_alive()], timeout=JOIN_POLL_S)
            for p in procs:
                p.join()
    except KeyboardInterrupt:
        _stop(procs)
        raise
    crashed = {k: p.exitcode for k, p in enumerate(procs) if p.exitcode not in (0, STOPPED_ON_FAILURES)}
    for k, code in crashed.items():
        how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
        console.print(f"[red]worker w{k} {how}[/]; the other workers went on")
    watch.check()  # a storage that went away while the workers ran: no summary of what it held
    print_summary(console, cfg, study)
    stopped = any(p.exitcode == STOPPED_ON_FAILURES for p in procs)  # each printed why
    return 1 if (crashed or stopped) and count_finished(study) < cfg.n_trials else 0


def _worker(
    cfg: StudyConfig, bench: Workbench | None, k: int, n: int, env: dict[str, str], parent: int, allow_changes: bool
) -> None:
    """Worker ``k`` of ``n``, of process ``parent``: run the trial loop, then leave with an exit code like ``hpo run``'s."""
    code = 1
    try:
        die_with_parent(parent)
        os.setsid()  # its own session: Ctrl-C at the terminal reaches the parent, which stops each worker once
        os.environ.update(env)  # before a spawned worker imports torch
        if bench is not None and "OMP_NUM_THREADS" in env:  # forked: torch read the variable in the parent
            import torch

            torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
        import optuna

        optuna.logging.set_verbosity(optuna.logging.ERROR)  # a spawned worker's own optuna: hpo prints its lines
        run_study(cfg, worker=k, bench=bench, allow_changes=allow_changes, workers=n)
        code = 0
    except TrialsFailed:  # its progress line said why
        code = STOPPED_ON_FAILURES
    except KeyboardInterrupt:
        code = 130
    except ConfigError as e:
        print(f"w{k}: error {e}", file=sys.stderr)
        code = 2
    except StorageLost as e:
        print(f"w{k}: error {cfg.masked(str(e))}", file=sys.stderr)
        code = 1
    except BaseException:  # noqa: BLE001 - a worker reports any crash as its exit code, after the traceback
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # not the parent's clean-up (atexit handlers, its database connections)


def die_with_parent(parent: int) -> None:
    """Have one SIGTERM sent to this process when process ``parent``, its parent, dies; now if it already has.

    A worker's SIGTERM ends its trial FAIL (``fail_reason: interrupted``) and queues it for the next run.
    On Linux the kernel tells the worker (``prctl(PR_SET_PDEATHSIG)``); elsewhere a daemon thread looks
    for a new parent every :data:`PARENT_POLL_S` seconds. Call it from the main thread.
    """
    once = threading.Lock()

    def parent_died(*_) -> None:
        if os.getppid() != parent and once.acquire(blocking=False):  # the orphan was adopted: its parent pid changed
            os.kill(os.getpid(), signal.SIGTERM)

    if _kernel_signals_parent_death(parent_died):
        parent_died()  # in case the parent died before the prctl: then no signal comes
    else:
        threading.Thread(target=_watch_parent, args=(parent, parent_died), name="parent-watch", daemon=True).start()


def _kernel_signals_parent_death(handler) -> bool:
    # Not SIGTERM itself: the signal comes when the parent *thread* exits, and a dying parent's children pass
    # to its other threads first (getppid() unchanged), so a worker gets it several times; a second SIGTERM
    # would interrupt the clean-up of the first one's trial (seen: trials left RUNNING, retries not queued).
    if not sys.platform.startswith("linux"):
        return False
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # no C library with prctl
        return False
    signal.signal(PARENT_DEATH_SIGNAL, handler)
    return prctl(PR_SET_PDEATHSIG, PARENT_DEATH_SIGNAL, 0, 0, 0) == 0


def _watch_parent(parent: int, parent_died) -> None:
    while os.getppid() == parent:
        time.sleep(PARENT_POLL_S)
    parent_died()


def _close_connections(study) -> None:
    import optuna

    storage = optuna_private.backend(study)  # optuna wraps the RDBStorage in a cache
    if isinstance(storage, optuna.storages.RDBStorage):
        storage.engine.dispose()  # pooled connections close; the engine reconnects on its next query


def _stop(procs: list[multiprocessing.process.BaseProcess]) -> None:
    for p in procs:
        if p.is_alive():
            p.terminate()  # SIGTERM: each worker ends its trial as interrupted, like Ctrl-C
    for p in procs:
        p.join(timeout=STOP_WAIT_S)
        if p.is_alive():
            p.kill()
            p.join()
