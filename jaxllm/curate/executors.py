"""Running a plan's stages on datatrove's executors: local processes, SLURM job arrays, Ray.

* local: `LocalPipelineExecutor`, `workers` tasks at a time (default: the machine's CPUs); stages
  run one after the other, each waiting for all its tasks.
* ray: `RayPipelineExecutor` on the cluster at `ray_address` ("auto" joins a running one; unset
  starts a local Ray for the run, or uses the one this process already started). The one-task
  report stage runs in this process.
* slurm: one `SlurmPipelineExecutor` per stage, each depending on the one before (`afterok`), so
  submitting the last submits the chain and returns at once; the report is the last job.
  `slurm_dry_run` submits nothing: a stand-in `sbatch` on PATH records each job script and its
  sbatch arguments in `<work>/slurm_dry_run/` and answers with job ids 1, 2, ...

Every task that completes is recorded in `<work>/logs/<stage>/completions`, so rerunning the same
run (same settings, same work folder) skips finished tasks: a failed or preempted run resumes.
A stage with unfinished tasks stops the run with an error naming the stage and its log folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import tempfile
import time

from datatrove.executor import LocalPipelineExecutor, SlurmPipelineExecutor

from jaxllm.curate.config import CurateConfig
from jaxllm.curate.report import WALL_TIMES
from jaxllm.errors import UserError

DRY_RUN_FOLDER = "slurm_dry_run"


class StageFailed(RuntimeError):
    """Some tasks of a stage did not complete."""


def log_dir(work: str, stage) -> str:
    return os.path.join(work, "logs", stage.name)


def local_executor(cfg: CurateConfig, stage, work: str, workers: int | None = None):
    workers = workers or cfg.workers or os.cpu_count() or 1
    # bookkeeping stages (the report) always rerun: their inputs may be newer than their last run
    return LocalPipelineExecutor(stage.pipeline, tasks=stage.tasks, workers=min(workers, stage.tasks),
                                 logging_dir=log_dir(work, stage), skip_completed=not stage.in_driver)


def ray_executor(cfg: CurateConfig, stage, work: str):
    from datatrove.executor.ray import RayPipelineExecutor

    return RayPipelineExecutor(stage.pipeline, tasks=stage.tasks, workers=cfg.workers or stage.tasks,
                               logging_dir=log_dir(work, stage), cpus_per_task=cfg.ray_cpus_per_task,
                               mem_per_cpu_gb=cfg.ray_mem_per_cpu_gb)


def slurm_executor(cfg: CurateConfig, stage, work: str, depends=None):
    return SlurmPipelineExecutor(
        stage.pipeline, tasks=stage.tasks, time=cfg.slurm_time, partition=cfg.slurm_partition,
        cpus_per_task=cfg.slurm_cpus_per_task, mem_per_cpu_gb=cfg.slurm_mem_per_cpu_gb,
        workers=cfg.workers or -1, job_name=f"{cfg.slurm_job_name}-{stage.name}", qos=cfg.slurm_qos,
        env_command=cfg.slurm_env_command, sbatch_args=dict(cfg.slurm_sbatch_args),
        max_array_size=cfg.slurm_max_array_size, depends=depends, logging_dir=log_dir(work, stage),
        slurm_logs_folder=os.path.join(work, "slurm_logs", stage.name))


@contextlib.contextmanager
def ray_cluster(cfg: CurateConfig):
    """Ray for the run: the cluster at ray_address, the one already started, or a new local one."""
    try:
        import ray
    except ImportError:
        raise UserError("executor ray needs Ray: pip install ray") from None
    started = not ray.is_initialized()
    if started:
        ray.init(address=cfg.ray_address, num_cpus=cfg.workers if cfg.ray_address is None else None)
    try:
        yield
    finally:
        if started:
            ray.shutdown()


def _check_complete(executor, stage, work: str) -> None:
    missing = executor.get_incomplete_ranks(skip_completed=True)
    if missing:
        raise StageFailed(f"stage {stage.name}: tasks {missing[:10]} of {stage.tasks} did not complete; "
                          f"see {log_dir(work, stage)}/logs (rerunning resumes)")


def run_here(cfg: CurateConfig, plan) -> None:
    """Runs every stage to completion on the local or Ray executor; records wall times."""
    wall, wall_path = {}, os.path.join(plan.work, WALL_TIMES)
    with ray_cluster(cfg) if cfg.executor == "ray" else contextlib.nullcontext():
        for stage in plan.stages:
            start = time.perf_counter()
            if cfg.executor == "ray" and not stage.in_driver:
                executor = ray_executor(cfg, stage, plan.work)
            else:
                executor = local_executor(cfg, stage, plan.work, workers=1 if stage.in_driver else None)
            executor.run()
            _check_complete(executor, stage, plan.work)
            wall[stage.name] = time.perf_counter() - start
            with open(wall_path, "w") as f:
                json.dump(wall, f)


_FAKE_SBATCH = """#!/bin/sh
# jaxllm curate dry run: records the job script and arguments instead of submitting them.
n=$(( $(ls "{folder}" | grep -c '\\.slurm$') + 1 ))
for last; do :; done
cp "$last" "{folder}/job-$(printf %03d $n).slurm"
printf '%s\\n' "$@" > "{folder}/job-$(printf %03d $n).args"
echo "Submitted batch job $n"
"""


@contextlib.contextmanager
def recorded_sbatch(folder: str):
    """PATH with an `sbatch` that records instead of submitting (see _FAKE_SBATCH)."""
    os.makedirs(folder, exist_ok=True)
    bindir = tempfile.mkdtemp(prefix="sbatch-dry-run-")
    path = os.path.join(bindir, "sbatch")
    with open(path, "w") as f:
        f.write(_FAKE_SBATCH.format(folder=folder))
    os.chmod(path, os.stat(path).st_mode | stat.S_IEXEC)
    old = os.environ.get("PATH", "")
    os.environ["PATH"] = bindir + os.pathsep + old
    try:
        yield
    finally:
        os.environ["PATH"] = old
        shutil.rmtree(bindir, ignore_errors=True)


def submit_slurm(cfg: CurateConfig, plan) -> list:
    """Submits the stages as a chain of dependent SLURM jobs (or records them); returns the executors."""
    executors, previous = [], None
    for stage in plan.stages:
        previous = slurm_executor(cfg, stage, plan.work, depends=previous)
        executors.append(previous)
    if cfg.slurm_dry_run:
        with recorded_sbatch(os.path.join(plan.work, DRY_RUN_FOLDER)):
            executors[-1].run()
    else:
        if shutil.which("sbatch") is None:
            raise UserError("executor slurm: no sbatch command on this machine (run on a SLURM login node, "
                            "or set slurm_dry_run: true to only write the job scripts)")
        executors[-1].run()
    return executors
