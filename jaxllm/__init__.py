"""jaxllm: pretraining and post-training of Llama-family models in JAX."""
__version__ = "0.1.0"
