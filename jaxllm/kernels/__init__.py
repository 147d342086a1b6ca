"""Attention kernels: `REGISTRY` (name -> platforms, kernel, decode function) and its dispatchers
`attention` / `decode_attention`; `flash_attention` is ours (Pallas)."""

from jaxllm.kernels.attention import (
    REGISTRY, attention, check_available, decode_attention, reference_attention,
)
from jaxllm.kernels.flash_attention import flash_attention

__all__ = ["REGISTRY", "attention", "check_available", "decode_attention", "flash_attention",
           "reference_attention"]
