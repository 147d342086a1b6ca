"""Renders a GKE JobSet for a TPU slice: one pod per TPU host, the same command in each.

    python launch/gke_jobset.py --topology v5p-32 --image REGISTRY/jaxllm:TAG CONFIG [key=value ...] \\
        | kubectl apply -f -          (launch/gke.sh does this; launch/gke.sh --dry-run prints it)

GKE sets TPU_WORKER_HOSTNAMES and TPU_WORKER_ID in each pod; jaxllm sees them and calls
jax.distributed.initialize(), which forms the job from them. The JobSet restarts the whole
slice on a failure (maxRestarts), and each restart resumes from the newest readable checkpoint
(trainer.run_dir should be a gs:// URL: pods have no shared disk).
"""

from __future__ import annotations

import argparse
import os
import sys

import yaml

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from jaxllm.parallel.topology import parse_topology  # noqa: E402

# generation -> (GKE accelerator label, chips per host of a multi-host slice)
ACCELERATORS = {"v4": "tpu-v4-podslice", "v5p": "tpu-v5p-slice", "v5e": "tpu-v5-lite-podslice",
                "v6e": "tpu-v6e-slice"}


def jobset(name: str, image: str, topology: str, command: list[str], max_restarts: int = 3) -> dict:
    t = parse_topology(topology)
    per_host = 8 if t.generation in ("v5e", "v6e") and t.chips == 8 else min(4, t.chips)
    hosts = t.chips // per_host
    pod = {"restartPolicy": "Never",
           "nodeSelector": {"cloud.google.com/gke-tpu-accelerator": ACCELERATORS[t.generation],
                            "cloud.google.com/gke-tpu-topology": "x".join(map(str, t.grid))},
           "containers": [{"name": "jaxllm", "image": image, "command": command,
                           "resources": {"limits": {"google.com/tpu": per_host}}}]}
    return {"apiVersion": "jobset.x-k8s.io/v1alpha2", "kind": "JobSet",
            "metadata": {"name": name, "annotations": {
                "alpha.jobset.sigs.k8s.io/exclusive-topology": "cloud.google.com/gke-nodepool"}},
            "spec": {"failurePolicy": {"maxRestarts": max_restarts},
                     "replicatedJobs": [{"name": "workers", "replicas": 1, "template": {"spec": {
                         "parallelism": hosts, "completions": hosts, "backoffLimit": 0,
                         "template": {"spec": pod}}}}]}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--topology", required=True, help="v5p-32, v5e-16, v6e-64, v4-32, v5p:2x2x4")
    ap.add_argument("--image", required=True, help="a container image with jaxllm installed (pip install .[tpu,gcs])")
    ap.add_argument("--name", default="jaxllm")
    ap.add_argument("--max-restarts", type=int, default=3)
    ap.add_argument("config")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    command = ["python", "-m", "jaxllm.train", "--config", args.config, *args.overrides]
    yaml.safe_dump(jobset(args.name, args.image, args.topology, command, args.max_restarts), sys.stdout,
                   sort_keys=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
