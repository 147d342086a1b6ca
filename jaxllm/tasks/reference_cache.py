"""Cached reference log-probabilities for DPO-family training (open-instruct's `dpo_tune_cache`).

Before step 1 the reference model (the run's initial model params) scores every example of the
train and eval splits once; the per-example sums (`ref_chosen_logps`, ... as the objective's
`reference_fields` names them) go to `run_dir/reference_logps/{split}.npz`, indexed by the
example's position in its split, and the data pipeline joins them into batches by `index`.
Training then keeps only the policy in memory. The file records what it was computed from; a
resumed run reuses it, and a run whose data, tokenizer or initial model changed recomputes it.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np

from jaxllm.data import posttrain

SPLITS = ("train", "eval")


def fingerprint(cfg, split: str, size: int, data_format: str) -> dict:
    """What the cached numbers depend on; a mismatch means recompute."""
    p, d = cfg.preference, cfg.data
    return {"split": split, "size": size, "files": list(d.train if split == "train" else d.eval),
            "tokenizer": d.tokenizer, "seq_len": d.seq_len, "template": cfg.sft.template,
            "fields": [p.prompt_field, p.chosen_field, p.rejected_field], "max_prompt_len": p.max_prompt_len,
            "kto": data_format == "kto", "init_from": cfg.model.init_from, "seed": cfg.trainer.seed,
            "model": repr(cfg.model)}


def _read(path: str, want: dict) -> dict[str, np.ndarray] | None:
    if not os.path.exists(path):
        return None
    with np.load(path) as z:
        if json.loads(str(z["__meta__"])) != want:
            return None
        return {k: z[k] for k in z.files if k != "__meta__"}


def _write_atomic(path: str, arrays: dict[str, np.ndarray], meta: dict) -> None:
    tmp = f"{path}.tmp-{os.getpid()}.npz"
    np.savez(tmp, __meta__=np.asarray(json.dumps(meta)), **arrays)
    os.replace(tmp, path)


def _host(x) -> np.ndarray:
    """A global array as a full host array on every process."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def compute(cfg, objective, data_format: str, ctx, split: str) -> dict[str, np.ndarray]:
    """Reference fields of every example of `split`, as arrays indexed by example."""
    n = posttrain.split_size(cfg, data_format, split)
    score = jax.jit(objective.reference_fields)
    params = ctx.initial_params()
    out: dict[str, np.ndarray] = {}
    passes = posttrain.split_pass(cfg, ctx.tokenizer, data_format, split)
    for local in passes:
        batch = ctx.to_global(local)
        fields = score(params, batch)
        index = _host(batch["index"])
        real = index >= 0
        for name, value in fields.items():
            arr = out.setdefault(name, np.full(n, np.nan, np.float32))
            arr[index[real]] = _host(value)[real]
    # Examples the data pipeline skips (too long, malformed) are never trained on and stay
    # unscored; any other gap is a bug.
    skipped = _host_sum(sum(passes.skipped.values()))
    missing = int(np.isnan(next(iter(out.values()))).sum()) if out else n
    if not out or missing != skipped:
        raise RuntimeError(f"reference pass over {split}: {missing} of {n} examples unscored but "
                           f"{skipped} skipped by the data pipeline")
    return {k: np.nan_to_num(v, nan=0.0) for k, v in out.items()}


def _host_sum(x: int) -> int:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return int(np.sum(multihost_utils.process_allgather(np.asarray(x))))
    return x


def load_or_compute(cfg, objective, data_format: str, ctx) -> dict[str, dict[str, np.ndarray]]:
    """{"train": fields, "eval": fields}, read from the run's cache or computed and cached."""
    folder = os.path.join(ctx.run_dir, "reference_logps")
    os.makedirs(folder, exist_ok=True)
    result = {}
    for split in SPLITS:
        path = os.path.join(folder, f"{split}.npz")
        meta = fingerprint(cfg, split, posttrain.split_size(cfg, data_format, split), data_format)
        cached = _read(path, meta)
        if cached is None:
            ctx.log(f"reference log-probs: scoring the {split} split ({meta['size']} examples) once")
            cached = compute(cfg, objective, data_format, ctx, split)
            if jax.process_index() == 0:
                _write_atomic(path, cached, meta)
        result[split] = cached
    return result
