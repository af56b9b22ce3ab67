"""Devices and worker counts: the GPUs a run may use, how many workers fit this machine, what each one sees.

Light to import (no torch until the visible GPUs are counted): :mod:`hpo.api` checks ``gpus`` with it at once.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path

from hpo.config import StudyConfig

#: A GPU as CUDA_VISIBLE_DEVICES names it: an index, or a UUID (GPU-…, MIG-…; older MIG ids have slashes)
GPU_ID = r"\d+|(GPU|MIG)-[\w/-]+"


def parse_gpus(gpus: str | Sequence[str] | None) -> list[str]:
    """GPU indexes or UUIDs: ``"0, 1"`` → ``["0", "1"]``; None → ``[]``.

    Raises:
        ValueError: one that is neither an index nor a ``GPU-``/``MIG-`` UUID, or none at all.
    """
    if gpus is None:
        return []
    listed = gpus.split(",") if isinstance(gpus, str) else [gpus] if isinstance(gpus, int) else gpus
    ids = [str(g).strip() for g in listed if str(g).strip()]
    bad = next((g for g in ids if not re.fullmatch(GPU_ID, g)), None)
    if bad is not None or not ids:
        raise ValueError(f"{bad or gpus!r} is not a GPU index (0, 1, …) or UUID (GPU-…, MIG-…)")
    if twice := next((g for i, g in enumerate(ids) if g in ids[:i]), None):
        raise ValueError(f"GPU {twice} is named twice: one worker (or rank) per GPU")
    return ids


def gpu_ids() -> list[str]:
    """The visible CUDA devices, to spread workers over when no GPUs are named (:func:`parse_gpus`)."""
    if (visible := os.environ.get("CUDA_VISIBLE_DEVICES")) is not None:
        # CUDA's rule: the devices listed up to the first entry that is not one (-1 hides them all) or repeats
        ids: list[str] = []
        for g in (g.strip() for g in visible.split(",")):
            if not re.fullmatch(GPU_ID, g) or g in ids:
                break
            ids.append(g)
        return ids
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def auto_workers(cfg: StudyConfig, gpus: Sequence[str], model_path: str | None = None, per_gpu: int = 1) -> int:
    """``--workers auto``: ``per_gpu`` workers per GPU (:func:`measured_workers_per_gpu`; one per
    ``processes_per_trial`` GPUs for multi-process trials), else one per CPU core (each with
    one thread: two 1-thread workers did 1.58x the steps per second of one 2-thread process on 2 cores, and a
    12-trial study on 1,200 rows had 17 trials done in the Trainer search's time for 12, docs/performance.md); at
    most ``n_trials // 4``, so that a seeded TPE learns from at least four batches (:mod:`hpo.study.ordered`).

    On CPU each worker trains its own copy of the model in the machine's memory, so there are at most as many as
    the available memory holds at :func:`worker_mb` each (``model_path``: the model's folder). Several workers to a
    GPU are processes too: at most one per core, and as many as the host's memory holds at
    :data:`GPU_WORKER_HOST_MB` plus the weights each.
    """
    from hpo.trial import memory  # torch: only when the machine's memory is asked

    per, cores = cfg.resources.processes_per_trial, os.cpu_count() or 1
    n = cores // per
    if gpus:  # several to a GPU: each is a process of its own, with a core and host memory of its own
        n = len(gpus) // per if per > 1 else min(len(gpus) * per_gpu, cores)
    need = (GPU_WORKER_HOST_MB + weights_mb(model_path)) if gpus else worker_mb(model_path)
    if (n > len(gpus) or not gpus) and need and (have := memory.available_mb()) is not None:
        n = min(n, int(have // (need * per)))
    return max(1, min(n, cfg.n_trials // 4))


def measured_workers_per_gpu(cfg: StudyConfig, gpu: str) -> int:
    """How many one-process workers share a GPU, from ``hpo check``'s hungriest corner measured on GPU ``gpu``
    (:attr:`hpo.trial.preflight.CheckReport.workers_per_gpu`); 1 when the check cannot say (its error comes
    again from the first trial). Measured in a spawned process: CUDA never starts in the parent of spawned
    workers, and the model the check loads leaves with that process."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1, initializer=_see_only, initargs=(gpu,)) as pool:
        return pool.apply(_workers_per_gpu, (cfg,))


def _see_only(gpu: str) -> None:
    os.environ["CUDA_VISIBLE_DEVICES"] = gpu  # before the check imports torch


def _workers_per_gpu(cfg: StudyConfig) -> int:
    from hpo.trial.preflight import check
    from hpo.trial.workbench import quiet

    try:
        with quiet():
            return check(cfg).workers_per_gpu or 1
    except Exception:  # noqa: BLE001 - a corner that cannot train: one worker per GPU, and its trials say why
        return 1


#: What a GPU worker holds in host memory beside its model's weights: torch, CUDA's libraries, the data
GPU_WORKER_HOST_MB = 3072


def weights_mb(model_path: str | None) -> float:
    """The size of the model's weight files, MiB (0 for a model that is not a folder on disk)."""
    if model_path is None or not Path(model_path).is_dir():
        return 0.0
    weights = 0
    for f in Path(model_path).iterdir():
        if f.suffix in (".safetensors", ".bin"):
            with contextlib.suppress(OSError):  # a broken link of a hub cache's unfinished download: not weights
                weights += f.stat().st_size
    return weights / 2**20


def worker_mb(model_path: str | None) -> float | None:
    """What one CPU worker may need: 8× the model's weight files (16 bytes a parameter for weights, gradients and
    Adam's two states in fp32, from files that may hold 2 bytes a parameter) and 1 GiB for the rest (torch,
    activations, the data). None for a model that is not a folder on disk (built from a config: a small one)."""
    if model_path is None or not Path(model_path).is_dir():
        return None
    return 8 * weights_mb(model_path) + 1024


def check_devices(cfg: StudyConfig, n: int, gpus: Sequence[str]) -> None:
    """``n`` workers × ``resources.processes_per_trial`` processes (when over 1) fit the GPUs (on CPU: the cores).

    Raises:
        ConfigError: they do not; one rank per GPU (or core) is the rule, sharing one would only slow both.
    """
    per = cfg.resources.processes_per_trial
    have, what = (len(gpus), "GPU(s)") if gpus else (os.cpu_count() or 1, "CPU core(s)")
    if per > 1 and n * per > have:  # one-process workers may share (round robin, threads shared out), as ever
        raise cfg.error(
            ("resources", "processes_per_trial"),
            f"{n} worker(s) × {per} processes per trial need {n * per} {what}; this machine has {have} "
            "(hpo run and hpo validate check the machine they run on)",
        )


def worker_env(k: int, n: int, gpus: Sequence[str], per_trial: int = 1) -> dict[str, str]:
    """What worker ``k`` changes in its environment: ``per_trial`` GPUs of its own (round robin), or on CPU a
    share of the cores."""
    if gpus:
        return {"CUDA_VISIBLE_DEVICES": ",".join(gpus[(k * per_trial + i) % len(gpus)] for i in range(per_trial))}
    env = {"TOKENIZERS_PARALLELISM": "false"}  # forked after the parent tokenized with threads: say so, once
    if "OMP_NUM_THREADS" not in os.environ:  # N workers × all cores each would oversubscribe the CPU
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // n))
    return env


def check_launcher(cfg: StudyConfig) -> None:
    """A trial over several machines (``resources.nodes_per_trial``) needs its launcher: ``srun`` inside a Slurm
    allocation of as many nodes, unless ``resources.launcher: local`` rehearses it on this machine.

    Raises:
        ConfigError: no ``srun``, no allocation, or one with fewer nodes.
    """
    nodes = cfg.resources.nodes_per_trial
    if nodes == 1 or cfg.resources.launcher == "local":
        return
    have = os.environ.get("SLURM_JOB_NUM_NODES") or os.environ.get("SLURM_NNODES")
    if shutil.which("srun") is None or not have:
        raise cfg.error(
            ("resources", "nodes_per_trial"),
            f"{nodes} nodes per trial need a launcher: run inside a Slurm allocation of {nodes} nodes (hpo submit "
            "--slurm asks for them), or set resources.launcher: local to rehearse it on this machine",
        )
    if int(have) < nodes:
        raise cfg.error(("resources", "nodes_per_trial"), f"{nodes} nodes per trial; this Slurm allocation has {have}")
