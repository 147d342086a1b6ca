"""One command for a single H100 / H200: `python -m benchmarks.gpu_suite [--dry-run]`

Runs, in this order and within about 8 minutes, the `gpu`-marked tests, `benchmarks.step` for
the smollm2-360m and smollm2-1.7b configs with each attention kernel (xla, cudnn, pallas) on a
batch one GPU holds, and `benchmarks.attention`. The benchmarks write their own dated results
files; this suite writes `gpu_suite-<device>-<date>.json` with every command, its exit status,
time and the end of its output. Each command has its share of the time budget (`--budget-s`,
default 480 s) as a timeout; one that runs out is recorded as timed out, and the suite's exit
status is non-zero if any command failed. `--dry-run` prints the commands and runs nothing.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time

# Batches one 80 GB GPU holds at the configs' sequence length (2048).
STEP_BATCH = {"smollm2-360m": ("trainer.batch_size=16",), "smollm2-1.7b": ("trainer.batch_size=8", "trainer.grad_accum_steps=1")}


def plan(out: str = "benchmarks/results") -> list[tuple[str, list[str], float]]:
    """(name, command, share of the time budget) of each step of the suite."""
    py = sys.executable or "python"
    steps = [(f"step {config} {impl}",
              [py, "-m", "benchmarks.step", "--config", f"configs/{config}.yaml", "--steps", "5", "--warmup", "1",
               "--out", out, f"model.attention={impl}", *batch], 0.085)
             for config, batch in STEP_BATCH.items() for impl in ("xla", "cudnn", "pallas")]
    return ([("gpu tests", [py, "-m", "pytest", "-q", "-m", "gpu", "tests", "-p", "no:cacheprovider"], 0.2)] + steps
            + [("attention", [py, "-m", "benchmarks.attention", "--seqs", "1024,2048,4096,8192", "--head-dims",
                              "64,128", "--iters", "5", "--out", out], 0.29)])


def run(commands, budget_s: float) -> list[dict]:
    results = []
    for name, cmd, share in commands:
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=share * budget_s)
            rc, output = proc.returncode, proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as e:
            rc = "timed out"
            output = ((e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")) + (
                (e.stderr or b"").decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or ""))
        seconds = round(time.perf_counter() - t0, 1)
        results.append({"name": name, "command": shlex.join(cmd), "returncode": rc, "seconds": seconds,
                        "timeout_s": round(share * budget_s, 1), "output_tail": output[-4000:]})
        print(f"{name}: {'ok' if rc == 0 else rc} in {seconds} s", file=sys.stderr, flush=True)
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu_suite", description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    ap.add_argument("--budget-s", type=float, default=480.0, help="the whole suite's time budget")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)
    commands = plan(args.out)
    if args.dry_run:
        for name, cmd, share in commands:
            print(f"{shlex.join(['python', *cmd[1:]])}  # {name}, timeout {share * args.budget_s:.0f} s")
        return 0
    import jax

    if jax.default_backend() != "gpu":
        print(f"benchmarks.gpu_suite needs a GPU; this machine's JAX backend is {jax.default_backend()}",
              file=sys.stderr)
        return 2
    results = run(commands, args.budget_s)
    from benchmarks.common import write_results

    path = write_results("gpu_suite", None, {"budget_s": args.budget_s, "results": results}, args.out)
    print("wrote", path, file=sys.stderr)
    return 0 if all(r["returncode"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
