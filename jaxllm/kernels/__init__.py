"""Attention kernels: `attention` dispatches xla | cudnn | pallas; `flash_attention` is ours."""

from jaxllm.kernels.attention import attention, reference_attention
from jaxllm.kernels.flash_attention import flash_attention

__all__ = ["attention", "flash_attention", "reference_attention"]
