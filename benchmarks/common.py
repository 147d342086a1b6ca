"""What every benchmark records next to its numbers: hardware, versions, the exact command."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shlex
import sys

import jax


def environment() -> dict:
    import flax
    import optax

    dev = jax.devices()[0]
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device_kind": dev.device_kind, "platform": dev.platform, "device_count": jax.device_count(),
        "process_count": jax.process_count(), "host": platform.node(), "cpu_count": os.cpu_count(),
        "python": platform.python_version(), "jax": jax.__version__, "jaxlib": jax.lib.__version__,
        "flax": flax.__version__, "optax": optax.__version__,
        "command": " ".join(shlex.quote(a) for a in [os.path.basename(sys.executable), "-m",
                                                      _module_name()] + sys.argv[1:]),
    }


def _module_name() -> str:
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    return spec.name if spec and spec.name else sys.argv[0]


def config_arg_parser(module: str, description: str) -> argparse.ArgumentParser:
    """The arguments of a benchmark that runs a training config: --config, --out, overrides
    (add its own options, then `parse_args`)."""
    ap = argparse.ArgumentParser(prog=f"python -m {module}", description=description)
    ap.add_argument("--config", required=True)
    ap.add_argument("--out", default="benchmarks/results", help="folder for the dated results file ('' = none)")
    ap.add_argument("overrides", nargs="*", help="dotted key=value config overrides")
    return ap


def write_results(kind: str, tag: str | None, payload: dict, out_dir: str = "benchmarks/results") -> str:
    """Writes `<kind>[-<tag>]-<device>-<date>.json` and returns its path."""
    env = payload.get("environment") or environment()
    device = re.sub(r"[^A-Za-z0-9]+", "-", env["device_kind"]).strip("-").lower()
    date = env["date"][:10]
    os.makedirs(out_dir, exist_ok=True)
    name = "-".join(part for part in (kind, tag, device, date) if part)
    path = os.path.join(out_dir, f"{name}.json")
    with open(path, "w") as f:
        json.dump({"environment": env, **payload}, f, indent=2)
    return path
