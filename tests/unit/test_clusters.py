"""hpo submit's jobs, built without a scheduler: the Slurm script, the Kubernetes Job, and what is refused."""

import json
import shlex
import sys
from pathlib import Path

import pytest
import yaml

from hpo.api import load
from hpo.cli import _parse_overrides
from hpo.clusters import kubernetes, slurm, worker_command
from hpo.errors import ConfigError

PG = "postgresql+psycopg://hpo@db.example:5432/hpo"

SCRIPT = """\
#!/bin/bash
#SBATCH --job-name=hpo-tiny
#SBATCH --array=0-1
#SBATCH --ntasks=1
#SBATCH --mem=8G
#SBATCH --partition=gpu
#SBATCH --time=04:00:00
#SBATCH --gres=gpu:1
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
#SBATCH --open-mode=append
#SBATCH --export=ALL
#SBATCH --output=OUT/slurm/%A_%a.out
#SBATCH --chdir=CWD
# hpo submit: each task of this array is one worker of study tiny, an `hpo run` on its storage.
# 300 s before the time limit (USR1) the worker checkpoints its trial and stops, and the
# task goes back in the queue; a preemption's SIGTERM does the same. The next start resumes the trial.
export HPO_JOB="${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}" COLUMNS="${COLUMNS:-160}"  # a log file's width
echo "hpo: worker $HPO_JOB on $(hostname), start $((${SLURM_RESTART_COUNT:-0} + 1))"
worker= stop= requeue=
trap 'stop=1 requeue=1; [ -z "$worker" ] || kill -TERM "$worker" 2>/dev/null' USR1
trap 'stop=1; [ -z "$worker" ] || kill -TERM "$worker" 2>/dev/null' TERM
source /shared/venv/bin/activate
code=130  # stopped before the worker started
if [ -z "$stop" ]; then
  hpo run STUDY --workers 1 --env prod train.learning_rate=0.0001 &
  worker=$!
  [ -z "$stop" ] || kill -TERM "$worker" 2>/dev/null  # a signal came as it started
  while :; do
    wait "$worker"; code=$?
    kill -0 "$worker" 2>/dev/null || break  # else a signal cut the wait short: the worker is stopping
  done
  wait "$worker" 2>/dev/null; last=$?  # its own exit code, if it ended just after a signal cut a wait short
  [ "$last" -eq 127 ] || code=$last
fi
if [ -n "$requeue" ] && [ "$code" -ne 0 ]; then
  echo "hpo: worker $HPO_JOB stopped before the time limit; requeued"
  scontrol requeue "$HPO_JOB"
fi
exit "$code"
"""


@pytest.fixture
def pg_study(write_study):
    return write_study(
        storage=PG,
        resources={"slurm": {"setup": "source /shared/venv/bin/activate", "sbatch": {"mem": "8G", "partition": "cpu"}}},
    )


def test_the_slurm_script_is_pinned(pg_study, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    cfg = load(pg_study)
    job = slurm.SlurmJob(workers=2, gpus_per_worker=1, options={"partition": "gpu", "time": "04:00:00"})
    run = shlex.join(worker_command(pg_study, env="prod", overrides={"train.learning_rate": 1e-4}, installed=True))
    text = slurm.script(cfg, job, run)
    expected = SCRIPT.replace("OUT", str(cfg.output_path)).replace("CWD", str(tmp_path))
    assert text == expected.replace("STUDY", str(pg_study.resolve()))  # the command line's partition wins


def test_the_worker_gets_the_overrides_back_as_they_were_typed():
    overrides = {"train.learning_rate": 1e-4, "name": "003", "search_space.x.choices": [1, "a b"], "flag": True}
    command = worker_command(Path("s.yaml"), overrides=overrides)
    assert command[:3] == [sys.executable, "-m", "hpo.cli"]
    assert _parse_overrides(command[command.index("1") + 1 :]) == overrides


def test_sqlite_storage_is_refused_for_submission_in_one_line(write_study):
    cfg = load(write_study())  # the default: SQLite beside the study file
    with pytest.raises(ConfigError) as e:
        slurm.check_shared_storage(cfg)
    (problem,) = e.value.problems
    assert problem.key == "storage" and "SQLite cannot be shared" in problem.message


@pytest.mark.parametrize(
    "sbatch, message",
    [
        ({"array": "0-9"}, "array: hpo submit sets it itself"),
        ({"Mem": "8G"}, "not an sbatch option's long name"),
        ({"mem": "8G\n#SBATCH --array=0-99"}, "is not an option's value"),
    ],
)
def test_sbatch_options_hpo_owns_or_that_break_the_script_are_refused(write_study, sbatch, message):
    with pytest.raises(ConfigError) as e:
        load(write_study(storage=PG, resources={"slurm": {"sbatch": sbatch}}))
    (problem,) = e.value.problems
    assert problem.key.startswith("resources.slurm.sbatch") and message in problem.message and problem.line


def test_the_kubernetes_job_is_an_indexed_job_the_client_reads_back(write_study):
    from kubernetes import client

    path = write_study(
        study="Tiny_Study",
        storage=PG,
        resources={
            "kubernetes": {
                "image": "ghcr.io/acme/hpo:1",
                "grace_period_s": 600,
                "memory": "16Gi",
                "volume_claim": "ckpt",
            }
        },
    )
    run = worker_command(Path("studies/tiny.yaml"), overrides={"note": "$(HOME)"}, installed=True, resolve=False)
    body = kubernetes.as_dict(kubernetes.manifest(load(path), run, workers=3, gpus_per_worker=2))
    # Read back as the server's JSON by the client's models (generated from Kubernetes' OpenAPI schema): an
    # unknown field is dropped, a missing required one or a wrong type raises.
    job = client.ApiClient().deserialize(json.dumps(body), "V1Job", "application/json")
    assert client.ApiClient().sanitize_for_serialization(job) == body, "every field survives the round trip"
    assert job.metadata.name == "hpo-tiny-study" and job.spec.completion_mode == "Indexed"
    assert job.spec.completions == job.spec.parallelism == 3
    pod = job.spec.template.spec
    assert pod.termination_grace_period_seconds == 600 and pod.restart_policy == "Never"
    (worker,) = pod.containers
    assert worker.image == "ghcr.io/acme/hpo:1" and worker.working_dir == "/work"
    assert worker.command == [
        *("hpo", "run", "studies/tiny.yaml", "--workers", "1"),
        "note=$$(HOME)",  # Kubernetes would expand $(HOME)
        "output_dir=/hpo-outputs/Tiny_Study",  # on the volume every pod mounts: checkpoints outlive a pod
    ]
    (volume,) = pod.volumes
    assert volume.persistent_volume_claim.claim_name == "ckpt" and worker.volume_mounts[0].mount_path == "/hpo-outputs"
    assert worker.resources.limits == {"nvidia.com/gpu": "2"} and worker.resources.requests == {"memory": "16Gi"}
    storage = next(e for e in worker.env if e.name == "HPO_STORAGE")
    assert storage.value is None and storage.value_from.secret_key_ref.to_dict() == {
        "name": "hpo-storage",
        "key": "storage_url",
        "optional": None,
    }
    assert PG not in yaml.safe_dump(body), "the storage URL stays in the Secret"
    (rule,) = job.spec.pod_failure_policy.rules  # a preemption is not a failure the Job counts
    assert rule.action == "Ignore" and rule.on_pod_conditions[0].type == "DisruptionTarget"


def test_a_kubernetes_job_needs_an_image(write_study):
    with pytest.raises(ConfigError, match="--image: the container image"):
        kubernetes.manifest(load(write_study(storage=PG)), ["hpo", "run", "s.yaml"], 1, 0)


def test_apply_without_a_kube_config_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "none"))
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(ConfigError) as e:
        kubernetes.connect()  # what hpo submit --kubernetes --apply asks before it creates the study
    (problem,) = e.value.problems
    assert problem.key == "--apply" and "no kube-config" in problem.message and "\n" not in str(problem)


def test_a_command_line_option_that_would_break_the_script_is_refused(write_study):
    cfg = load(write_study(storage=PG))
    with pytest.raises(ConfigError) as e:
        slurm.check(cfg, slurm.SlurmJob(options={"time": "1:00:00\nrm -rf ~", "qos": 'a"b'}))
    keys = {p.key: p.message for p in e.value.problems}
    assert "not one line without quotes" in keys["--time"] and "not one line without quotes" in keys["--qos"]


def test_a_path_with_a_space_is_quoted_where_sbatch_reads_it(write_study, tmp_path, monkeypatch):
    folder = tmp_path / "my studies"
    folder.mkdir()
    monkeypatch.chdir(folder)
    text = slurm.script(load(write_study(storage=PG, study="a b")), slurm.SlurmJob(), "hpo run s.yaml")
    assert "#SBATCH --job-name=hpo-a-b\n" in text and f'#SBATCH --chdir="{folder}"\n' in text


def test_a_trial_over_several_nodes_needs_a_launcher(write_study, monkeypatch, tmp_path):
    from hpo.study.devices import check_launcher

    for name in ("SLURM_JOB_NUM_NODES", "SLURM_NNODES"):
        monkeypatch.delenv(name, raising=False)
    path = write_study(resources={"nodes_per_trial": 2})
    with pytest.raises(ConfigError) as e:
        check_launcher(load(path))  # no Slurm allocation around this process
    (problem,) = e.value.problems
    assert problem.key == "resources.nodes_per_trial" and "need a launcher" in problem.message and problem.line
    check_launcher(load(path, {"resources.launcher": "local"}))  # every agent here: nothing to reach

    srun = tmp_path / "bin" / "srun"  # inside an allocation of one node
    srun.parent.mkdir()
    srun.write_text("#!/bin/sh\n")
    srun.chmod(0o755)
    monkeypatch.setenv("PATH", str(srun.parent))
    monkeypatch.setenv("SLURM_JOB_NUM_NODES", "1")
    with pytest.raises(ConfigError, match="2 nodes per trial; this Slurm allocation has 1"):
        check_launcher(load(path))
    monkeypatch.setenv("SLURM_JOB_NUM_NODES", "2")
    check_launcher(load(path))


def test_a_worker_of_a_multi_node_study_asks_slurm_for_the_nodes(write_study):
    cfg = load(write_study(storage=PG, resources={"nodes_per_trial": 2, "processes_per_trial": 4}))
    text = slurm.script(cfg, slurm.SlurmJob(workers=2, gpus_per_worker=4), "hpo run s.yaml")
    assert "#SBATCH --nodes=2\n#SBATCH --ntasks-per-node=1\n#SBATCH --gres=gpu:4\n" in text
    assert "--ntasks=1" not in text


def test_an_unquoted_time_yaml_reads_as_a_number_is_refused(write_study):
    with pytest.raises(ConfigError) as e:
        load(write_study(storage=PG, resources={"slurm": {"sbatch": {"time": 28800}}}))  # time: 8:00:00 in YAML
    (problem,) = e.value.problems
    assert problem.key == "resources.slurm.sbatch" and "quote the time" in problem.message


def test_the_python_call_checks_sbatch_options_as_the_file_does(write_study):
    import hpo

    with pytest.raises(ValueError, match="array: hpo submit sets it itself"):
        hpo.submit(write_study(storage=PG), "slurm", sbatch={"array": "0-99"})


def test_options_of_the_other_scheduler_are_refused(write_study):
    from inprocess import hpo

    path = write_study(storage=PG)
    ran = hpo("submit", str(path), "--slurm", "--image", "x:1")
    assert ran.returncode == 2 and "--image: not an option of --slurm" in ran.stderr
    ran = hpo("submit", str(path), "--kubernetes", "--partition", "gpu", "--setup", "x")
    assert ran.returncode == 2 and "--partition, --setup: not an option of --kubernetes" in ran.stderr
    ran = hpo("submit", str(path), "--kubernetes", "--image", "x:1", "-o", str(path.parent / "no" / "job.yaml"))
    assert ran.returncode == 2 and ran.stderr.strip().endswith("no such writable folder"), ran.stderr
    assert not (path.parent / "outputs").exists()


def test_a_kubernetes_job_refuses_trials_across_machines(write_study):
    cfg = load(write_study(storage=PG, resources={"nodes_per_trial": 2, "kubernetes": {"image": "hpo:1"}}))
    with pytest.raises(ConfigError, match="nodes_per_trial: a trial across machines runs on Slurm only"):
        kubernetes.manifest(cfg, ["hpo", "run", "s.yaml"], 1, 0)
