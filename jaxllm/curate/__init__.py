"""Pretraining-data curation: heuristic filters (C4, Gopher), decontamination against evaluation
sets, exact and MinHash-LSH near dedup, and a model-based quality filter.

`python -m jaxllm.curate --help`; the pipeline is `jaxllm.curate.pipeline.curate(CurateConfig)`.
"""

from jaxllm.curate.config import ConfigError, CurateConfig, load_config
from jaxllm.curate.pipeline import curate

__all__ = ["ConfigError", "CurateConfig", "curate", "load_config"]
