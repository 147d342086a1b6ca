"""The README's compile table: `python -m benchmarks.compile [--only SUBSTRING]`

Compiles each shipped config ahead of time for one or two TPU slices it is meant for
(`jaxllm.compile`, libtpu's compile-only devices; no TPU needed) and writes a dated results file
with every row's per-chip memory, whether it fits and the full reports, plus the Markdown table.
Rows that do not fit are results too: they keep the one-line reason.
"""

from __future__ import annotations

import argparse
import sys
import time

import jax

# (config, topology, overrides): the shipped settings first, then the batch split that fits.
ROWS = [
    ("configs/tiny.yaml", "v5e-4", ("model.attention=pallas",)),
    ("configs/smollm2-135m.yaml", "v5e-8", ("model.attention=pallas",)),
    ("configs/smollm2-135m.yaml", "v5e-8", ("model.attention=pallas", "trainer.grad_accum_steps=8")),
    ("configs/smollm2-360m.yaml", "v5e-8", ("model.attention=pallas", "trainer.grad_accum_steps=12")),
    ("configs/smollm2-1.7b.yaml", "v5e-8", ("model.attention=pallas",)),
    ("configs/smollm2-1.7b.yaml", "v5e-8", ("model.attention=pallas", "trainer.grad_accum_steps=32")),
    ("configs/llama3-8b.yaml", "v5p-16", ()),
    ("configs/llama3-8b.yaml", "v5p-16", ("trainer.grad_accum_steps=64",)),
    ("configs/llama3-8b.yaml", "v6e-16", ("trainer.grad_accum_steps=32",)),
    ("configs/llama3-8b.yaml", "v5e-32", ("trainer.grad_accum_steps=16",)),
    ("configs/llama3-70b.yaml", "v5p-128", ("trainer.grad_accum_steps=8",)),
]


def run_row(config: str, topology: str, overrides) -> dict:
    from jaxllm.compile import compile_for
    from jaxllm.config import load_config
    from jaxllm.errors import UserError
    from jaxllm.parallel.topology import parse_topology

    row = {"config": config, "topology": topology, "overrides": list(overrides)}
    t0 = time.perf_counter()
    try:
        report = compile_for(load_config(config, list(overrides)), parse_topology(topology))
        row |= {"peak_gib_per_chip": report["peak_gib_per_chip"], "hbm_per_chip_gib": report["hbm_per_chip_gib"],
                "fits": report["fits"], "report": report}
    except UserError as e:
        row |= {"fits": False, "error": str(e).splitlines()[0]}
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def markdown(rows) -> str:
    lines = ["| config | topology | overrides | mesh | train GiB/chip | eval or rollout GiB/chip | HBM GiB/chip | fits |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        rep = r.get("report", {})
        progs = rep.get("programs", {})
        other = progs.get("eval") or progs.get("rollout") or {}
        mesh = "x".join(f"{k}{v}" for k, v in rep.get("mesh", {}).items() if v > 1) or "-"
        fits = "yes" if r["fits"] else f"no: {r.get('error', 'over HBM')}"
        lines.append(f"| {r['config'].removeprefix('configs/')} | {r['topology']} | {' '.join(r['overrides']) or '(as shipped)'} "
                     f"| {mesh} | {progs.get('train', {}).get('total_gib', '-')} | {other.get('total_gib', '-')} "
                     f"| {rep.get('hbm_per_chip_gib', '-')} | {fits} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.compile", description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="rows whose config or topology contains this")
    ap.add_argument("--out", default="benchmarks/results", help="folder for the dated results file ('' = none)")
    ap.add_argument("--list", action="store_true", help="print the rows it would compile and exit")
    args = ap.parse_args(argv)
    rows = [r for r in ROWS if args.only in r[0] or args.only in r[1]]
    if args.list:
        for config, topology, overrides in rows:
            print(f"python -m jaxllm.compile --config {config} --topology {topology} {' '.join(overrides)}".strip())
        return 0
    jax.config.update("jax_platforms", "cpu")
    results = []
    for config, topology, overrides in rows:
        results.append(run_row(config, topology, overrides))
        r = results[-1]
        print(f"{config} {topology} {' '.join(overrides)}: {r.get('peak_gib_per_chip', '-')} GiB/chip, "
              f"fits {r['fits']} ({r['seconds']} s)", file=sys.stderr, flush=True)
    table = markdown(results)
    print(table)
    if args.out:
        from benchmarks.common import write_results

        path = write_results("compile", "table", {"rows": results, "markdown": table}, args.out)
        print("wrote", path, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
