"""``resources.slurm`` and ``resources.kubernetes``: how ``hpo submit`` asks a cluster for the workers."""

from __future__ import annotations

import re
from typing import Any

from pydantic import Field, PositiveFloat, PositiveInt, field_validator

from hpo.config.strict import Strict

SBATCH_SET_BY_HPO = (
    *("array", "job-name", "output", "error", "open-mode", "signal", "requeue", "chdir", "export"),
    *("wrap", "wait", "test-only", "parsable", "hold"),
)
SBATCH_TIMES = ("time", "time-min", "begin", "deadline")  # YAML reads an unquoted 8:00:00 as 28800 (base 60)


class SlurmSettings(Strict):
    """How ``hpo submit --slurm`` asks Slurm for the workers (the command line's options win)."""

    setup: str | None = Field(
        None,
        min_length=1,
        description="Shell lines each worker runs before hpo, e.g. 'module load cuda; source ~/venv/bin/activate'; "
        "default: the hpo of the Python that submitted (a shared filesystem).",
    )
    sbatch: dict[str, str | int | float | bool] = Field(
        {},
        description="More #SBATCH options by their long name, e.g. {mem: 64G, partition: gpu, time: '04:00:00'}; "
        "true writes the bare flag. hpo sets " + ", ".join(SBATCH_SET_BY_HPO) + " itself.",
    )

    @field_validator("sbatch")
    @classmethod
    def _options(cls, value: dict[str, Any]) -> dict[str, Any]:
        for name, v in value.items():
            if not re.fullmatch(r"[a-z][a-z0-9-]*", name):
                raise ValueError(f"{name!r} is not an sbatch option's long name (like mem or cpus-per-task)")
            if name in SBATCH_SET_BY_HPO:
                raise ValueError(f"{name}: hpo submit sets it itself")
            if name in SBATCH_TIMES and not isinstance(v, str):
                raise ValueError(f"{name}: quote the time ({name}: '8:00:00'); unquoted, YAML reads it as {v!r}")
            if v is False or any(c in str(v) for c in '\n\r"'):
                raise ValueError(
                    f"{name}: {v!r} is not an option's value (one line, no quotes; leave out one set false)"
                )
        return value


class KubernetesSettings(Strict):
    """How ``hpo submit --kubernetes`` writes the workers' Indexed Job (the command line's options win)."""

    image: str | None = Field(
        None, min_length=1, description="The container image: hpo installed, the study folder at workdir."
    )
    workdir: str = Field(
        "/work",
        min_length=1,
        description="The folder inside the image that hpo submit ran in: the study file's path is relative to it.",
    )
    namespace: str = Field("default", min_length=1, description="The namespace the Job is created in.")
    secret: str = Field(
        "hpo-storage",
        min_length=1,
        description="The Secret whose key storage_url holds the study's database URL (never written in the Job).",
    )
    grace_period_s: PositiveInt = Field(
        300, description="Seconds a pod gets after SIGTERM (preemption) to checkpoint its trial and stop."
    )
    cpus: PositiveFloat | None = Field(None, description="CPU request per worker.")
    memory: str | None = Field(None, min_length=1, description="Memory request per worker, e.g. 32Gi.")
    node_selector: dict[str, str] = Field({}, description="Pod nodeSelector, e.g. {gpu-type: h100}.")
    volume_claim: str | None = Field(
        None,
        min_length=1,
        description="A PersistentVolumeClaim every pod mounts for output_dir (checkpoints, best model, artifacts): "
        "without one a pod's outputs go with it and a preempted trial starts over.",
    )
