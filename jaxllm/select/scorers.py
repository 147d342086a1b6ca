"""Text scorers from trained rating runs (`task: rater` / `task: edu`), and selection by score.

A scorer has the small interface the curation pipeline's model step needs:

    scorer = ModelScorer(run_dir)            # params sharded over this process's devices
    scorer.score_key                         # "qurater" / "qurater_<criterion>" / "edu_score"
    scorer.score_batch(texts) -> float64 [N] # one score per text, in batches of `batch_size`

Texts become rows exactly as in training (`records.TextRows` with the run's tokenizer,
data.seq_len, add_bos, add_eos); the score is the reward head at the last real token.
`rating_model_info(path)` says whether a path is such a run (and its score key) without loading
params, so a pipeline can check its flags before starting work.

Selection: FineWeb-Edu keeps `int_scores(s) >= 3` (= s >= 2.5); QuRating samples k documents
without replacement with probability proportional to exp(s / tau) (`sample_by_rating`, exactly,
by the Gumbel-top-k trick).
"""

from __future__ import annotations

import functools
import json
import math
import os

import jax
import numpy as np

from jaxllm.config import load_config
from jaxllm.data.tokenizer import run_tokenizer
from jaxllm.objectives.reward import reward_scores
from jaxllm.parallel.mesh import batch_sharding, make_mesh, tree_shardings
from jaxllm.run import load_run
from jaxllm.select.records import SelectError, TextRows
from jaxllm.tasks import make_task
from jaxllm.tasks.rating import RatingTask

META_FILE = "select.json"  # written beside a rating run by `python -m jaxllm.select train-rater/-edu`


def rating_model_info(path: str) -> dict | None:
    """{"kind": "rater" | "edu", "score_key", "criterion"} of a rating run directory, None for
    anything else (a file, another task's run)."""
    cfg_path = os.path.join(os.path.expanduser(path), "config.yaml")
    if not os.path.isfile(cfg_path):
        return None
    cfg = load_config(cfg_path)
    task = make_task(cfg)
    if not isinstance(task, RatingTask):
        return None
    meta = {}
    if os.path.isfile(os.path.join(path, META_FILE)):
        with open(os.path.join(path, META_FILE)) as f:
            meta = json.load(f)
    criterion = meta.get("criterion")
    key = "edu_score" if task.name == "edu" else "qurater" + (f"_{criterion}" if criterion else "")
    return {"kind": task.name, "score_key": key, "criterion": criterion}


class ModelScorer:
    """Scores texts with a rating run's newest checkpoint (see the module doc)."""

    def __init__(self, run_dir: str, *, batch_size: int = 64, step: int | None = None, devices=None):
        info = rating_model_info(run_dir)
        if info is None:
            raise SelectError(f"{run_dir}: not a rating model (a run of task rater or edu)")
        self.kind, self.score_key, self.criterion = info["kind"], info["score_key"], info["criterion"]
        cfg, params = load_run(run_dir, step)
        d = cfg.data
        self.rows = TextRows(run_tokenizer(cfg, run_dir), d.seq_len, d.add_bos, d.add_eos)
        self.mesh = make_mesh(devices=devices or jax.local_devices())
        shapes = jax.tree.map(lambda a: a.shape, params)
        self.params = jax.device_put(params, tree_shardings(self.mesh, make_task(cfg).model_param_axes(), shapes))
        n = self.mesh.shape["data"]
        self.batch_size = -(-batch_size // n) * n  # whole rows per device
        self._scores = jax.jit(functools.partial(reward_scores, cfg.model))

    def score_batch(self, texts) -> np.ndarray:
        """float64 [len(texts)]: one score per text."""
        out = []
        for a in range(0, len(texts), self.batch_size):
            chunk = self.rows.stack(texts[a:a + self.batch_size])
            real = len(chunk["tokens"])
            fill = self.batch_size - real  # the last batch repeats its first row: one shape, one compile
            arrays = [np.concatenate([v, np.repeat(v[:1], fill, 0)]) for v in chunk.values()]
            arrays = [jax.device_put(v, batch_sharding(self.mesh, 2)) for v in arrays]
            out.append(np.asarray(self._scores(self.params, *arrays), np.float64)[:real])
        return np.concatenate(out) if out else np.zeros(0)

    __call__ = score_batch


def int_scores(scores) -> np.ndarray:
    """FineWeb-Edu's integer score of a regression output: clip(round(s), 0, 5)."""
    return np.clip(np.round(np.asarray(scores, np.float64)), 0, 5).astype(np.int64)


def sample_by_rating(scores, k: int, tau: float, seed: int = 0) -> np.ndarray:
    """Indices of k documents drawn without replacement, each draw picking a remaining document
    with probability proportional to exp(score / tau): the k largest of score / tau + Gumbel
    noise (Gumbel-top-k, Kool et al. 2019), in order of drawing."""
    s = np.asarray(scores, np.float64)
    if not (tau > 0 and math.isfinite(tau)):
        raise SelectError(f"--tau must be a positive number, got {tau}")
    if not 0 <= k <= len(s):
        raise SelectError(f"cannot sample {k} of {len(s)} documents")
    keys = s / tau + np.random.default_rng(seed).gumbel(size=len(s))
    return np.argsort(-keys, kind="stable")[:k]
