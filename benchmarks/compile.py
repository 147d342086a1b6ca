"""The README's compile table: `python -m benchmarks.compile [--only SUBSTRING]`

Compiles each shipped config ahead of time for one or two TPU slices it is meant for
(`jaxllm.compile`, libtpu's compile-only devices; no TPU needed) and writes a dated results file
with every row's per-chip memory, whether it fits and the full reports, plus the Markdown table.
A config that does not fit as shipped keeps its one-line reason, and the next row is the
smallest trainer.grad_accum_steps (same global batch, fewer rows per chip at a time) that fits,
or the finest split there is (one row per chip) with what it still needs. The eval step runs in
the same microbatches as the train step.
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
    ("configs/smollm2-360m.yaml", "v5e-8", ("model.attention=pallas",)),
    ("configs/smollm2-1.7b.yaml", "v5e-8", ("model.attention=pallas",)),
    ("configs/llama3-8b.yaml", "v5p-16", ()),
    ("configs/llama3-8b.yaml", "v6e-16", ()),
    ("configs/llama3-8b.yaml", "v5e-32", ()),
    ("configs/llama3-70b.yaml", "v5p-128", ()),
]


def accum_candidates(config: str, topology: str, overrides) -> list[int]:
    """grad_accum_steps above the config's own whose microbatch still divides over the chips."""
    from jaxllm.config import load_config
    from jaxllm.parallel.topology import parse_topology

    cfg = load_config(config, list(overrides))
    batch, chips = cfg.trainer.batch_size, parse_topology(topology).chips
    return [a for a in range(cfg.trainer.grad_accum_steps + 1, batch + 1)
            if batch % a == 0 and (batch // a) % chips == 0]


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
        if not report["fits"]:
            row["error"] = (f"does not fit: needs {report['peak_gib_per_chip']:.2f} GiB per chip of "
                            f"{report['hbm_per_chip_gib']:.2f}")
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
        tries = [overrides] + [overrides + (f"trainer.grad_accum_steps={a}",)
                               for a in accum_candidates(config, topology, overrides)]
        for i, attempt in enumerate(tries):
            r = run_row(config, topology, attempt)
            print(f"{config} {topology} {' '.join(attempt)}: {r.get('peak_gib_per_chip', '-')} GiB/chip, "
                  f"fits {r['fits']} ({r['seconds']} s) {r.get('error', '')}", file=sys.stderr, flush=True)
            last = i == len(tries) - 1
            if i == 0 or last or r["fits"] or not r["error"].startswith("does not fit"):
                results.append(r)  # as shipped, then the first split that fits (or the finest tried)
            if r["fits"] or not r["error"].startswith("does not fit"):
                break
    table = markdown(results)
    print(table)
    if args.out:
        from benchmarks.common import write_results

        path = write_results("compile", "table", {"rows": results, "markdown": table}, args.out)
        print("wrote", path, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
