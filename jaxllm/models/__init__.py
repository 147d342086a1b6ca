"""Model definitions: `ModelConfig`, `init_params(cfg, rng)`, `forward(cfg, params, tokens, ...)`;
cached decoding in `jaxllm.models.decode`."""

from jaxllm.models.llama import (
    ModelConfig, RopeScaling, decoder_layer, forward, hidden_states, init_params, output_embedding,
    param_axes, param_shapes,
)

__all__ = ["ModelConfig", "RopeScaling", "decoder_layer", "forward", "hidden_states", "init_params",
           "output_embedding", "param_axes", "param_shapes"]
