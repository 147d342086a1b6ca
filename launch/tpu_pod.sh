#!/usr/bin/env bash
# Runs the same command on every worker of a Cloud TPU VM pod slice; jaxllm finds TPU chips on
# each worker and calls jax.distributed.initialize(), which reads the pod's workers from the VM
# metadata server, so the workers form one job.
#   launch/tpu_pod.sh [--dry-run] NAME ZONE CONFIG [key=value ...]
#   launch/tpu_pod.sh my-v5p-16 us-east5-a configs/llama3-8b.yaml trainer.grad_accum_steps=64 trainer.run_dir=gs://my-bucket/runs/llama3-8b
# Assumes the repository at ~/jaxllm on every worker with `pip install -e ".[tpu,gcs]"`
# (check the fit first: python -m jaxllm.compile --config CONFIG --topology v5p-16 ...).
# --dry-run prints the gcloud command instead of running it.
set -euo pipefail
dry=0
if [ "${1:-}" = "--dry-run" ]; then dry=1; shift; fi
[ $# -ge 3 ] || { echo "usage: launch/tpu_pod.sh [--dry-run] NAME ZONE CONFIG [key=value ...]" >&2; exit 2; }
name="$1"; zone="$2"; shift 2
remote="cd ~/jaxllm && $(printf '%q ' python -m jaxllm.train --config "$@")"
cmd=(gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" --worker=all --command "$remote")
if [ "$dry" = 1 ]; then printf '%q ' "${cmd[@]}"; echo; exit 0; fi
exec "${cmd[@]}"
