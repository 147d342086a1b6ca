#!/usr/bin/env bash
# Submits launch/slurm.sbatch: one training process per node (all its GPUs) or per GPU.
#   launch/slurm.sh [--dry-run] --nodes N [--gpus-per-node G] [--per-gpu] CONFIG [key=value ...]
# --dry-run prints the sbatch command, then each task's command and the SLURM variables srun
# gives it (the ones jax.distributed reads), without submitting.
set -euo pipefail
dry=0; nodes=1; gpus=8; per_gpu=0
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry=1; shift ;;
    --nodes) nodes="$2"; shift 2 ;;
    --gpus-per-node) gpus="$2"; shift 2 ;;
    --per-gpu) per_gpu=1; shift ;;
    *) break ;;
  esac
done
[ $# -ge 1 ] || { echo "usage: launch/slurm.sh [--dry-run] --nodes N [--gpus-per-node G] [--per-gpu] CONFIG [key=value ...]" >&2; exit 2; }
tasks_per_node=1
if [ "$per_gpu" = 1 ]; then tasks_per_node="$gpus"; fi
cmd=(sbatch --nodes="$nodes" --ntasks-per-node="$tasks_per_node" --gpus-per-node="$gpus"
     "$(dirname "$0")/slurm.sbatch" "$@")
if [ "$dry" = 0 ]; then exec "${cmd[@]}"; fi
printf '%q ' "${cmd[@]}"; echo
ntasks=$((nodes * tasks_per_node))
for ((i = 0; i < ntasks; i++)); do
  printf 'task %d: SLURM_NTASKS=%d SLURM_PROCID=%d SLURM_LOCALID=%d SLURM_NODEID=%d: ' \
    "$i" "$ntasks" "$i" "$((i % tasks_per_node))" "$((i / tasks_per_node))"
  printf '%q ' python -m jaxllm.train --config "$@"; echo
done
