"""Multi-host start-up: `initialize()`, one call before any other JAX work.

`cluster()` decides, from the environment alone:

    explicit   JAXLLM_COORDINATOR=host:port, JAXLLM_NUM_PROCESSES, JAXLLM_PROCESS_ID
               (launch/local.sh, tests)
    slurm      inside `srun` with more than one task (SLURM_JOB_ID, SLURM_STEP_NODELIST,
               SLURM_NTASKS, SLURM_PROCID, SLURM_LOCALID): one process per node or per GPU
    mpi        Open MPI's mpirun (OMPI_COMM_WORLD_SIZE > 1)
    gke        a GKE TPU pod (TPU_WORKER_HOSTNAMES or TPU_PROCESS_ADDRESSES, set by GKE for
               JobSet workers), or a multislice job (MEGASCALE_COORDINATOR_ADDRESS)
    tpu-vm     a Cloud TPU VM: TPU chips on this host's PCI bus; the pod's workers come from
               the VM's metadata server
    None       one process (a laptop, one GPU box, a one-task SLURM job)

For every cluster but `explicit`, `jax.distributed.initialize()` gets no arguments: JAX's own
cluster detection reads the same variables (and the TPU metadata server), so a TPU VM pod
started with the same command on every worker forms one job instead of N lone ones. On CPU
(`JAX_PLATFORMS=cpu`, tests) the collectives go through gloo. JAXLLM_SINGLE_PROCESS=1 turns the
detection off.
"""

from __future__ import annotations

import glob
import os

import jax

from jaxllm.errors import ConfigError

_SLURM_STEP = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
_GOOGLE_PCI_VENDOR = "0x1ae0"
_initialized = False


def tpu_chips_on_host(sys_root: str = "/sys") -> int:
    """Google TPU chips on this host's PCI bus (what makes a machine a Cloud TPU VM)."""
    n = 0
    for vendor in glob.glob(os.path.join(sys_root, "bus/pci/devices/*/vendor")):
        try:
            with open(vendor) as f:
                n += f.read().strip() == _GOOGLE_PCI_VENDOR
        except OSError:
            pass
    return n


def cluster(environ=None, tpu_chips: int | None = None) -> str | None:
    """The kind of multi-process job this process is part of (see the module docstring)."""
    env = os.environ if environ is None else environ
    if env.get("JAXLLM_COORDINATOR"):
        return "explicit"
    if env.get("JAXLLM_SINGLE_PROCESS") == "1":
        return None
    if "SLURM_JOB_ID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        missing = [k for k in _SLURM_STEP if k not in env]
        if missing:
            raise ConfigError(f"a SLURM job of {env['SLURM_NTASKS']} tasks, but this process is not one of its "
                            f"srun tasks ({', '.join(missing)} unset): start it with srun (launch/slurm.sbatch)")
        return "slurm"
    if int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return "mpi"
    if any(env.get(k) for k in ("TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES", "MEGASCALE_COORDINATOR_ADDRESS")):
        return "gke"
    if (tpu_chips_on_host() if tpu_chips is None else tpu_chips) > 0:
        return "tpu-vm"
    return None


def initialize() -> str | None:
    """Starts `jax.distributed` for the detected cluster (once); returns its kind."""
    global _initialized
    if _initialized:
        return None
    kind = cluster()
    if kind is not None and os.environ.get("JAX_PLATFORMS", "").startswith("cpu"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if kind == "explicit":
        jax.distributed.initialize(coordinator_address=os.environ["JAXLLM_COORDINATOR"],
                                   num_processes=int(os.environ["JAXLLM_NUM_PROCESSES"]),
                                   process_id=int(os.environ["JAXLLM_PROCESS_ID"]))
    elif kind is not None:
        jax.distributed.initialize()
    _initialized = True
    return kind
