"""Model-based quality filter: a hashed uni+bigram logistic-regression classifier.

Features: lowercased words (`text.words`) and word bigrams, hashed into 2**18 buckets
("hashing trick"), value log(1 + count), each document's vector scaled to unit L2 norm.
Training: full-batch gradient descent with heavy-ball momentum on the mean logistic loss plus
L2; with unit-norm rows the loss is 0.25-smooth, so a fixed step is stable. Weights that no
training document touches stay exactly zero, so a model file stores only the touched buckets.

In a curation run the model is a scorer step (jaxllm.curate.scoring.HashedBigramScorer) and the
selection by threshold or temperature sampling is done by jaxllm.curate.scoring's steps.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np

from jaxllm.curate.text import ngram_hashes, word_hashes, words
from jaxllm.errors import UserError

BUCKETS = 1 << 18


def features(text: str, buckets: int = BUCKETS) -> tuple[np.ndarray, np.ndarray]:
    """(bucket indices, values) of one document's sparse, unit-norm feature vector."""
    h = word_hashes(words(text))
    grams = np.concatenate([ngram_hashes(h, 1), ngram_hashes(h, 2)])
    idx, counts = np.unique(grams % np.uint64(buckets), return_counts=True)
    values = np.log1p(counts).astype(np.float32)
    if len(values):
        values /= np.linalg.norm(values)
    return idx.astype(np.int64), values


@dataclasses.dataclass
class QualityModel:
    weights: np.ndarray  # float32, one per bucket
    bias: float

    @property
    def buckets(self) -> int:
        return len(self.weights)

    def logit(self, text: str) -> float:
        idx, values = features(text, self.buckets)
        return float(values @ self.weights[idx] + self.bias)

    def prob(self, text: str) -> float:
        return float(1 / (1 + np.exp(-self.logit(text))))

    def save(self, path: str) -> None:
        nz = np.flatnonzero(self.weights)
        if path.endswith(".npz"):
            np.savez_compressed(path, indices=nz, values=self.weights[nz], bias=self.bias, buckets=self.buckets)
            return
        with open(path, "w") as f:
            json.dump({"format": "jaxllm-quality-v1", "features": "hashed word 1+2-grams, log1p, l2-norm",
                       "buckets": self.buckets, "bias": self.bias, "indices": nz.tolist(),
                       "values": self.weights[nz].tolist()}, f)

    @classmethod
    def load(cls, path: str) -> "QualityModel":
        if path.endswith(".npz"):
            with np.load(path) as z:
                data = {k: z[k] for k in ("indices", "values", "bias", "buckets")}
        else:
            with open(path) as f:
                data = json.load(f)
            if data.get("format") != "jaxllm-quality-v1":
                raise UserError(f"{path}: not a jaxllm quality model (format {data.get('format')!r})")
        weights = np.zeros(int(data["buckets"]), np.float32)
        weights[np.asarray(data["indices"], np.int64)] = np.asarray(data["values"], np.float32)
        return cls(weights, float(data["bias"]))


def train(texts, labels, *, buckets: int = BUCKETS, epochs: int = 300, lr: float = 2.0, momentum: float = 0.9,
          l2: float = 1e-4) -> QualityModel:
    """Logistic regression on hashed features; `labels` are 0/1."""
    y = np.asarray(labels, np.float64)
    feats = [features(t, buckets) for t in texts]
    lengths = np.array([len(i) for i, _ in feats])
    cols = np.concatenate([i for i, _ in feats] + [np.zeros(0, np.int64)])
    vals = np.concatenate([v for _, v in feats] + [np.zeros(0, np.float32)]).astype(np.float64)
    rows = np.repeat(np.arange(len(y)), lengths)
    n = len(y)
    w, b = np.zeros(buckets), 0.0
    vw, vb = np.zeros(buckets), 0.0
    for _ in range(epochs):
        z = np.bincount(rows, weights=vals * w[cols], minlength=n) + b
        g = 1 / (1 + np.exp(-z)) - y                       # d(loss)/dz per document
        gw = np.bincount(cols, weights=vals * g[rows], minlength=buckets) / n + l2 * w
        gb = g.mean()
        vw, vb = momentum * vw - lr * gw, momentum * vb - lr * gb
        w, b = w + vw, b + vb
    # l2 * w decays touched weights only; untouched buckets have zero gradient and stay 0.
    return QualityModel(w.astype(np.float32), float(b))
