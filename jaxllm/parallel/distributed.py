"""Multi-host start-up: one call before any other JAX work.

- Local processes (launch/local.sh, tests): JAXLLM_COORDINATOR=host:port, JAXLLM_NUM_PROCESSES,
  JAXLLM_PROCESS_ID; on CPU the collectives go through gloo.
- SLURM, TPU VM pods, GKE: `jax.distributed.initialize()` detects the cluster from its environment.
- Otherwise: a single process, nothing to do.
"""

from __future__ import annotations

import os

import jax

_CLUSTER_ENV = ("SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS",
                "JOBSET_NAME", "OMPI_COMM_WORLD_SIZE")
_initialized = False


def initialize() -> None:
    global _initialized
    if _initialized:
        return
    coordinator = os.environ.get("JAXLLM_COORDINATOR")
    if coordinator:
        num = int(os.environ["JAXLLM_NUM_PROCESSES"])
        pid = int(os.environ["JAXLLM_PROCESS_ID"])
        if os.environ.get("JAX_PLATFORMS", "").startswith("cpu"):
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num, process_id=pid)
    elif any(k in os.environ for k in _CLUSTER_ENV) and os.environ.get("JAXLLM_SINGLE_PROCESS") != "1":
        if "SLURM_JOB_ID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) <= 1:
            _initialized = True
            return  # a one-task SLURM job is a single process
        jax.distributed.initialize()
    _initialized = True
