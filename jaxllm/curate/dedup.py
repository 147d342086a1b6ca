"""Exact and MinHash deduplication: datatrove's multi-stage steps, set up from `CurateConfig`.

Exact: ExactDedupSignature (each task hashes its documents) -> ExactFindDedups (the hash space
split over `exact_finder_workers` tasks) -> ExactDedupFilter (each task drops its duplicates).
With `exact_normalize` the compared content is the lowercased text with whitespace runs
collapsed, else the raw text.

MinHash: MinhashDedupSignature -> MinhashDedupBuckets (num_buckets x workers_per_bucket tasks)
-> MinhashDedupCluster (one task: union-find over the duplicate pairs of all tasks, so
duplicates are found across tasks) -> MinhashDedupFilter. `ClusterKeepers`, run just before the
filter, tags each cluster member with its cluster id and writes which document of each cluster
stays, so the report can name the kept copy of every removed near duplicate.
"""

from __future__ import annotations

import json
import re

import numpy as np
from datatrove.io import get_datafolder
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.dedup import (ExactDedupConfig, ExactDedupFilter, ExactDedupSignature, ExactFindDedups,
                                      MinhashConfig, MinhashDedupBuckets, MinhashDedupCluster,
                                      MinhashDedupFilter, MinhashDedupSignature)
from datatrove.utils.hashing import HashConfig

from jaxllm.curate.config import CurateConfig

CLUSTER_KEY = "minhash_cluster_id"
_SPACE = re.compile(r"\s+")


def normalized_text(doc) -> str:
    """What exact dedup compares with exact_normalize: lowercase, whitespace runs collapsed."""
    return _SPACE.sub(" ", doc.text.lower()).strip()


def raw_text(doc) -> str:
    return doc.text


def exact_steps(cfg: CurateConfig, work: str, removal_log) -> tuple[PipelineStep, PipelineStep, PipelineStep]:
    """(signature step, find step, filter step) of exact dedup."""
    config = ExactDedupConfig(content_getter=normalized_text if cfg.exact_normalize else raw_text,
                              hash_config=HashConfig())
    return (ExactDedupSignature(f"{work}/exact/sigs", config, finder_workers=cfg.exact_finder_workers),
            ExactFindDedups(f"{work}/exact/sigs", f"{work}/exact/dups", config),
            ExactDedupFilter(f"{work}/exact/dups", config, exclusion_writer=removal_log))


def minhash_config(cfg: CurateConfig) -> MinhashConfig:
    return MinhashConfig(n_grams=cfg.minhash_n_grams, num_buckets=cfg.minhash_num_buckets,
                         hashes_per_bucket=cfg.minhash_hashes_per_bucket, seed=cfg.minhash_seed,
                         hash_config=HashConfig(precision=cfg.minhash_precision))


def minhash_steps(cfg: CurateConfig, work: str, removal_log) -> dict[str, PipelineStep]:
    config = minhash_config(cfg)
    return {"signature": MinhashDedupSignature(f"{work}/minhash/sigs", config, language=cfg.language),
            "buckets": MinhashDedupBuckets(f"{work}/minhash/sigs", f"{work}/minhash/buckets", config=config),
            "cluster": MinhashDedupCluster(f"{work}/minhash/buckets", f"{work}/minhash/clusters", config=config,
                                           save_cluster_id=True),
            "keepers": ClusterKeepers(f"{work}/minhash/clusters", f"{work}/minhash/keepers"),
            "filter": MinhashDedupFilter(f"{work}/minhash/clusters", exclusion_writer=removal_log)}


class ClusterKeepers(PipelineStep):
    """Passes documents on; tags near-duplicate cluster members with their cluster id and writes
    {cluster id: id of the member that stays} for this task to `<keepers>/<rank>.json`."""

    type = "🫂 - DEDUP"
    name = "cluster keepers"

    def __init__(self, clusters_folder: str, keepers_folder: str):
        super().__init__()
        self.clusters = get_datafolder(clusters_folder)
        self.keepers = get_datafolder(keepers_folder)

    def _read(self, name: str, dtype) -> np.ndarray:
        if not self.clusters.isfile(name):
            return np.zeros(0, dtype)
        with self.clusters.open(name, "rb") as f:
            return np.frombuffer(f.read(), dtype)

    def run(self, data, rank: int = 0, world_size: int = 1):
        pairs = self._read(f"{rank:06d}.clusters", np.dtype([("doc", "<u4"), ("cluster", "<u4")]))
        cluster_of = dict(zip(pairs["doc"].tolist(), pairs["cluster"].tolist()))
        removed = set(self._read(f"{rank:06d}.remove", np.dtype("<u4")).tolist())
        keepers = {}
        for idx, doc in enumerate(data):
            cluster = cluster_of.get(idx)
            if cluster is not None:
                doc.metadata[CLUSTER_KEY] = cluster
                if idx not in removed:
                    keepers[cluster] = doc.id
            yield doc
        with self.keepers.open(f"{rank:05d}.json", "w") as f:
            json.dump(keepers, f)
