"""Ahead-of-time compile for TPU slices on this CPU machine (libtpu's compile-only devices):
topology names, the tiny config's train and eval steps with the Pallas splash kernel compiled
(not only lowered) for TPU, and the one-line errors of a run that cannot fit or divide."""

import math
import subprocess
import sys

import jax
import pytest

from conftest import ROOT
from jaxllm.compile import abstract_batch, compile_for
from jaxllm.config import load_config
from jaxllm.errors import ConfigError
from jaxllm.parallel.topology import TopologyError, parse_topology, tpu_devices

TINY = f"{ROOT}/configs/tiny.yaml"


@pytest.mark.parametrize("name, grid, chips, hbm", [
    ("v5p-64", "v5p:2x4x4", 32, 95), ("v5p-16", "v5p:2x2x2", 8, 95), ("v5p-128", "v5p:4x4x4", 64, 95),
    ("v4-32", "v4:2x2x4", 16, 32), ("v5e-16", "v5e:4x4", 16, 16), ("v5litepod-16", "v5e:4x4", 16, 16),
    ("v5e-8", "v5e:2x4", 8, 16), ("v6e-64", "v6e:8x8", 64, 32), ("v6e-256", "v6e:16x16", 256, 32),
    ("v5p:2x2x2", "v5p:2x2x2", 8, 95), ("v5e-2x4", "v5e:2x4", 8, 16),
])
def test_topology_names_users_know(name, grid, chips, hbm):
    t = parse_topology(name)
    assert (t.grid_name, t.chips, t.hbm_bytes) == (grid, chips, hbm * 2**30)


@pytest.mark.parametrize("name, words", [("v5p-12", "power of two"), ("v3-8", "unknown TPU topology"),
                                         ("v5p:2x2", "3 positive dimensions"), ("h100-8", "unknown")])
def test_bad_topology_names_say_what_is_wrong(name, words):
    with pytest.raises(TopologyError, match=words):
        parse_topology(name)


def test_slice_devices_come_from_libtpu():
    devices = tpu_devices(parse_topology("v5p-16"))
    assert len(devices) == 8 and {d.platform for d in devices} == {"tpu"}
    assert devices[0].device_kind == "TPU v5" and len({d.process_index for d in devices}) == 2  # two hosts


def _shard_bytes(tree) -> int:
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def test_tiny_config_compiles_for_a_v5e_slice_with_the_splash_kernel():
    """Train and eval steps of the tiny config (fsdp over 4 chips, Pallas attention) compile for
    TPU v5e; the train step's per-chip arguments hold at least the sharded state and batch (TPU
    tiles pad small shards) and well under half of an unsharded state, and the Mosaic kernels
    (splash forward, and its backward in training) are in it."""
    from jaxllm.parallel.mesh import make_mesh
    from jaxllm.train.step import Trainer

    cfg = load_config(TINY, ["model.attention=pallas", "mesh.data=1", "mesh.fsdp=4", "model.dtype=bfloat16"])
    topology = parse_topology("v5e-4")
    devices = tpu_devices(topology)
    report = compile_for(cfg, topology, devices)
    assert report["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1} and report["device_kind"] == "TPU v5 lite"
    train, evaluate = report["programs"]["train"], report["programs"]["eval"]
    assert train["mosaic_kernels"] >= 3 and evaluate["mosaic_kernels"] >= 1  # fwd + dq / dkv kernels
    trainer = Trainer(cfg, make_mesh(1, 4, 1, devices=devices))
    expected = _shard_bytes(trainer.abstract_state) + _shard_bytes(abstract_batch(trainer.task, trainer.mesh))
    unsharded = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(trainer.abstract_state))
    got = train["argument_gib"] * 2**30
    assert expected * 0.9999 <= got < unsharded / 2, (got, expected, unsharded)
    assert train["alias_gib"] > 0  # the state is donated
    assert report["fits"] and 0 < report["peak_gib_per_chip"] < 0.1
    assert report["model_flops_per_step"] == cfg.model.flops_per_token(128) * 32 * 128
    assert train["xla_flops_per_device"] > evaluate["xla_flops_per_device"] > 0


def test_a_run_that_cannot_fit_says_so_in_one_line():
    proc = subprocess.run([sys.executable, "-m", "jaxllm.compile", "--config", TINY, "--topology", "v5e-4",
                           "model.d_model=8192", "model.d_ff=32768", "model.n_heads=64", "model.n_kv_heads=8"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr
    assert errors[0].startswith("error: does not fit: needs at least ") and "GiB per chip of 16.00" in errors[0]
    assert errors[0].endswith("(XLA:TPU ran out of HBM compiling the train step)")


def test_axis_that_does_not_divide_and_a_gpu_only_kernel_are_named():
    topology = parse_topology("v5e-4")
    devices = tpu_devices(topology)
    cfg = load_config(TINY, ["mesh.data=1", "mesh.tensor=4"])  # 2 kv heads over 4 chips
    with pytest.raises(ConfigError, match="axis 'kv_heads' of size 2 does not divide over mesh axes tensor of size 4"):
        compile_for(cfg, topology, devices)
    with pytest.raises(ConfigError, match="model.attention=cudnn needs an NVIDIA GPU.*valid here: xla, pallas"):
        compile_for(load_config(TINY, ["model.attention=cudnn"]), topology, devices)
    with pytest.raises(ConfigError, match="trainer.batch_size / trainer.grad_accum_steps = 6 rows must divide"):
        compile_for(load_config(TINY, ["trainer.batch_size=24", "trainer.grad_accum_steps=4"]), topology, devices)
