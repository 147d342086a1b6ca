"""Command-line flags of the executor settings, shared by `python -m jaxllm.curate` and its
`prepare` subcommand."""

from __future__ import annotations

import argparse

import yaml

from jaxllm.curate.config import ConfigError, check_key


def executor_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("executor")
    g.add_argument("--executor", choices=("local", "slurm", "ray"), help="where tasks run (local)")
    g.add_argument("--tasks", type=int, help="tasks per pass (default: one per input file)")
    g.add_argument("--workers", type=int, help="tasks at once (default: CPUs locally, all on Ray and SLURM)")
    g.add_argument("--partition", dest="slurm_partition", help="SLURM partition")
    g.add_argument("--time", dest="slurm_time", help="SLURM time limit per task, e.g. 20:00:00")
    g.add_argument("--dry-run", dest="slurm_dry_run", action="store_const", const=True,
                   help="SLURM: write the job scripts into <work>/slurm_dry_run, submit nothing")
    g.add_argument("--ray-address", dest="ray_address", help="Ray cluster ('auto'); default: a local Ray")
    g.add_argument("--work-dir", dest="work_dir", help="intermediate files and logs (default <output>.work)")


EXECUTOR_KEYS = ("executor", "tasks", "workers", "slurm_partition", "slurm_time", "slurm_dry_run", "ray_address",
                 "work_dir")


def executor_overrides(args: argparse.Namespace) -> dict:
    """The executor flags given, and `--set` items (executor keys only), as config values."""
    values = {k: getattr(args, k) for k in EXECUTOR_KEYS if getattr(args, k, None) is not None}
    for item in args.sets:
        key, sep, raw = item.partition("=")
        if not sep or not (key in EXECUTOR_KEYS or key.startswith(("slurm_", "ray_"))):
            raise ConfigError(f"--set {item}: expected an executor setting KEY=VALUE (slurm_*, ray_*)")
        check_key(key, "--set: ")
        values[key] = yaml.safe_load(raw) if raw.strip() else None
    return values
