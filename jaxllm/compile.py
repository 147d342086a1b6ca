"""`python -m jaxllm.compile --config X --topology v5p-64 [a.b=c ...]`: compile a run ahead of
time for a TPU slice on a CPU machine, and say whether it fits.

The programs are the run's own: `train.step.Trainer`'s train step and eval step (for RL, the
rollout's prefill and decode loop on the task's prompt and response shapes instead of the eval
step), traced against abstract state and batches placed with the config's mesh on the slice's
compile-only devices (`parallel.topology`, from libtpu). The attention kernel is the one the
target devices take (`kernels.attention.target_platform` reads the mesh): `pallas` compiles
JAX's splash attention for TPU (Mosaic), inside `shard_map` as in training.

Prints JSON: the mesh, per program the per-device argument / output / aliased / temporary /
code bytes from XLA's memory analysis, their total against the chip's HBM, XLA's FLOPs per
device (a `while` body, e.g. scanned layers, is counted once) and compile time; and the model's
FLOPs per step (6N + attention, all devices). Exit status 2 with one line when the run does not
fit ("does not fit: needs X GiB per chip of Y"), when a dimension does not divide over the mesh
(naming the axis) or the config cannot run on TPU. GPU targets: JAX compiles for a GPU only with
one attached, so this tool targets TPU slices (README, "GPUs and TPUs").
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm import config as config_lib
from jaxllm.errors import ConfigError, UserError, run_cli
from jaxllm.kernels.attention import check_available
from jaxllm.parallel.mesh import activation_sharding, batch_sharding, make_mesh, mesh_shape
from jaxllm.parallel.topology import Topology, parse_topology, tpu_devices

GIB = 2**30
LM_FIELDS = {"tokens": np.int32, "targets": np.int32, "positions": np.int32, "segment_ids": np.int32,
             "loss_mask": np.float32}


class DoesNotFit(UserError):
    """The compiled program needs more memory per chip than the chip has."""


# ----------------------------------------------------------------------------- checks and batches


def check_target(cfg, n_devices: int, processes: int, platform: str = "tpu") -> tuple[int, int, int]:
    """The mesh (data, fsdp, tensor) for `n_devices`, after the checks `train.check_runtime`
    makes on a live machine: devices, attention kernel, batch rows over the data shards."""
    from jaxllm.tasks import make_task

    try:
        shape = mesh_shape(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, n_devices)
    except ValueError as e:
        raise ConfigError(f"{e} (mesh.data, mesh.fsdp, mesh.tensor)") from None
    check_available(cfg.model.attention, platform)
    data, fsdp, _ = shape
    for key, size in make_task(cfg).batch_sizes().items():
        micro = size // cfg.trainer.grad_accum_steps
        if micro % (data * fsdp):
            raise ConfigError(f"{key} / trainer.grad_accum_steps = {micro} rows must divide over the "
                              f"{data * fsdp} data-parallel shards (mesh.data * mesh.fsdp)")
        if size % processes:
            raise ConfigError(f"{key} ({size}) must divide over the slice's {processes} hosts")
    return shape


def _fields(spec: dict, rows: int, length: int, sharding_of, prefix: str = "") -> dict:
    """ShapeDtypeStructs [rows, length] (or [rows] for a length of None) of `spec`'s dtypes."""
    shape = (rows,) if length is None else (rows, length)
    return {prefix + k: jax.ShapeDtypeStruct(shape, dt, sharding=sharding_of(len(shape))) for k, dt in spec.items()}


def abstract_batch(task, mesh) -> dict:
    """The global train batch of `task` as ShapeDtypeStructs sharded over the batch, with the
    fields its data source makes (`data.posttrain` formats, `rl.rollout`'s rows)."""
    from jaxllm.tasks.rl import RLTask

    cfg = task.cfg
    shard = lambda ndim: batch_sharding(mesh, ndim)
    B, T = cfg.trainer.batch_size, cfg.data.seq_len
    if isinstance(task, RLTask):
        from jaxllm.rl.prompts import prompt_width

        rl = cfg.rl
        f32 = ["old_logp", "ref_logp", "advantages"] + (["returns", "old_values"] if rl.estimator == "gae" else [])
        f32 += ["loss_mask_low", "loss_mask_high"] if rl.lopti_eta > 0 else []
        return _fields(LM_FIELDS | {k: np.float32 for k in f32}, rl.rows_per_step,
                       prompt_width(rl) + rl.response_len - 1, shard)
    fmt = getattr(task, "data_format", None)
    scalars = {"index": np.int32, "pair_mask": np.float32}
    reference = getattr(task, "cached_reference", False)
    if fmt == "sft":
        return _fields(LM_FIELDS | {"ul_mask": np.float32}, B, T, shard)
    if fmt == "pairs":
        scalars |= {"margin": np.float32} if cfg.preference.margin_field else {}
        scalars |= {"ref_chosen_logps": np.float32, "ref_rejected_logps": np.float32} if reference else {}
        return (_fields(LM_FIELDS, B, T, shard, "chosen_") | _fields(LM_FIELDS, B, T, shard, "rejected_")
                | _fields(scalars, B, None, shard))
    if fmt == "kto":
        scalars |= {"label": np.float32} | ({"ref_logps": np.float32, "ref_kl_logps": np.float32} if reference else {})
        return _fields(LM_FIELDS, B, T, shard) | _fields(LM_FIELDS, B, T, shard, "kl_") | _fields(scalars, B, None, shard)
    if fmt is not None:
        raise ValueError(f"jaxllm.compile knows no batch of data format {fmt!r}")
    return _fields(LM_FIELDS, B, T, shard)


# ----------------------------------------------------------------------------- compiling


def _stats(lowered, hbm_bytes: int) -> dict:
    t0 = time.perf_counter()
    compiled = lowered.compile()
    seconds = time.perf_counter() - t0
    m = compiled.memory_analysis()
    parts = {"argument": m.argument_size_in_bytes, "output": m.output_size_in_bytes,
             "alias": m.alias_size_in_bytes, "temp": m.temp_size_in_bytes,
             "code": m.generated_code_size_in_bytes}
    total = parts["argument"] + parts["output"] - parts["alias"] + parts["temp"] + parts["code"]
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost or {}
    return {**{f"{k}_gib": round(v / GIB, 4) for k, v in parts.items()}, "total_gib": round(total / GIB, 4),
            "total_bytes": int(total), "fits": total <= hbm_bytes,
            "xla_flops_per_device": float(cost.get("flops", 0.0)), "compile_s": round(seconds, 2),
            "mosaic_kernels": lowered.as_text().count("tpu_custom_call")}


def _rollout_lowered(trainer, mesh):
    """One RL step's rollout program (rl.rows_per_step prompts of the task's width, response_len
    new tokens): `decode.prefill` into the KV cache, then a loop of `decode.decode_step`, the
    pieces and carried state of `decode.generate` (which prepares host values outside its jit,
    so it cannot be traced against abstract inputs). Lowered with the train state's shardings,
    inside `activation_sharding` so the model takes the target's kernel as the live rollout."""
    from jaxllm.models import decode
    from jaxllm.rl.prompts import prompt_width

    cfg, rl = trainer.cfg, trainer.cfg.rl
    rows, width, new = rl.rows_per_step, prompt_width(rl), rl.response_len
    prompts = jax.ShapeDtypeStruct((rows, width), np.int32, sharding=batch_sharding(mesh, 2))
    lengths = jax.ShapeDtypeStruct((rows,), np.int32, sharding=batch_sharding(mesh, 1))

    def rollout(params, frozen, tokens_BP, lengths_B):
        policy = trainer.task.effective_params(params, frozen)
        logits, cache = decode.prefill(cfg.model, policy, tokens_BP, lengths_B, width + new)

        def step(i, carry):
            logits, cache, out_BN = carry
            tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
            logits, cache = decode.decode_step(cfg.model, policy, tok, cache)
            return logits, cache, jax.lax.dynamic_update_slice_in_dim(out_BN, tok[:, None], i, axis=1)

        return jax.lax.fori_loop(0, new, step, (logits, cache, jnp.zeros((rows, new), jnp.int32)))[2]

    s = trainer.abstract_state
    with activation_sharding(mesh):
        return jax.jit(rollout).lower(s.params, s.frozen, prompts, lengths)


def _out_of_memory(e: Exception, hbm_bytes: int, program: str) -> DoesNotFit | None:
    """XLA:TPU refuses a program that cannot fit HBM at compile time: its need, in one line."""
    text = str(e)
    if "RESOURCE_EXHAUSTED" not in text and "Ran out of memory" not in text:
        return None
    size = r"([\d.]+)([GMK])?"
    found = (re.search(rf"Used {size} of {size} hbm", text)
             or re.search(rf"required for (?:HLO )?\w+ \({size}\) exceeds available HBM \({size}\)", text))
    have = f"{hbm_bytes / GIB:.2f} GiB per chip"
    if not found:
        return DoesNotFit(f"does not fit: the {program} step ran out of the {have} "
                          f"({text.strip().splitlines()[0][:200]})")
    need = float(found.group(1)) * {"G": 1, "M": 2**-10, "K": 2**-20, None: 2**-30}[found.group(2)]
    return DoesNotFit(f"does not fit: needs at least {need:.2f} GiB per chip of {hbm_bytes / GIB:.2f} "
                      f"(XLA:TPU ran out of HBM compiling the {program} step)")


def compile_for(cfg, topology: Topology, devices=None) -> dict:
    """Compiles cfg's programs for `topology` (its compile-only devices, or `devices`); the report."""
    from jaxllm.tasks.rl import RLTask
    from jaxllm.train.step import Trainer

    devices = tpu_devices(topology) if devices is None else devices
    processes = len({d.process_index for d in devices})
    data, fsdp, tensor = check_target(cfg, len(devices), processes, devices[0].platform)
    mesh = make_mesh(data, fsdp, tensor, devices=devices)
    try:
        trainer = Trainer(cfg, mesh)
    except ValueError as e:  # `logical_sharding`: an axis that does not divide, named
        raise ConfigError(str(e).splitlines()[0]) from None
    batch = abstract_batch(trainer.task, mesh)
    programs = {"train": lambda: trainer.train_step.lower(trainer.abstract_state, batch)}
    if isinstance(trainer.task, RLTask):
        programs["rollout"] = lambda: _rollout_lowered(trainer, mesh)
    else:
        s = trainer.abstract_state
        programs["eval"] = lambda: trainer.eval_step.lower(s.params, s.frozen, batch)
    report = {"topology": topology.name, "grid": topology.grid_name, "devices": len(devices), "hosts": processes,
              "device_kind": devices[0].device_kind, "mesh": dict(mesh.shape), "attention": cfg.model.attention,
              "hbm_per_chip_gib": round(topology.hbm_bytes / GIB, 2), "params": cfg.model.num_params(),
              "model_flops_per_step": _model_flops(batch, cfg, trainer.updates_per_step), "programs": {}}
    for name, lower in programs.items():
        try:
            report["programs"][name] = _stats(lower(), topology.hbm_bytes)
        except jax.errors.JaxRuntimeError as e:
            raise _out_of_memory(e, topology.hbm_bytes, name) or e
    need = max(p["total_bytes"] for p in report["programs"].values())
    report |= {"peak_gib_per_chip": round(need / GIB, 4), "fits": need <= topology.hbm_bytes}
    return report


def _model_flops(batch: dict, cfg, updates: int) -> float:
    """Training FLOPs of one step by the model's count: 6N + attention per token of the batch's
    rows (each side of a pair), times the optimizer updates the step makes over them."""
    rows = sum(x.shape[0] for k, x in batch.items() if k.endswith("tokens"))
    length = next(x.shape[1] for k, x in batch.items() if k.endswith("tokens"))
    return float(cfg.model.flops_per_token(length) * rows * length * updates)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jaxllm.compile", description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True, help="a YAML file under configs/")
    ap.add_argument("--topology", required=True, help="v5p-64, v4-32, v5e-16 / v5litepod-16, v6e-64, v5p:2x2x2")
    ap.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. trainer.batch_size=256")
    args = ap.parse_args(argv)
    jax.config.update("jax_platforms", "cpu")  # the host compiles; libtpu only describes the slice

    def body():
        topology = parse_topology(args.topology)
        cfg = config_lib.load_config(args.config, args.overrides)
        report = {"config": args.config, "overrides": args.overrides, **compile_for(cfg, topology)}
        print(json.dumps(report, indent=2), flush=True)
        if not report["fits"]:
            worst = max(report["programs"], key=lambda k: report["programs"][k]["total_bytes"])
            raise DoesNotFit(f"does not fit: needs {report['peak_gib_per_chip']:.2f} GiB per chip of "
                             f"{report['hbm_per_chip_gib']:.2f} ({worst} step; {topology.name}, mesh {report['mesh']})")
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
