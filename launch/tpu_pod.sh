#!/usr/bin/env bash
# Runs the same command on every worker of a TPU VM pod slice; jax.distributed detects the pod.
#   launch/tpu_pod.sh my-tpu us-central2-b configs/llama3-8b.yaml trainer.run_dir=gs://bucket/run
# Assumes the repository is checked out at ~/jaxllm on every worker and `pip install -e .[tpu]`.
set -euo pipefail
name="$1"; zone="$2"; config="$3"; shift 3
gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" --worker=all \
  --command "cd ~/jaxllm && python -m jaxllm.train --config $config $*"
