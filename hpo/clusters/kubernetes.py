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
STORAGE_KEY = "storage_url"  # the key of the Secret that holds the database URL


def job_name(study: str) -> str:
    """A Job name Kubernetes accepts (a DNS label, ≤ 52 characters so that pod names fit) for the study."""
    name = re.sub(r"[^a-z0-9-]+", "-", f"hpo-{study}".lower()).strip("-")
    return name[:52].rstrip("-")


def manifest(cfg: StudyConfig, run: Sequence[str], workers: int, gpus_per_worker: int, image: str | None = None):
    """The Indexed Job (a ``kubernetes.client.V1Job``) of ``workers`` pods, each running ``run`` (an ``hpo run``
    whose ``--storage`` the Secret gives).

    Raises:
        ConfigError: no image (``--image`` or ``resources.kubernetes.image``).
    """
    from kubernetes import client

    k8s = cfg.resources.kubernetes
    image = image or k8s.image
    if not image:
        raise ConfigError(
            [
                Problem(
                    COMMAND_LINE, None, "--image", "the container image the workers run (or resources.kubernetes.image)"
                )
            ]
        )
    limits = {"nvidia.com/gpu": str(gpus_per_worker)} if gpus_per_worker else None
    requests = {k: str(v) for k, v in (("cpu", k8s.cpus), ("memory", k8s.memory)) if v is not None} or None
    env = [
        client.V1EnvVar(
            name="HPO_STORAGE",
            value_from=client.V1EnvVarSource(
                secret_key_ref=client.V1SecretKeySelector(name=k8s.secret, key=STORAGE_KEY)
            ),
        ),
        client.V1EnvVar(  # the worker's trials record the pod that ran them
            name="HPO_JOB",
            value_from=client.V1EnvVarSource(field_ref=client.V1ObjectFieldSelector(field_path="metadata.name")),
        ),
    ]
    container = client.V1Container(
        name="worker",
        image=image,
        working_dir=k8s.workdir,
        command=[*run, "--storage", "$(HPO_STORAGE)"],
        env=env,
        resources=client.V1ResourceRequirements(limits=limits, requests=requests),
    )
    labels = {"app.kubernetes.io/name": "hpo", "hpo/study": job_name(cfg.study).removeprefix("hpo-")}
    pod = client.V1PodSpec(
        containers=[container],
        restart_policy="Never",  # a failed worker is a new pod (the failure policy below needs Never)
        termination_grace_period_seconds=k8s.grace_period_s,
        node_selector=dict(k8s.node_selector) or None,
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
    from kubernetes import client

    return client.ApiClient().sanitize_for_serialization(job)


def apply(job) -> str:
    """Create the Job with the kube-config's credentials; its name.

    Raises:
        ConfigError: no kube-config, or the cluster refused the Job (its own reason).
    """
    from kubernetes import client, config
    from kubernetes.config.config_exception import ConfigException

    try:
        config.load_kube_config()
    except (ConfigException, OSError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(
            [
                Problem(
                    COMMAND_LINE, None, "--apply", f"no kube-config to create the Job with ({reason}); use -o job.yaml"
                )
            ]
        ) from None
    try:
        created = client.BatchV1Api().create_namespaced_job(job.metadata.namespace, job)
    except client.ApiException as e:
        raise ConfigError(
            [Problem(COMMAND_LINE, None, "--apply", f"the cluster refused the Job: {e.reason}")]
        ) from None
    return created.metadata.name
