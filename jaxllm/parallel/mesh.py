"""The device mesh and the one table that maps logical axis names to mesh axes.

Model code names axes logically (`embed`, `heads`, `batch`, ...); this module alone decides where
they live. `data` is pure data parallelism, `fsdp` shards parameters and optimizer state (and the
batch) ZeRO-3 style, `tensor` splits heads, MLP and vocab Megatron style.
"""

from __future__ import annotations

import contextlib
import contextvars
import math

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axis (or tuple of axes, or None for replicated)
LOGICAL_AXIS_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "length": None,
    "embed": "fsdp",
    "vocab": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "layers": None,
}


def mesh_shape(data: int, fsdp: int, tensor: int, num_devices: int) -> tuple[int, int, int]:
    """Resolves one -1 entry to fill the devices; checks the product."""
    sizes = [data, fsdp, tensor]
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ValueError(f"mesh: {num_devices} devices cannot be split with the fixed axes {sizes}")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ValueError(f"mesh: data*fsdp*tensor = {math.prod(sizes)} but there are {num_devices} devices")
    return tuple(sizes)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices=None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(data, fsdp, tensor, len(devices))
    if devices[0].platform == "cpu":  # no interconnect topology to respect
        arr = np.asarray(devices).reshape(shape)
    else:  # orders devices so that inner mesh axes ride the fastest links
        from jax.experimental import mesh_utils

        arr = mesh_utils.create_device_mesh(shape, devices=devices)
    return Mesh(arr, MESH_AXES)


def mesh_from_config(mesh_cfg) -> Mesh:
    return make_mesh(mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor)


def logical_to_spec(names, rules=None) -> P:
    rules = LOGICAL_AXIS_RULES if rules is None else rules
    out, used = [], set()
    for name in names:
        axes = rules.get(name) if name is not None else None
        if name is not None and name not in rules:
            raise KeyError(f"no sharding rule for logical axis {name!r}")
        # A mesh axis may shard only one dimension of an array.
        if isinstance(axes, str):
            axes = None if axes in used else axes
        elif isinstance(axes, tuple):
            axes = tuple(a for a in axes if a not in used) or None
        used.update((axes,) if isinstance(axes, str) else axes or ())
        out.append(axes)
    return P(*out)


def logical_sharding(mesh: Mesh, names, shape=None) -> NamedSharding:
    """NamedSharding for logical `names`; with `shape`, checks that each sharded dim divides."""
    spec = logical_to_spec(names)
    if shape is not None:
        for dim, name, axes in zip(shape, names, spec):
            if axes is None:
                continue
            size = math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))
            if dim % size:
                raise ValueError(f"axis {name!r} of size {dim} does not divide over mesh axes {axes} "
                                 f"of size {size}; change the mesh or the model shape")
    return NamedSharding(mesh, spec)


def tree_shardings(mesh: Mesh, axes_tree, shapes_tree):
    """Shardings for a params-like tree from its logical axes and shapes."""
    is_axes = lambda x: isinstance(x, tuple) and all(isinstance(a, (str, type(None))) for a in x)
    return jax.tree.map(lambda names, shape: logical_sharding(mesh, names, shape),
                        axes_tree, shapes_tree, is_leaf=is_axes)


# Activation constraints are active only inside `activation_sharding(mesh)`; a model traced
# outside one (single device, tests) is left to the compiler.
_ACTIVE_MESH: contextvars.ContextVar[Mesh | None] = contextvars.ContextVar("jaxllm_mesh", default=None)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh):
    token = _ACTIVE_MESH.set(mesh)
    try:
        yield mesh
    finally:
        _ACTIVE_MESH.reset(token)


def active_mesh() -> Mesh | None:
    """The mesh of the enclosing `activation_sharding`, if any."""
    return _ACTIVE_MESH.get()


def constrain(x, names):
    mesh = _ACTIVE_MESH.get()
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(names)))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1)))
