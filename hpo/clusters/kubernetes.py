"""``hpo submit --kubernetes``: the study's workers as one Indexed Job, a pod per worker, each an ``hpo run``.

The Job is built from the ``kubernetes`` client's own models (so a field it does not know fails here, not in
the cluster) and written as YAML, or created through the client when a kube-config is at hand. The storage URL
comes from a Secret (key ``storage_url``) through the pod's environment, never written in the Job.

Preemption is the pod's SIGTERM: the worker checkpoints its running trial within the grace period, ends it as
interrupted with its parameters queued again, and exits; the pod failure policy does not count a disruption
against the Job's retries, and the pod that replaces it resumes the trial from its checkpoint (on a volume
every pod mounts: ``output_dir`` on shared storage). Not run on a cluster here: the tests build and check it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from hpo.config import StudyConfig
from hpo.errors import ConfigError, Problem

COMMAND_LINE = "<command line>"
STORAGE_KEY = "storage_url"  # the key of the Secret that holds the database URL: hpo run reads it as HPO_STORAGE
OUTPUTS = "/hpo-outputs"  # where a pod mounts resources.kubernetes.volume_claim; output_dir points there


def job_name(study: str) -> str:
    """A Job name Kubernetes accepts (a DNS label, ≤ 52 characters so that pod names fit) for the study."""
    name = re.sub(r"[^a-z0-9-]+", "-", f"hpo-{study}".lower()).strip("-")
    return name[:52].rstrip("-")


def manifest(cfg: StudyConfig, run: Sequence[str], workers: int, gpus_per_worker: int, image: str | None = None):
    """The Indexed Job (a ``kubernetes.client.V1Job``) of ``workers`` pods, each running ``run`` (an ``hpo run``
    whose storage the Secret gives, as ``HPO_STORAGE``).

    Raises:
        ConfigError: no image (``--image`` or ``resources.kubernetes.image``), or trials across machines.
    """
    client = _client()
    k8s = cfg.resources.kubernetes
    image = image or k8s.image
    if not image:
        message = "the container image the workers run (or resources.kubernetes.image)"
        raise ConfigError([Problem(COMMAND_LINE, None, "--image", message)])
    if cfg.resources.nodes_per_trial > 1:
        message = "a trial across machines runs on Slurm only (hpo submit --slurm)"
        raise cfg.error(("resources", "nodes_per_trial"), message)
    run = [a.replace("$(", "$$(") for a in run]  # Kubernetes expands $(VAR) in a command; $$( is a literal $(
    volumes = mounts = None
    if k8s.volume_claim:  # outputs on a volume every pod mounts: a replacement pod resumes from the checkpoints
        claim = client.V1PersistentVolumeClaimVolumeSource(claim_name=k8s.volume_claim)
        volumes = [client.V1Volume(name="outputs", persistent_volume_claim=claim)]
        mounts = [client.V1VolumeMount(name="outputs", mount_path=OUTPUTS)]
        run = [*run, f"output_dir={OUTPUTS}/{cfg.study}"]
    limits = {"nvidia.com/gpu": str(gpus_per_worker)} if gpus_per_worker else None
    requests = {k: str(v) for k, v in (("cpu", k8s.cpus), ("memory", k8s.memory)) if v is not None} or None
    secret = client.V1SecretKeySelector(name=k8s.secret, key=STORAGE_KEY)
    pod_name = client.V1ObjectFieldSelector(field_path="metadata.name")
    env = [
        client.V1EnvVar(name="HPO_STORAGE", value_from=client.V1EnvVarSource(secret_key_ref=secret)),
        client.V1EnvVar(name="HPO_JOB", value_from=client.V1EnvVarSource(field_ref=pod_name)),  # on its trials
    ]
    container = client.V1Container(
        name="worker",
        image=image,
        working_dir=k8s.workdir,
        command=run,
        env=env,
        resources=client.V1ResourceRequirements(limits=limits, requests=requests),
        volume_mounts=mounts,
    )
    labels = {"app.kubernetes.io/name": "hpo", "hpo/study": job_name(cfg.study).removeprefix("hpo-")}
    pod = client.V1PodSpec(
        containers=[container],
        restart_policy="Never",  # a failed worker is a new pod (the failure policy below needs Never)
        termination_grace_period_seconds=k8s.grace_period_s,
        node_selector=dict(k8s.node_selector) or None,
        volumes=volumes,
    )
    disrupted = client.V1PodFailurePolicyOnPodConditionsPattern(type="DisruptionTarget", status="True")
    return client.V1Job(
        api_version="batch/v1",
        kind="Job",
        metadata=client.V1ObjectMeta(name=job_name(cfg.study), namespace=k8s.namespace, labels=labels),
        spec=client.V1JobSpec(
            completion_mode="Indexed",
            completions=workers,
            parallelism=workers,
            backoff_limit=3 * workers,  # crashes; a preemption is not one (the policy below)
            pod_failure_policy=client.V1PodFailurePolicy(
                rules=[client.V1PodFailurePolicyRule(action="Ignore", on_pod_conditions=[disrupted])]
            ),
            template=client.V1PodTemplateSpec(metadata=client.V1ObjectMeta(labels=labels), spec=pod),
        ),
    )


def as_dict(job) -> dict[str, Any]:
    """The Job as the API's JSON (camelCase keys, no empty fields), the body ``kubectl apply`` takes."""
    return _client().ApiClient().sanitize_for_serialization(job)


def connect() -> None:
    """Load the kube-config that :func:`apply` creates the Job with.

    Raises:
        ConfigError: there is none, or it cannot be read.
    """
    _client()
    from kubernetes import config
    from kubernetes.config.config_exception import ConfigException

    try:
        config.load_kube_config()
    except (ConfigException, OSError, TypeError, ValueError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        message = f"no kube-config to create the Job with ({reason}); use -o job.yaml"
        raise ConfigError([Problem(COMMAND_LINE, None, "--apply", message)]) from None


def apply(job) -> str:
    """Create the Job (after :func:`connect`); its name.

    Raises:
        ConfigError: the cluster refused the Job or cannot be reached (its own reason).
    """
    client = _client()
    try:
        created = client.BatchV1Api().create_namespaced_job(job.metadata.namespace, job)
    except client.ApiException as e:
        raise ConfigError(
            [Problem(COMMAND_LINE, None, "--apply", f"the cluster refused the Job: {e.reason}")]
        ) from None
    except Exception as e:  # noqa: BLE001 - urllib3's connection errors: the API server is not reachable
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise ConfigError([Problem(COMMAND_LINE, None, "--apply", f"cannot reach the cluster: {reason}")]) from None
    return created.metadata.name


def _client():
    """The ``kubernetes`` client's module, or a one-line error naming the extra that installs it."""
    try:
        from kubernetes import client
    except ImportError:
        message = 'needs the kubernetes client: pip install "hpo[kubernetes]"'
        raise ConfigError([Problem(COMMAND_LINE, None, "--kubernetes", message)]) from None
    return client
