"""Model-based selection as datatrove steps: a scorer annotates, selection steps decide.

A scorer is a `DocumentScorer`: a pipeline step that writes `metadata[score_key]` for every
document, computed a batch at a time (`score_batch(texts)`), so a model on an accelerator batches
the same way. `HashedBigramScorer` is jaxllm's hashed-bigram logistic regression
(jaxllm.curate.quality). A later scorer (QuRater's ratings, an educational-value classifier)
subclasses DocumentScorer with its own `score_key` and `score_batch` and reuses the selection steps
unchanged:

* `ScoreThreshold`: keep documents whose score reaches `min_score`;
* temperature sampling across all tasks (QuRating, Wettig et al. 2024: sample k documents without
  replacement with P ∝ exp(score / tau)), exactly, by the Gumbel-top-k trick (Kool et al. 2019):
  every document gets the key score / tau + Gumbel noise, and the k largest keys win.
  `SampleKeys` writes each task's keys, `SampleCutoff` (one task) finds the k-th largest of all,
  `SampleFilter` keeps documents whose key reaches it. A document's noise is a function of
  (seed, id), so the sample does not depend on how documents are split over tasks.
"""

from __future__ import annotations

import hashlib
import json
import math
from abc import abstractmethod

import numpy as np
from datatrove.io import get_datafolder
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.utils.batching import batched

from jaxllm.curate.quality import QualityModel

QUALITY_KEY = "quality_logit"


class DocumentScorer(PipelineStep):
    """Base of scorer steps: subclasses set `score_key` and implement `score_batch`."""

    type = "🎯 - SCORER"
    score_key = "score"

    def __init__(self, batch_size: int = 256):
        super().__init__()
        self.batch_size = batch_size

    @abstractmethod
    def score_batch(self, texts: list[str]) -> list[float]:
        """One score per text."""

    def run(self, data, rank: int = 0, world_size: int = 1):
        for batch in batched(data, self.batch_size):
            with self.track_time("batch"):
                scores = self.score_batch([doc.text for doc in batch])
            for doc, score in zip(batch, scores):
                doc.metadata[self.score_key] = float(score)
                self.stat_update("scored")
                yield doc


class HashedBigramScorer(DocumentScorer):
    """The logit of `jaxllm.curate.quality.QualityModel` (train it with `train-quality`)."""

    name = "hashed-bigram quality"
    score_key = QUALITY_KEY

    def __init__(self, model_path: str, batch_size: int = 256):
        super().__init__(batch_size)
        self.model_path = model_path
        self._model = None

    def score_batch(self, texts: list[str]) -> list[float]:
        if self._model is None:
            self._model = QualityModel.load(self.model_path)
        return [self._model.logit(t) for t in texts]


class RatingModelScorer(DocumentScorer):
    """The score of a jaxllm rating run (`python -m jaxllm.select train-rater` / `train-edu`: a
    QuRater rating or an educational-value score), under the key that run's kind names."""

    name = "jaxllm rating model"

    def __init__(self, run_dir: str, score_key: str, batch_size: int = 64):
        super().__init__(batch_size)
        self.run_dir, self.score_key, self._scorer = run_dir, score_key, None

    def score_batch(self, texts: list[str]) -> list[float]:
        if self._scorer is None:  # built inside the worker, so JAX starts there
            from jaxllm.select.scorers import ModelScorer

            self._scorer = ModelScorer(self.run_dir, batch_size=self.batch_size)
        return self._scorer.score_batch(texts).tolist()


def logit_of(prob: float) -> float:
    """The logit threshold equivalent to P(high quality) >= prob."""
    if prob <= 0:
        return -math.inf
    if prob >= 1:
        return math.inf
    return math.log(prob / (1 - prob))


class ScoreThreshold(BaseFilter):
    name = "score threshold"

    def __init__(self, min_score: float, score_key: str = QUALITY_KEY, exclusion_writer=None):
        super().__init__(exclusion_writer)
        self.min_score, self.score_key = min_score, score_key

    def filter(self, doc):
        return True if doc.metadata[self.score_key] >= self.min_score else (False, "below_threshold")


def gumbel(seed: int, doc_id: str) -> float:
    """Standard Gumbel noise, a pure function of (seed, document id)."""
    digest = hashlib.blake2b(f"{seed}\0{doc_id}".encode(), digest_size=8).digest()
    u = ((int.from_bytes(digest, "little") >> 11) + 0.5) / 2.0 ** 53  # in (0, 1), never 0 or 1
    return -math.log(-math.log(u))


def sample_key(score: float, tau: float, seed: int, doc_id: str) -> float:
    return score / tau + gumbel(seed, doc_id)


class SampleKeys(PipelineStep):
    """Passes documents on and writes this task's sampling keys to `<folder>/<rank>.npy`."""

    type = "🎯 - SCORER"
    name = "sampling keys"

    def __init__(self, folder: str, tau: float, seed: int, score_key: str = QUALITY_KEY):
        super().__init__()
        self.folder, self.tau, self.seed, self.score_key = get_datafolder(folder), tau, seed, score_key

    def run(self, data, rank: int = 0, world_size: int = 1):
        keys = []
        for doc in data:
            keys.append(sample_key(doc.metadata[self.score_key], self.tau, self.seed, doc.id))
            yield doc
        with self.folder.open(f"{rank:05d}.npy", "wb") as f:
            np.save(f, np.asarray(keys, np.float64))


class SampleCutoff(PipelineStep):
    """One task: the smallest key among the round(keep_fraction * n) largest of all tasks."""

    type = "🎯 - SCORER"
    name = "sampling cutoff"

    def __init__(self, folder: str, keep_fraction: float):
        super().__init__()
        self.folder, self.keep_fraction = get_datafolder(folder), keep_fraction

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        if world_size != 1:
            raise ValueError(f"SampleCutoff runs as one task, got {world_size}")
        parts = [np.zeros(0)]
        for name in self.folder.list_files(glob_pattern="*.npy"):
            with self.folder.open(name, "rb") as f:
                parts.append(np.load(f))
        keys = np.concatenate(parts)
        n, k = len(keys), int(round(self.keep_fraction * len(keys)))
        cutoff = None if k == 0 else float(np.partition(keys, n - k)[n - k])
        with self.folder.open("cutoff.json", "w") as f:
            json.dump({"documents": n, "keep": k, "cutoff": cutoff}, f)


class SampleFilter(BaseFilter):
    """Keeps the documents whose sampling key reaches the cutoff SampleCutoff found."""

    name = "temperature sample"

    def __init__(self, folder: str, tau: float, seed: int, score_key: str = QUALITY_KEY, exclusion_writer=None):
        super().__init__(exclusion_writer)
        self.folder, self.tau, self.seed, self.score_key = get_datafolder(folder), tau, seed, score_key
        self._cutoff = None

    def filter(self, doc):
        if self._cutoff is None:
            with self.folder.open("cutoff.json") as f:
                cutoff = json.load(f)["cutoff"]
            self._cutoff = math.inf if cutoff is None else cutoff
        key = sample_key(doc.metadata[self.score_key], self.tau, self.seed, doc.id)
        return True if key >= self._cutoff else (False, "not_sampled")
