#!/usr/bin/env bash
# A TPU slice on GKE through JobSet: one pod per TPU host, the same command in each.
#   launch/gke.sh [--dry-run] --topology v5p-32 --image REGISTRY/jaxllm:TAG [--name NAME] CONFIG [key=value ...]
#   launch/gke.sh --topology v5p-16 --image us-docker.pkg.dev/my-project/jaxllm:latest configs/llama3-8b.yaml trainer.grad_accum_steps=64 trainer.run_dir=gs://my-bucket/runs/llama3-8b
# --dry-run prints the JobSet YAML instead of applying it (kubectl apply -f -).
set -euo pipefail
dry=0
if [ "${1:-}" = "--dry-run" ]; then dry=1; shift; fi
here="$(dirname "$0")"
if [ "$dry" = 1 ]; then exec python "$here/gke_jobset.py" "$@"; fi
python "$here/gke_jobset.py" "$@" | kubectl apply -f -
