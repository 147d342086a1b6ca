"""Two real JAX processes on CPU (gloo collectives): the multi-host code paths for real.

Each process reads its own shard of the documents and saves its own data-iterator state; a run
stopped by SIGTERM to one process, then killed with SIGKILL, resumes in both processes and ends
with the losses of an uninterrupted run.
"""

import json
import os
import signal
import socket
import subprocess
import sys

import pytest

from conftest import ROOT, TOTAL, losses


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(base, run_dir, env, port):
    procs = []
    for i in range(2):
        penv = {**env, "JAXLLM_COORDINATOR": f"127.0.0.1:{port}", "JAXLLM_NUM_PROCESSES": "2",
                "JAXLLM_PROCESS_ID": str(i)}
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "jaxllm.train", "--config", str(base / "cfg.yaml"),
             f"trainer.run_dir={run_dir}"], cwd=ROOT, env=penv, text=True,
            stdout=subprocess.PIPE if i == 0 else subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    return procs


@pytest.fixture(scope="module")
def two_process_ref(trained_run):
    base, env, _ = trained_run
    run_dir = base / "mp-ref"
    proc = subprocess.run(["bash", "launch/local.sh", "2", "--config", str(base / "cfg.yaml"),
                           f"trainer.run_dir={run_dir}"], cwd=ROOT, env={**env, "PORT": str(_free_port())},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return base, env, run_dir


def test_two_processes_save_one_data_state_each(two_process_ref):
    base, env, run_dir = two_process_ref
    ref = losses(run_dir)
    assert sorted(ref) == list(range(1, TOTAL + 1)) and ref[TOTAL] < ref[1]
    data_dir = run_dir / "checkpoints" / str(TOTAL) / "data"
    states = [json.loads((data_dir / f"process_{i}-of-2.json").read_text()) for i in range(2)]
    assert [s["settings"]["process_index"] for s in states] == [0, 1]
    assert all(s["settings"]["process_count"] == 2 and s["settings"]["stages"][0]["batch"] == 2
               for s in states)


def _run_until(procs, step: int) -> None:
    """Reads process 0's metric lines until one reports `step` (or later)."""
    for line in procs[0].stdout:
        if line.startswith("{") and "loss" in line and json.loads(line)["step"] >= step:
            return


def _checkpoints(run_dir) -> list[int]:
    return sorted(int(d) for d in os.listdir(run_dir / "checkpoints") if d.isdigit())


def test_preempted_then_killed_two_process_run_ends_like_an_uninterrupted_one(two_process_ref):
    """Preemption often reaches hosts at different moments: SIGTERM to process 1 alone stops both
    at the same saved step (each with its data state). The resumed run is then SIGKILLed: both
    resume from the last complete checkpoint, and every step after the first save has the
    uninterrupted run's loss."""
    base, env, ref_dir = two_process_ref
    ref = losses(ref_dir)
    run_dir = base / "mp-interrupted"
    procs = _spawn(base, run_dir, env, _free_port())
    _run_until(procs, 5)
    procs[1].send_signal(signal.SIGTERM)  # only process 1 is told
    procs[0].stdout.read()
    assert [p.wait(timeout=120) for p in procs] == [143, 143]
    saved = _checkpoints(run_dir)[-1]
    assert 5 <= saved < TOTAL - 8
    data = sorted(os.listdir(run_dir / "checkpoints" / str(saved) / "data"))
    assert [d for d in data if d.endswith(".json")] == ["process_0-of-2.json", "process_1-of-2.json"]

    procs = _spawn(base, run_dir, env, _free_port())
    _run_until(procs, saved + 5)  # past the next periodic checkpoint (every 4 steps)
    for p in procs:
        p.send_signal(signal.SIGKILL)
    for p in procs:
        p.wait(timeout=60)
    procs[0].stdout.close()
    killed_at = _checkpoints(run_dir)[-1]
    assert saved < killed_at < TOTAL

    procs = _spawn(base, run_dir, env, _free_port())
    out = procs[0].stdout.read()
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    assert f"resuming from step {killed_at}" in out
    got = losses(run_dir)
    for step in range(saved + 1, TOTAL + 1):
        assert got[step] == pytest.approx(ref[step], rel=1e-6, abs=1e-7), step


def _slurm_port() -> int:
    """A free port where JAX's SLURM detection puts the coordinator (job id % 4096 + 61440)."""
    for port in range(61440 + os.getpid() % 2000, 65536):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    raise RuntimeError("no free port in SLURM's coordinator range")


def _probe(run_dir, step, out, mesh):
    return [sys.executable, os.path.join(ROOT, "tests", "multihost_probe.py"), str(run_dir), str(step), str(out),
            *map(str, mesh)]


def test_slurm_two_process_checkpoint_restores_in_one_and_in_four_processes(trained_run, tmp_path):
    """Two processes started as srun tasks (the SLURM variables JAX's cluster detection reads,
    coordinator on 127.0.0.1) train with fsdp across them; their checkpoint restores in one
    process (one device) and in four processes with another mesh (data 2 x fsdp 2): identical
    parameters and the same loss for the next step on a fixed batch."""
    import numpy as np

    base, env, _ = trained_run
    port = _slurm_port()
    run_dir = tmp_path / "slurm"
    slurm = {"SLURM_JOB_ID": str(port - 61440), "SLURM_STEP_NODELIST": "127.0.0.1", "SLURM_NTASKS": "2",
             "SLURM_NODEID": "0"}
    procs = [subprocess.Popen([sys.executable, "-m", "jaxllm.train", "--config", str(base / "cfg.yaml"),
                               f"trainer.run_dir={run_dir}", "mesh.data=1", "mesh.fsdp=-1", "trainer.total_steps=8"],
                              cwd=ROOT, env={**env, **slurm, "SLURM_PROCID": str(i), "SLURM_LOCALID": str(i)},
                              text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-2000:]
    assert "mesh {'data': 1, 'fsdp': 2, 'tensor': 1}, 2 cpu devices" in outs[0][0]  # one job, not two
    data = sorted(os.listdir(run_dir / "checkpoints" / "8" / "data"))
    assert [d for d in data if d.endswith(".json")] == ["process_0-of-2.json", "process_1-of-2.json"]

    import jax
    from multihost_probe import restore_and_step

    one_params, one_loss = restore_and_step(str(run_dir), 8, (1, 1, 1), devices=jax.devices()[:1])  # this process
    four_port = _free_port()
    four = [subprocess.Popen(_probe(run_dir, 8, tmp_path / "four.npz", (2, 2, 1)), cwd=ROOT, text=True,
                             env={**env, "JAXLLM_COORDINATOR": f"127.0.0.1:{four_port}", "JAXLLM_NUM_PROCESSES": "4",
                                  "JAXLLM_PROCESS_ID": str(i)}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            for i in range(4)]
    errs = [p.communicate(timeout=300)[1] for p in four]
    assert [p.returncode for p in four] == [0, 0, 0, 0], errs[0][-2000:]

    many = np.load(tmp_path / "four.npz")
    assert int(many["processes"]) == 4
    assert one_params and sorted(one_params) == sorted(k for k in many.files if k.startswith("["))
    for k, v in one_params.items():
        assert np.array_equal(v, many[k]), k
    assert float(many["loss"]) == pytest.approx(one_loss, rel=1e-6)
