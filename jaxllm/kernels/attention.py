"""The one registry of attention implementations, and the entry points that dispatch through it.

`REGISTRY` maps a name (`model.attention`) to an `Implementation`: the platforms it runs on, its
training / prefill function (causal, packed segments) and the function cached decoding uses for
new queries against a KV cache under an explicit mask. Config validation (`check_name`), the
runtime check (`check_available`) and the dispatchers (`attention`, `decode_attention`) all read
it, so a new kernel is one entry here.

    xla     cpu, gpu, tpu  `jax.nn.dot_product_attention(implementation="xla")`
    cudnn   gpu            cuDNN's fused kernel through `jax.nn.dot_product_attention`
    pallas  gpu, tpu       ours: Triton FlashAttention-2 on GPU, JAX's splash attention on TPU

Decoding: neither cuDNN nor our Pallas kernels take an arbitrary key mask, so the `cudnn` and
`pallas` entries name `masked_xla` as their decode function (one query row per step against the
cache, where a fused kernel would gain little); their prefill runs their own kernel. This is
stated here, in the entry, rather than switched behind the caller's back.

Layout: q is [B, T, N, H]; k and v are [B, S, K, H] with N % K == 0 (grouped-query attention).
`segment_ids` [B, T] (self-attention) keeps packed documents apart: a token attends only to
tokens of its own segment. The platform is that of the target devices (the active mesh's, see
`parallel.mesh.activation_sharding`), not the host's default backend: an ahead-of-time compile
for TPU on a CPU machine must pick the TPU kernel.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from jaxllm.errors import ConfigError
from jaxllm.parallel.mesh import active_mesh, logical_to_spec


@dataclasses.dataclass(frozen=True)
class Implementation:
    platforms: tuple[str, ...]  # device platforms it runs on: "cpu", "gpu", "tpu"
    needs: str  # what it needs, in errors: "an NVIDIA GPU"
    # fn(q, k, v, *, causal, segment_ids, sm_scale, platform, interpret) -> [B, T, N, H]
    fn: Callable
    # decode(q, k, v, *, mask_BTS, sm_scale) -> [B, T, N, H]: queries against a KV cache
    decode: Callable
    interpretable: bool = False  # runs anywhere in the Pallas interpreter (`interpret=True`)


def _segment_mask(segment_ids):
    if segment_ids is None:
        return None
    return (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]  # [B, 1, T, S]


def _xla(q, k, v, *, causal, segment_ids, sm_scale, platform, interpret):
    return jax.nn.dot_product_attention(q, k, v, mask=_segment_mask(segment_ids), is_causal=causal,
                                        scale=sm_scale, implementation="xla")


def _cudnn(q, k, v, *, causal, segment_ids, sm_scale, platform, interpret):
    return jax.nn.dot_product_attention(q, k, v, mask=_segment_mask(segment_ids), is_causal=causal,
                                        scale=sm_scale, implementation="cudnn")


def masked_xla(q, k, v, *, mask_BTS, sm_scale=None):
    """Attention where query t of row b sees key s iff mask_BTS[b, t, s] (each query must see one)."""
    return jax.nn.dot_product_attention(q, k, v, mask=mask_BTS[:, None], scale=sm_scale,
                                        implementation="xla")


def _pallas(q, k, v, *, causal, segment_ids, sm_scale, platform, interpret):
    """Our kernels per device. A pallas_call has no sharding rule of its own, so under a
    multi-device mesh (`parallel.mesh.activation_sharding`) it runs inside `shard_map`: each
    device takes its rows of the batch (data, fsdp) and its heads (tensor), which is exact since
    attention mixes neither rows nor kv-head groups. Without a mesh it is called directly."""
    from jaxllm.kernels.flash_attention import flash_attention

    def kernel(q, k, v, seg):
        return flash_attention(q, k, v, segment_ids=seg, causal=causal, sm_scale=sm_scale,
                               interpret=interpret, platform=platform)

    mesh = active_mesh()
    if mesh is None or mesh.size == 1:
        return kernel(q, k, v, segment_ids)
    qs = logical_to_spec(("batch", "length", "heads", "head_dim"))
    ks = logical_to_spec(("batch", "length", "kv_heads", "head_dim"))
    seg_spec = logical_to_spec(("batch", "length"))
    tensor = mesh.shape.get(qs[2], 1) if isinstance(qs[2], str) else 1
    if k.shape[2] % tensor:
        raise ValueError(f"model.attention=pallas under mesh.tensor={tensor} needs the kv heads "
                         f"({k.shape[2]}) to divide over it")
    if segment_ids is None:
        f = jax.shard_map(lambda q, k, v: kernel(q, k, v, None), mesh=mesh, in_specs=(qs, ks, ks),
                          out_specs=qs, check_vma=False)
        return f(q, k, v)
    f = jax.shard_map(kernel, mesh=mesh, in_specs=(qs, ks, ks, seg_spec), out_specs=qs, check_vma=False)
    return f(q, k, v, segment_ids)


REGISTRY: dict[str, Implementation] = {
    "xla": Implementation(("cpu", "gpu", "tpu"), "any device", _xla, masked_xla),
    "cudnn": Implementation(("gpu",), "an NVIDIA GPU", _cudnn, masked_xla),
    "pallas": Implementation(("gpu", "tpu"), "a GPU or TPU", _pallas, masked_xla, interpretable=True),
}
IMPLEMENTATIONS = tuple(REGISTRY)  # the names at import (benchmarks' --impls); code reads REGISTRY


def check_name(impl: str) -> Implementation:
    """The registry entry of `impl`; ValueError naming the valid choices if there is none."""
    if impl not in REGISTRY:
        raise ValueError(f"model.attention: {impl!r} is not one of {', '.join(REGISTRY)}")
    return REGISTRY[impl]


def check_available(impl: str, platform: str) -> None:
    """ConfigError (a ValueError) in one line if `impl` cannot run on `platform` devices."""
    try:
        entry = check_name(impl)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if platform not in entry.platforms:
        valid = ", ".join(n for n, e in REGISTRY.items() if platform in e.platforms)
        raise ConfigError(f"model.attention={impl} needs {entry.needs}, this machine has {platform} "
                          f"devices; valid here: {valid or 'none'}")


def target_platform() -> str:
    """The platform of the devices being compiled for: the active mesh's, else the default."""
    mesh = active_mesh()
    return mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()


def attention(q, k, v, *, impl: str = "xla", causal: bool = True, segment_ids=None, sm_scale=None,
              interpret: bool = False):
    """Dispatches to REGISTRY[impl].fn on the target platform. `interpret` runs an interpretable
    (Pallas) implementation in the interpreter (CPU tests); others ignore it. An implementation
    asked for where it cannot run is an error, never a switch to another."""
    entry, platform = check_name(impl), target_platform()
    if platform not in entry.platforms and not (interpret and entry.interpretable):
        hint = (" Pass interpret=True to run it (slowly) in the Pallas interpreter, or use impl='xla'."
                if entry.interpretable else "")
        raise RuntimeError(f"attention impl {impl!r} needs {entry.needs}, but the target devices are "
                           f"{platform!r}.{hint}")
    return entry.fn(q, k, v, causal=causal, segment_ids=segment_ids, sm_scale=sm_scale,
                    platform=platform, interpret=interpret)


def decode_attention(q, k, v, *, impl: str, mask_BTS, sm_scale=None):
    """New queries q [B, T, N, H] against a KV cache k, v [B, S, K, H]: query t of row b sees
    slot s iff mask_BTS[b, t, s]. Runs REGISTRY[impl].decode (see the module docstring)."""
    return check_name(impl).decode(q, k, v, mask_BTS=mask_BTS, sm_scale=sm_scale)


def reference_attention(q, k, v, *, causal: bool = True, segment_ids=None, sm_scale=None):
    """Plain fp32 attention written out in full: the ground truth for kernel tests."""
    B, T, N, H = q.shape
    K = k.shape[2]
    scale = sm_scale if sm_scale is not None else H ** -0.5
    qg = q.astype(jnp.float32).reshape(B, T, K, N // K, H)
    s = jnp.einsum("BTKGH,BSKH->BKGTS", qg, k.astype(jnp.float32)) * scale
    S = k.shape[1]
    mask = jnp.ones((B, 1, 1, T, S), bool)
    if causal:
        mask = mask & (jnp.arange(S)[None, :] <= jnp.arange(T)[:, None] + (S - T))
    if segment_ids is not None:
        mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None, None]
    s = jnp.where(mask, s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    o = jnp.einsum("BKGTS,BSKH->BTKGH", p, v.astype(jnp.float32))
    return o.reshape(B, T, N, H).astype(q.dtype)
