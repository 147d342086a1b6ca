#!/usr/bin/env bash
# N training processes on this machine, talking over 127.0.0.1 (multi-host code paths on one box).
#   launch/local.sh 2 --config configs/tiny.yaml mesh.data=-1
#   launch/local.sh --dry-run 4 --config configs/tiny.yaml     (prints each process's command)
# On CPU each process gets DEVICES fake devices (default 1) and gloo collectives.
set -euo pipefail
dry=0
if [ "${1:-}" = "--dry-run" ]; then dry=1; shift; fi
n="$1"; shift
port="${PORT:-$((20000 + RANDOM % 10000))}"
devices="${DEVICES:-1}"
pids=()
for ((i = 0; i < n; i++)); do
  env_vars=(JAXLLM_COORDINATOR="127.0.0.1:$port" JAXLLM_NUM_PROCESSES="$n" JAXLLM_PROCESS_ID="$i"
            JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
            XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$devices")
  if [ "$dry" = 1 ]; then
    printf '%q ' env "${env_vars[@]}" python -m jaxllm.train "$@"; echo
    continue
  fi
  env "${env_vars[@]}" python -m jaxllm.train "$@" &
  pids+=($!)
done
status=0
for p in "${pids[@]+"${pids[@]}"}"; do wait "$p" || status=$?; done
exit "$status"
