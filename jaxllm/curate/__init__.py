"""Pretraining-data curation on datatrove: its C4, Gopher, FineWeb and language filters, exact and
MinHash dedup and n-gram decontamination, jaxllm's model-based quality step, run by datatrove's
local, SLURM or Ray executor.

`python -m jaxllm.curate --help`; the pipeline is `jaxllm.curate.pipeline.curate(CurateConfig)`.
`curate` is imported on first use, so the quality model and the config load without datatrove.
"""

from jaxllm.curate.config import ConfigError, CurateConfig, load_config

__all__ = ["ConfigError", "CurateConfig", "curate", "load_config"]


def __getattr__(name):
    if name == "curate":
        from jaxllm.curate.pipeline import curate

        return curate
    raise AttributeError(f"module 'jaxllm.curate' has no attribute {name!r}")
