"""TPU topologies by the names users know, as compile-only devices (no TPU needed).

    v5p-64, v4-32        TensorCores, as Cloud TPU names them: two per chip (megacore), 32 / 16 chips
    v5e-16, v5litepod-16 chips (one TensorCore each); v6e-64 likewise
    v5p:2x2x2, v5e:4x4   the chip grid itself (also v5p-2x2x2)

`tpu_devices(name)` asks libtpu (`pip install "jax[tpu]"`) for the slice's devices through
`jax.experimental.topologies.get_topology_desc`: they compile but hold no data. A megacore chip
(v4, v5p) is one JAX device, so a device's memory is its chip's HBM (`Topology.hbm_bytes`).
Counts that are not a power of two (v5p-384) need the grid form, since their layout is not
implied by the count.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re

from jaxllm.errors import UserError

# generation -> (libtpu name, grid dimensions, TensorCores per JAX device, HBM GiB per chip)
GENERATIONS = {
    "v4": ("v4", 3, 2, 32),
    "v5p": ("v5p", 3, 2, 95),
    "v5e": ("v5e", 2, 1, 16),
    "v6e": ("v6e", 2, 1, 32),
}
ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6lite": "v6e", "v5": "v5p"}


class TopologyError(UserError, ValueError):
    """A topology name that is not understood, or that libtpu cannot build."""


@dataclasses.dataclass(frozen=True)
class Topology:
    name: str  # as given
    generation: str  # v4, v5p, v5e, v6e
    grid: tuple[int, ...]  # chips along each torus axis

    @property
    def chips(self) -> int:
        return math.prod(self.grid)

    @property
    def hbm_bytes(self) -> int:
        return GENERATIONS[self.generation][3] * 2**30

    @property
    def grid_name(self) -> str:
        return f"{self.generation}:{'x'.join(map(str, self.grid))}"


def _grid_for(chips: int, dims: int) -> tuple[int, ...]:
    """The standard slice shape of a power-of-two chip count: 2x2x1, 2x2x2, 2x2x4, 2x4x4, 4x4x4...
    (3D) or 1x1, 2x2, 2x4, 4x4, 4x8... (2D): double the smallest axis, the last one on ties."""
    grid = [2, 2, 1] if dims == 3 else [1, 1]
    if chips < math.prod(grid):
        grid = [1] * dims
    while math.prod(grid) < chips:
        smallest = min(grid)
        i = max(j for j, g in enumerate(grid) if g == smallest)
        grid[i] *= 2
        grid.sort()
    return tuple(grid)


def parse_topology(name: str) -> Topology:
    """A Topology from `v5p-64`, `v5e-16`, `v5litepod-16`, `v6e-64`, `v4-32`, `v5p:2x2x2`."""
    m = re.fullmatch(r"(v\d+[a-z]*)[-:](\d+(?:x\d+)*)", name.strip().lower())
    gen = ALIASES.get(m.group(1), m.group(1)) if m else None
    if gen not in GENERATIONS:
        known = ", ".join(["v4-32", "v5p-64", "v5e-16", "v5litepod-16", "v6e-64", "v5p:2x2x2"])
        raise TopologyError(f"--topology {name!r}: unknown TPU topology; use names like {known}")
    _, dims, cores_per_device, _ = GENERATIONS[gen]
    if "x" in m.group(2):
        grid = tuple(int(g) for g in m.group(2).split("x"))
        if len(grid) != dims or min(grid) < 1:
            raise TopologyError(f"--topology {name!r}: a {gen} grid has {dims} positive dimensions")
        return Topology(name, gen, grid)
    count = int(m.group(2))
    chips, odd = divmod(count, cores_per_device)
    if odd or chips < 1 or chips & (chips - 1):
        raise TopologyError(f"--topology {name!r}: {gen}-N counts {'TensorCores, two per chip' if cores_per_device == 2 else 'chips'}; "
                            f"give a power of two{' times 2' if cores_per_device == 2 else ''}, or the grid form "
                            f"({gen}:AxB{'xC' if dims == 3 else ''})")
    return Topology(name, gen, _grid_for(chips, dims))


def tpu_devices(topology: Topology) -> list:
    """Compile-only devices of the whole slice (every host's), from libtpu."""
    # libtpu guards the real chips with a lock file; a compile-only client needs none of them,
    # and another JAX process on this machine may hold it.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    tpu_name, dims, cores_per_device, _ = GENERATIONS[topology.generation]
    grid = topology.grid + (1,) * (3 - dims)
    # Hosts hold 2x2 chips (a v5e / v6e single host of 8 holds 2x4), as Cloud TPU slices do.
    host = tuple(min(g, b) for g, b in zip(grid, (2, 4, 1) if dims == 2 and topology.chips == 8 else (2, 2, 1)))
    # Full slices wrap around (a torus) along axes of 16 chips, and all axes of a 3D cube of >= 4.
    wrap = tuple((dims == 3 and min(grid) >= 4) or (dims == 2 and g == 16) for g in grid)
    try:
        desc = topologies.get_topology_desc(
            platform="tpu", topology_name=f"{tpu_name}:{'x'.join(map(str, topology.grid))}",
            chip_config_name="megacore" if cores_per_device == 2 else "default",
            chips_per_host_bounds=host, num_slices=1, wrap=wrap)
    except ImportError as e:
        raise TopologyError("compiling for TPU needs libtpu: pip install \"jax[tpu]\" (the version of your jax)") from e
    except Exception as e:  # libtpu's own errors (a grid it does not know, no libtpu found)
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "libtpu" in text.lower() or "tpu" not in text.lower():
            text += ' (is libtpu installed? pip install "jax[tpu]" at your jax version)'
        raise TopologyError(f"--topology {topology.name}: libtpu cannot build {topology.grid_name}: {text}") from e
    return list(desc.devices)
