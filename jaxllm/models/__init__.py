"""Model definitions: `ModelConfig`, `init_params(cfg, rng)`, `forward(cfg, params, tokens, ...)`."""

from jaxllm.models.llama import (
    ModelConfig, RopeScaling, forward, forward_cached, hidden_states, init_kv_cache, init_params,
    output_embedding, param_axes, param_shapes,
)

__all__ = ["ModelConfig", "RopeScaling", "forward", "forward_cached", "hidden_states", "init_kv_cache",
           "init_params", "output_embedding", "param_axes", "param_shapes"]
