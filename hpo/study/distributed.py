"""Trials bigger than one process: ``resources.processes_per_trial`` ranks (on each of ``nodes_per_trial``
machines) of one torch.distributed job.

The worker launches each such trial with torch's own launcher (``torchrun --standalone``: rendezvous on a
free local port, gloo on CPU, NCCL on GPU, one GPU per rank), and the Trainer does the rest: DDP, or the
``train.fsdp``/``train.deepspeed`` it is given. A trial over ``resources.nodes_per_trial`` machines is one
torchrun agent per node meeting at a c10d rendezvous on the worker's node, started by ``srun`` within the
worker's Slurm allocation (:func:`launch_commands`). hpo's part is small and lives here:

- the job (the worker's model and data, the trial plan, the trial's id and the study's pruner) is pickled
  into a folder; every rank runs :func:`hpo.trial.finetune.run_trial` on it (``python -m hpo.study.distributed JOB``);
- rank 0 alone talks to Optuna, through optuna-integration's ``TorchDistributedTrial``, which broadcasts
  the pruner's answer so that every rank stops at the same step; it stages the model when it may be the
  study's best, and writes the trial's result for the worker, which records it as for a one-process trial;
- a retrain of a finished trial (``hpo train --best``) runs the same job with a ``FixedTrial`` (nothing
  reported) and rank 0 saves the model where it is asked to: the same ranks, so the same global batch;
- a rank that fails writes its exception; the worker raises it again (an out-of-memory stays one, so the
  trial retries at a smaller micro-batch);
- no rank outlives the trial: the launcher gets SIGTERM when the worker dies (``PR_SET_PDEATHSIG``) and
  passes it on, each rank gets SIGKILL when the launcher dies, and Ctrl-C or SIGTERM of the worker stops
  the launcher (its ranks save a checkpoint first when the study checkpoints).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import torch

from hpo import optuna_private
from hpo.trial import interrupts, memory
from hpo.trial.finetune import TrialResult
from hpo.trial.plan import TrialPlan
from hpo.trial.workbench import Workbench

STOP_WAIT_S = 120  # after Ctrl-C, how long the ranks get to save a checkpoint and end before SIGKILL
LAUNCHER_END_S = 15  # of that, what the launcher keeps to end after its ranks
POLL_S = 1.0  # how often the worker looks at the job (done? new evaluations to print?)
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
#: Exceptions a rank raised that the worker raises again as themselves (by name); others become RankFailed.
KNOWN = {
    e.__name__: e
    for e in (
        memory.TrainOutOfMemory,
        memory.EvalOutOfMemory,
        torch.OutOfMemoryError,
        FloatingPointError,
        KeyboardInterrupt,
    )
}


class RankFailed(RuntimeError):
    """A rank of a multi-process trial failed; the message names the rank and its exception."""


def needed(cfg) -> bool:
    """Whether the study's trials run as torch.distributed jobs: several processes, or a Trainer engine (FSDP,
    DeepSpeed) that wants a launcher even for one."""
    return cfg.resources.ranks > 1 or bool(cfg.train.get("fsdp")) or bool(cfg.train.get("deepspeed"))


@dataclass
class Job:
    """What every rank needs: pickled by the worker, read by each rank."""

    bench: Workbench
    plan: TrialPlan
    trial_id: int | None  # None: a FixedTrial's retrain, which reports to no study
    number: int
    pruner: optuna.pruners.BasePruner | None
    params: dict[str, Any]
    checkpoint_dir: Path | None
    run_name: str | None = None  # default trial-NNNN
    save_to: Path | None = None  # rank 0 saves the model there (hpo.trial.finetune.save_model) instead of staging it


def run_trial(
    bench: Workbench,
    plan: TrialPlan,
    trial: optuna.Trial | optuna.trial.FixedTrial,
    on_eval: Callable[[int, float], None] | None = None,
    meter: memory.PeakMeter | None = None,
    checkpoint_dir: Path | None = None,
    run_name: str | None = None,
    save_to: Path | None = None,
    params: dict[str, Any] | None = None,
) -> TrialResult:
    """:func:`hpo.trial.finetune.run_trial` as ``resources.processes_per_trial`` processes; the same result, whose model
    rank 0 already staged (``model`` is None).

    With ``save_to`` (a retrain, under a ``FixedTrial``: nothing is reported), rank 0 saves the model as that
    folder (:func:`hpo.trial.finetune.save_model`, with ``params``, default the trial's) instead.

    Raises:
        torch.OutOfMemoryError: a rank ran out of memory (its subclass tells training from evaluation).
        FloatingPointError: the model diverged.
        KeyboardInterrupt: Ctrl-C or SIGTERM here; the ranks were stopped (a checkpoint saved, if the study saves).
        RankFailed: a rank failed otherwise, or the launcher ended with no result.
    """
    cfg = bench.cfg
    job_dir = Path(tempfile.mkdtemp(prefix=f".trial-{trial.number:04d}-", dir=_mkdir(cfg.output_path)))
    try:
        fixed = isinstance(trial, optuna.trial.FixedTrial)
        job = Job(
            bench,
            plan,
            None if fixed else optuna_private.trial_id(trial),
            trial.number,
            None if fixed else trial.study.pruner,
            dict(trial.params if params is None else params),
            checkpoint_dir,
            run_name,
            save_to,
        )
        (job_dir / "job.pkl").write_bytes(pickle.dumps(job))
        n = cfg.resources.processes_per_trial
        with open(job_dir / "launcher.log", "ab") as log:
            procs = [
                subprocess.Popen(
                    command,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    # torchrun SIGKILLs the ranks 30 s after it passes on a SIGTERM: too soon for a large model's
                    # checkpoint. They get ours, less the time the launcher needs to end after them.
                    env={
                        **os.environ,
                        **rank_env(n),
                        "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": str(STOP_WAIT_S - LAUNCHER_END_S),
                    },
                    start_new_session=True,  # Ctrl-C at the terminal reaches the worker, which stops the launcher once
                    preexec_fn=lambda: _die_with_parent(signal.SIGTERM),
                )
                for command in launch_commands(cfg, job_dir)
            ]
        try:
            _wait(procs, trial, on_eval)
        except KeyboardInterrupt:
            if not (job_dir / "result.pkl").exists():
                raise  # the ranks stopped (at a checkpoint, if the study saves)
            # they had finished the trial: it is kept, and the run stops at its next safe point
        return _result(job_dir, next((p.returncode for p in procs if p.returncode), 0), meter)
    finally:
        shutil.rmtree(job_dir, ignore_errors=True)


def launch_commands(cfg, job_dir: Path) -> list[list[str]]:
    """The command lines that start a trial's ranks: one torchrun on this machine, or over ``nodes_per_trial``
    machines one agent per node meeting at a c10d rendezvous here (``srun`` starts them on the allocation's nodes;
    ``launcher: local``, every agent on this machine)."""
    resources = cfg.resources
    torchrun = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={resources.processes_per_trial}"]
    ranks = ["--max-restarts=0", "-m", "hpo.study.distributed", str(job_dir)]
    nodes = resources.nodes_per_trial
    if nodes == 1:
        return [[*torchrun, "--standalone", *ranks]]
    host = "127.0.0.1" if resources.launcher == "local" else socket.gethostname()
    with socket.socket() as s:  # a free port for the rendezvous's store, as torchrun --standalone picks one
        s.bind(("127.0.0.1" if resources.launcher == "local" else "", 0))
        port = s.getsockname()[1]
    rendezvous = [
        f"--nnodes={nodes}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={host}:{port}",
        f"--rdzv-id={job_dir.name}",
    ]
    if resources.launcher == "local":
        return [[*torchrun, *rendezvous, *ranks] for _ in range(nodes)]
    srun = ["srun", f"--nodes={nodes}", f"--ntasks={nodes}", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    return [[*srun, *torchrun, *rendezvous, *ranks]]


def rank_env(n: int) -> dict[str, str]:
    """The ranks' environment: threads shared out on CPU (the launcher would set 1), the CPU told to accelerate."""
    env = {"OMP_NUM_THREADS": str(max(1, torch.get_num_threads() // n)), "TOKENIZERS_PARALLELISM": "false"}
    if not torch.cuda.is_available():
        env["ACCELERATE_USE_CPU"] = "true"  # else the Trainer sees no accelerator and trains each rank alone
    return env


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _wait(procs: list[subprocess.Popen], trial: optuna.Trial, on_eval) -> None:
    """Until the launchers end, telling ``on_eval`` the evaluations rank 0 reported; on Ctrl-C or SIGTERM, or when
    one launcher failed (its node's agents are gone: the others would wait for them), stop them."""
    shown = 0
    try:
        while alive := [p for p in procs if p.poll() is None]:  # every launcher polled: none left unseen
            interrupts.stop_if_asked()  # a safe point: Ctrl-C or SIGTERM of the worker stops the launcher
            if any(p.returncode for p in procs):
                raise RankFailed("a node's launcher failed")  # _result reads why from the ranks' errors
            with contextlib.suppress(subprocess.TimeoutExpired):
                alive[0].wait(timeout=POLL_S)
            if on_eval is not None and isinstance(trial, optuna.Trial):  # a FixedTrial reports nowhere
                values = sorted(optuna_private.intermediate_values(trial).items())
                for step, value in values[shown:]:
                    on_eval(step, value)
                shown = len(values)
    except BaseException as e:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)  # the launcher passes it to the ranks and waits for them
        end = time.monotonic() + STOP_WAIT_S
        for proc in procs:
            try:
                proc.wait(timeout=max(0.0, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if isinstance(e, RankFailed):
            return  # the ranks' own errors say more
        raise


def _result(job_dir: Path, code: int, meter: memory.PeakMeter | None) -> TrialResult:
    result = job_dir / "result.pkl"
    if result.exists():  # rank 0 wrote it last: the trial ran to its end, whatever ended the launcher since
        out = pickle.loads(result.read_bytes())
        if meter is not None:
            meter.record(out.attrs.get("peak_memory_mb", 0.0))
        return out
    errors = sorted(job_dir.glob("error-*.json"), key=lambda p: p.stat().st_mtime)
    if not errors:
        log = (job_dir / "launcher.log").read_text(errors="replace").strip().splitlines()
        raise RankFailed(f"the trial's processes ended with exit code {code}: {(log or [''])[-1][:500]}")
    first = [json.loads(p.read_text()) for p in errors]
    # An out-of-memory anywhere decides (a rank's peer then fails on the broken group); else the first to fail.
    error = next((e for e in first if e["type"] in KNOWN), first[0])
    if meter is not None:
        meter.record(error.get("peak_mb", 0.0))
    if error["type"] in KNOWN:
        raise KNOWN[error["type"]](error["message"])
    raise RankFailed(f"rank {error['rank']}: {error['type']}: {error['message']}\n{error['traceback']}")


def _die_with_parent(sig: int) -> None:
    """Have the kernel send ``sig`` to this process when its parent dies (Linux); nothing elsewhere."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)


def main(job_dir: Path) -> int:
    """One rank of a trial: run it, and on rank 0 stage the model and write the result; 0, else 1 (130: stopped)."""
    parent = os.getppid()
    _die_with_parent(signal.SIGKILL)  # the launcher died: nothing would collect this rank
    if os.getppid() != parent:
        return 1
    rank = int(os.environ["RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))  # one GPU per rank; bitsandbytes loads onto it
    job: Job = pickle.loads((job_dir / "job.pkl").read_bytes())
    meter = memory.PeakMeter(job.bench.device)
    # SIGTERM from the launcher: a checkpoint at the step's end, or a stop at the next safe point; once the trial
    # trained to its end, nothing stops it (the model staged, the result written: the worker keeps the trial).
    with interrupts.Guard():
        return _rank(job, rank, meter, job_dir)


def _rank(job: Job, rank: int, meter: memory.PeakMeter, job_dir: Path) -> int:
    """:func:`main`'s work, under its guard: an error is written for the worker to read."""
    try:
        result, trial = _run(job, rank, meter)
        if rank == 0:
            if job.save_to is not None:
                from hpo.trial.finetune import save_model

                save_model(job.bench, result, job.params, job.number, job.save_to)
            elif not result.pruned:
                from hpo.study.outputs import stage_if_best

                stage_if_best(job.bench, result, job.params, trial)
            result.model = None
            tmp = job_dir / "result.pkl.tmp"
            tmp.write_bytes(pickle.dumps(result))
            tmp.rename(job_dir / "result.pkl")
        return 0
    except BaseException as e:  # noqa: BLE001 - every failure goes to the worker, which records it on the trial
        error = {
            "rank": rank,
            "type": type(e).__name__,
            "message": str(e),
            "traceback": traceback.format_exc()[-4000:],
            "peak_mb": meter.peak_mb,
        }
        (job_dir / f"error-{rank}.json").write_text(json.dumps(error))
        return 130 if isinstance(e, KeyboardInterrupt) else 1


def _run(job: Job, rank: int, meter: memory.PeakMeter) -> tuple[TrialResult, optuna.Trial | None]:
    from optuna_integration import TorchDistributedTrial

    from hpo.study.storage import rdb_storage
    from hpo.trial.finetune import run_trial as run_one

    cfg = job.bench.cfg
    # The group first (the Trainer's accelerate then uses it): TorchDistributedTrial broadcasts from its first call.
    torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    trial = None
    if rank == 0 and job.trial_id is None:  # a retrain: reports to no study
        trial = optuna.trial.FixedTrial(job.params, job.number)
    elif rank == 0:
        study = optuna.load_study(
            study_name=cfg.study, storage=rdb_storage(cfg), sampler=optuna.samplers.RandomSampler(), pruner=job.pruner
        )
        trial = optuna_private.trial_by_id(study, job.trial_id)
    result = run_one(
        job.bench,
        job.plan,
        TorchDistributedTrial(trial),
        run_name=job.run_name or f"trial-{job.number:04d}",
        meter=meter,
        checkpoint_dir=job.checkpoint_dir,
    )
    return result, trial


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
