"""Launchers: the dry run of each for a 4-host job, the cluster each environment is taken for,
and every shipped launcher example's config passing the runtime checks of its platform."""

import os
import re
import shlex
import subprocess

import pytest
import yaml

from conftest import ROOT
from jaxllm.parallel.distributed import cluster


def _dry(*args) -> str:
    proc = subprocess.run(["bash", *args], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_local_dry_run_starts_four_processes_on_one_coordinator():
    out = _dry("launch/local.sh", "--dry-run", "4", "--config", "configs/tiny.yaml", "trainer.run_dir=/tmp/x")
    lines = [shlex.split(line) for line in out.strip().splitlines()]
    assert len(lines) == 4
    envs = [dict(a.split("=", 1) for a in line[1:6]) for line in lines]
    assert [e["JAXLLM_PROCESS_ID"] for e in envs] == ["0", "1", "2", "3"]
    assert {e["JAXLLM_NUM_PROCESSES"] for e in envs} == {"4"} and len({e["JAXLLM_COORDINATOR"] for e in envs}) == 1
    assert all(line[line.index("python"):] == ["python", "-m", "jaxllm.train", "--config", "configs/tiny.yaml",
                                               "trainer.run_dir=/tmp/x"] for line in lines)


@pytest.mark.parametrize("per_gpu", [False, True])
def test_slurm_dry_run_for_four_nodes(per_gpu):
    args = ["launch/slurm.sh", "--dry-run", "--nodes", "4"] + (["--per-gpu"] if per_gpu else []) + [
        "configs/smollm2-1.7b.yaml", "mesh.fsdp=-1"]
    out = _dry(*args).strip().splitlines()
    per_node = 8 if per_gpu else 1
    assert shlex.split(out[0]) == ["sbatch", "--nodes=4", f"--ntasks-per-node={per_node}", "--gpus-per-node=8",
                                   "launch/slurm.sbatch", "configs/smollm2-1.7b.yaml", "mesh.fsdp=-1"]
    tasks = out[1:]
    assert len(tasks) == 4 * per_node
    for i, line in enumerate(tasks):
        env = dict(re.findall(r"(SLURM_\w+)=(\d+)", line))
        assert env == {"SLURM_NTASKS": str(4 * per_node), "SLURM_PROCID": str(i),
                       "SLURM_LOCALID": str(i % per_node), "SLURM_NODEID": str(i // per_node)}
        assert line.rstrip().endswith(": python -m jaxllm.train --config configs/smollm2-1.7b.yaml mesh.fsdp=-1")


def test_tpu_pod_dry_run_runs_one_command_on_all_workers():
    out = _dry("launch/tpu_pod.sh", "--dry-run", "my-v5p-32", "us-east5-a", "configs/llama3-8b.yaml",
               "trainer.run_dir=gs://bucket/run")
    cmd = shlex.split(out)
    assert cmd[:8] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-v5p-32", "--zone", "us-east5-a"]
    assert cmd[8] == "--worker=all" and cmd[9] == "--command"
    assert cmd[10].strip() == ("cd ~/jaxllm && python -m jaxllm.train --config configs/llama3-8b.yaml "
                               "trainer.run_dir=gs://bucket/run")


def test_gke_dry_run_renders_a_jobset_of_four_tpu_hosts():
    out = _dry("launch/gke.sh", "--dry-run", "--topology", "v5p-32", "--image", "reg/jaxllm:1",
               "configs/llama3-8b.yaml", "trainer.run_dir=gs://bucket/run")
    js = yaml.safe_load(out)
    job = js["spec"]["replicatedJobs"][0]["template"]["spec"]
    pod = job["template"]["spec"]
    assert js["kind"] == "JobSet" and job["parallelism"] == job["completions"] == 4
    assert pod["nodeSelector"] == {"cloud.google.com/gke-tpu-accelerator": "tpu-v5p-slice",
                                   "cloud.google.com/gke-tpu-topology": "2x2x4"}
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["google.com/tpu"] == 4 and container["image"] == "reg/jaxllm:1"
    assert container["command"] == ["python", "-m", "jaxllm.train", "--config", "configs/llama3-8b.yaml",
                                    "trainer.run_dir=gs://bucket/run"]


@pytest.mark.parametrize("env, kind", [
    ({}, None),
    ({"JAXLLM_COORDINATOR": "h:1"}, "explicit"),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}, None),  # a one-task job is one process
    ({"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n[1-4]", "SLURM_NTASKS": "4", "SLURM_PROCID": "2",
      "SLURM_LOCALID": "0"}, "slurm"),
    ({"OMPI_COMM_WORLD_SIZE": "4"}, "mpi"),
    ({"TPU_WORKER_HOSTNAMES": "a,b,c,d"}, "gke"),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4", "JAXLLM_SINGLE_PROCESS": "1"}, None),
])
def test_cluster_detection(env, kind):
    assert cluster(env, tpu_chips=0) == kind


def test_a_tpu_vm_pod_worker_is_detected_by_its_chips():
    """On a plain Cloud TPU VM no variable is set: the chips on the PCI bus are what JAX's pod
    detection (the metadata server) needs to be asked."""
    assert cluster({}, tpu_chips=4) == "tpu-vm"


def test_slurm_batch_step_outside_srun_is_a_one_line_error():
    from jaxllm.errors import ConfigError

    with pytest.raises(ConfigError, match="start it with srun"):
        cluster({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}, tpu_chips=0)


# Each launcher's example command (the lines in the scripts), the platform it runs on and its devices.
EXAMPLES = [
    ("launch/tpu_pod.sh", "tpu", 8),  # a v5p-16: 8 chips
    ("launch/gke.sh", "tpu", 8),
    ("launch/slurm.sbatch", "gpu", 32),  # 4 nodes x 8 GPUs
    ("launch/local.sh", "cpu", 2),
]


@pytest.mark.parametrize("script, platform, devices", EXAMPLES)
def test_every_launcher_example_config_passes_its_platforms_runtime_check(script, platform, devices):
    from jaxllm.compile import check_target
    from jaxllm.config import load_config

    text = open(os.path.join(ROOT, script)).read()
    examples = [shlex.split(m) for m in re.findall(r"^#   (launch/\S+ .*configs/\S+\.yaml.*)$", text, re.M)
                if "--dry-run" not in m]
    assert examples, f"{script} shows no example command"
    for words in examples:
        i = next(i for i, w in enumerate(words) if w.endswith(".yaml"))
        overrides = [w for w in words[i + 1:] if "=" in w and not w.startswith("-")]
        cfg = load_config(os.path.join(ROOT, words[i]), overrides)
        hosts = 2 if platform == "tpu" else (4 if platform == "gpu" else 1)
        check_target(cfg, devices, hosts, platform)  # raises a one-line ConfigError if not

