"""`python -m jaxllm.train --config configs/X.yaml [a.b=c ...]`: load the config, start
multi-host JAX, check the config against the machine, train.

An expected user error is one line on stderr and exit status 2: a config problem found before
training, or one found once the run starts (data.train matching no files or holding no usable
documents, a missing tokenizer, a schedule that does not fit the run's counted length). Anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys

import jax

from jaxllm import config as config_lib
from jaxllm.errors import ConfigError, run_cli
from jaxllm.kernels.attention import check_available
from jaxllm.parallel import distributed
from jaxllm.parallel.mesh import mesh_shape
from jaxllm.tasks import make_task
from jaxllm.train.loop import train


def check_runtime(cfg: config_lib.Config) -> None:
    """Checks that depend on the machine: device count, platform, process count."""
    n, platform = jax.device_count(), jax.devices()[0].platform
    try:
        data, fsdp, _ = mesh_shape(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, n)
    except ValueError as e:
        raise ConfigError(f"{e} (mesh.data, mesh.fsdp, mesh.tensor)") from None
    check_available(cfg.model.attention, platform)  # a ConfigError naming the valid choices
    for key, size in make_task(cfg).batch_sizes().items():
        micro = size // cfg.trainer.grad_accum_steps
        if micro % (data * fsdp):
            raise ConfigError(
                f"{key} / trainer.grad_accum_steps = {micro} rows must divide over the "
                f"{data * fsdp} data-parallel shards (mesh.data * mesh.fsdp)")
        if size % jax.process_count():
            raise ConfigError(f"{key} ({size}) must divide over {jax.process_count()} processes")


def configure(path: str, overrides) -> config_lib.Config | None:
    """Loads the config, starts multi-host JAX and checks the config against the machine;
    on a config problem prints one line to stderr and returns None."""
    try:
        cfg = config_lib.load_config(path, overrides)
        if cfg.mesh.cpu_devices:  # must precede the first use of any JAX backend
            jax.config.update("jax_num_cpu_devices", cfg.mesh.cpu_devices)
        distributed.initialize()
        check_runtime(cfg)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return None
    return cfg


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxllm.train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="a YAML file under configs/")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. trainer.total_steps=100")
    args = parser.parse_args(argv)
    cfg = configure(args.config, args.overrides)
    if cfg is None:
        return 2
    # Data and run-length problems surface inside train(), once the sources are opened.
    return run_cli(lambda: _train_and_report(cfg))


def _train_and_report(cfg: config_lib.Config) -> int:
    summary = train(cfg)
    if "final_eval_loss" in summary and jax.process_index() == 0:
        print(f"done: step {summary['final_step']}, eval loss "
              f"{summary.get('initial_eval_loss', float('nan')):.3f} -> {summary['final_eval_loss']:.3f}")
    return 0
