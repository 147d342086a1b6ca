"""Kill a run (SIGKILL, or SIGTERM on another device count) and resume: same final loss."""

import json
import os
import signal
import subprocess
import sys

import pytest

from conftest import ROOT, TOTAL, losses as _losses, train_cmd as _cmd, train_run as _run


@pytest.fixture(scope="module")
def setup(trained_run):
    base, env, ref_dir = trained_run
    return base, env, _losses(ref_dir)



def _start_and_signal(base, run_dir, env, sig, at_step, *extra):
    """Starts a run and sends `sig` once it has logged `at_step` (mid-run, never at the end)."""
    proc = subprocess.Popen(_cmd(base, run_dir, *extra), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    for line in proc.stdout:
        if line.startswith("{") and json.loads(line).get("step", -1) >= at_step and "loss" in line:
            proc.send_signal(sig)
            break
    proc.stdout.read()
    return proc.wait(timeout=120)


def test_sigkill_then_resume_equals_uninterrupted(setup):
    base, env, ref = setup
    run_dir = base / "killed"
    rc = _start_and_signal(base, run_dir, env, signal.SIGKILL, 10)
    assert rc == -signal.SIGKILL
    steps = sorted(int(d) for d in os.listdir(run_dir / "checkpoints") if d.isdigit())
    assert steps and steps[-1] < TOTAL  # killed mid-run, with at least one complete checkpoint
    out = _run(base, run_dir, env)
    assert f"resuming from step {steps[-1]}" in out
    got = _losses(run_dir)
    assert sorted(got) == sorted(ref)  # steps redone after the checkpoint are logged once
    assert got[TOTAL] == pytest.approx(ref[TOTAL], rel=1e-6, abs=1e-7)
    for step in range(steps[-1] + 1, TOTAL + 1):
        assert got[step] == pytest.approx(ref[step], rel=1e-6, abs=1e-7)


def test_sigterm_saves_and_resumes_on_another_device_count(setup):
    base, env, ref = setup
    run_dir = base / "preempted"
    two = {**env, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    rc = _start_and_signal(base, run_dir, two, signal.SIGTERM, 6)
    assert rc == 143
    steps = sorted(int(d) for d in os.listdir(run_dir / "checkpoints") if d.isdigit())
    saved = steps[-1]
    assert 6 <= saved < TOTAL  # saved on SIGTERM, mid-run
    out = _run(base, run_dir, env)  # one device now
    assert f"resuming from step {saved}" in out
    got = _losses(run_dir)
    for step in range(saved + 1, TOTAL + 1):
        assert got[step] == pytest.approx(ref[step], rel=1e-4)


def test_run_dir_holds_config_metrics_events_and_last_k_checkpoints(setup):
    base, env, ref = setup
    run_dir = base / "ref"
    from jaxllm.config import load_config

    cfg = load_config(str(run_dir / "config.yaml"))
    assert cfg.trainer.total_steps == TOTAL and cfg.model.d_model == 32
    assert sorted(ref) == list(range(1, TOTAL + 1))
    assert ref[TOTAL] < ref[1]
    steps = sorted(int(d) for d in os.listdir(run_dir / "checkpoints") if d.isdigit())
    assert steps == [TOTAL - 4, TOTAL]  # checkpoint.keep = 2
    events = [f for f in os.listdir(run_dir / "tensorboard") if "tfevents" in f]
    data = b"".join((run_dir / "tensorboard" / f).read_bytes() for f in events)
    assert b"loss" in data and b"grad_norm" in data and b"eval_loss" in data


def test_tensorboard_events_are_written_without_importing_torch(tmp_path):
    """tensorboardX imports PyTorch when installed (2.5 s of every run's start); ours keeps it out
    and leaves torch importable afterwards."""
    code = (f"import sys, jaxllm.metrics as m; log = m.MetricsLogger({str(tmp_path)!r}, 2, progress_bar=False); "
            "log.log(1, {'loss': 2.0}); log.close(); print('torch' in sys.modules); import torch")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines()[-1] == "False"
    events = [f for f in os.listdir(tmp_path / "tensorboard") if "tfevents" in f]
    assert b"loss" in (tmp_path / "tensorboard" / events[0]).read_bytes()


def test_half_written_checkpoint_is_never_chosen(setup, tmp_path):
    """A step directory orbax had not finalised (the process died mid-save) is ignored."""
    import shutil

    from jaxllm.checkpoint import Checkpointer
    from jaxllm.run import load_run

    base, env, ref = setup
    run_dir = tmp_path / "run"
    shutil.copytree(base / "ref", run_dir)
    ckpts = run_dir / "checkpoints"
    partial = ckpts / f"{TOTAL + 4}.orbax-checkpoint-tmp-1763900000000000"
    shutil.copytree(ckpts / str(TOTAL), partial)
    shutil.rmtree(partial / "train")  # the optimizer state was never written
    assert Checkpointer(str(run_dir)).latest_step() == TOTAL
    cfg, params = load_run(str(run_dir))  # loads the complete one
    assert cfg.trainer.total_steps == TOTAL


@pytest.mark.parametrize("source", ["run", "hf"])
def test_init_from_a_run_or_hf_directory_starts_from_its_weights(setup, tmp_path, source):
    """`model.init_from` loads the weights: step-0 eval equals the source run's final eval."""
    import json
    import subprocess
    import sys

    base, env, ref = setup
    src = base / "ref"
    if source == "hf":
        src = tmp_path / "hf"
        proc = subprocess.run([sys.executable, "-m", "jaxllm.convert", "jaxllm-to-hf", "--checkpoint",
                               str(base / "ref"), "--out", str(src)], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-1500:]
    run_dir = tmp_path / "continued"
    _run(base, run_dir, env, f"model.init_from={src}", "trainer.total_steps=2", "checkpoint.every_steps=2")

    def eval_at(d, step):
        rows = [json.loads(line) for line in open(d / "metrics.jsonl")]
        return next(r["eval_loss"] for r in rows if r["step"] == step and "eval_loss" in r)

    assert eval_at(run_dir, 0) == pytest.approx(eval_at(base / "ref", TOTAL), rel=1e-5)
    assert abs(eval_at(run_dir, 0) - eval_at(base / "ref", 0)) > 0.05  # not a fresh random init


def test_init_from_with_other_shapes_names_the_tensors(setup, tmp_path):
    base, env, ref = setup
    proc = subprocess.run(_cmd(base, tmp_path / "bad", f"model.init_from={base / 'ref'}", "model.d_ff=96"),
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "does not match the model config" in proc.stderr and "['layers']['w_up']: expected (2, 32, 96)" in proc.stderr
