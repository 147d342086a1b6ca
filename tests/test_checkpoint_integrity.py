"""Checkpoints that survive: a damaged newest checkpoint is reported by step and file, set aside,
and the run resumes from the previous complete one with the uninterrupted run's losses; a
checkpoint that does not fit the config names the keys that differ from the run's config.yaml."""

import shutil
import subprocess

from conftest import ROOT, TOTAL, losses, train_cmd, train_run


def _largest_data_file(step_dir):
    files = [p for p in step_dir.rglob("*") if p.is_file() and p.parent.name == "d"]
    return max(files, key=lambda p: p.stat().st_size)


def test_truncated_newest_checkpoint_is_set_aside_and_the_run_resumes_from_the_previous(trained_run, tmp_path):
    base, env, ref_dir = trained_run
    run_dir = tmp_path / "run"
    shutil.copytree(ref_dir, run_dir)
    ref = losses(ref_dir)
    bad = _largest_data_file(run_dir / "checkpoints" / str(TOTAL) / "params")
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])  # a disk that filled up
    out = train_run(base, run_dir, env)
    assert f"checkpoint: checkpoint step {TOTAL}: " in out and bad.name in out and "cannot be read" in out
    assert f"resuming from step {TOTAL - 4}" in out
    assert (run_dir / "checkpoints" / f"{TOTAL}.unreadable").is_dir()
    got = losses(run_dir)
    assert sorted(got) == sorted(ref)
    for step in range(TOTAL - 3, TOTAL + 1):  # redone from step 20: the uninterrupted run's losses
        assert got[step] == ref[step], step
    assert (run_dir / "checkpoints" / str(TOTAL) / "params").is_dir()  # saved again, complete


def test_broken_metadata_of_the_newest_checkpoint_names_the_file(trained_run, tmp_path):
    from jaxllm.checkpoint import Checkpointer, CheckpointUnreadable
    from jaxllm.run import read_config
    from jaxllm.parallel.mesh import make_mesh
    from jaxllm.train.step import Trainer

    base, env, ref_dir = trained_run
    run_dir = tmp_path / "run"
    shutil.copytree(ref_dir, run_dir)
    meta = run_dir / "checkpoints" / str(TOTAL) / "train" / "_METADATA"
    meta.write_text(meta.read_text()[:40])
    trainer = Trainer(read_config(str(run_dir)), make_mesh(devices=[__import__("jax").devices()[0]]))
    ckpt = Checkpointer(str(run_dir), async_save=False)
    try:
        ckpt.restore(TOTAL, trainer.abstract_state)
        raise AssertionError("restored a checkpoint with a broken _METADATA")
    except CheckpointUnreadable as e:
        assert e.step == TOTAL and e.file.endswith("train/_METADATA") and "not valid JSON" in e.reason
    assert ckpt.set_aside(TOTAL).endswith(f"{TOTAL}.unreadable") and ckpt.latest_step() == TOTAL - 4
    ckpt.close()


def test_checkpoint_of_another_model_names_the_changed_config_keys_in_one_line(trained_run, tmp_path):
    base, env, ref_dir = trained_run
    run_dir = tmp_path / "run"
    shutil.copytree(ref_dir, run_dir)
    saved = (run_dir / "config.yaml").read_text()
    proc = subprocess.run(train_cmd(base, run_dir, "model.n_layers=3"), cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and f"checkpoint step {TOTAL} does not fit this run" in errors[0]
    assert "model.n_layers: 2 -> 3" in errors[0]
    assert "params/layers/wk: checkpoint float32[2, 32, 1, 16], run float32[3, 32, 1, 16]" in errors[0]
    assert "Traceback" not in proc.stderr and "Event loop is closed" not in proc.stderr
    assert (run_dir / "config.yaml").read_text() == saved  # the run's config still describes its checkpoints
