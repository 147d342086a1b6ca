"""LESS (Xia et al. 2024): select the training examples most influential on a target task.

    python -m jaxllm.select less --train POOL.jsonl --target VAL.jsonl --checkpoints RUN_DIR \\
        [--fraction 0.05] [--dims 8192] [--seed 0] [--features DIR] --out selected.jsonl

RUN_DIR is a LoRA SFT warm-up run (`task: sft`, `lora.rank > 0`) on a small random share of the
pool, keeping every checkpoint i it wants scored (LESS: one per epoch). For each checkpoint,
with its trainable params and Adam state restored as in training (`grads`):

  Gamma(x; theta_i)   projected Adam direction of each pool example (kind adam)
  grad l(z; theta_i)  projected gradient of each target example (kind sgd)
  eta_i               the mean learning rate of the steps since the previous checkpoint

  Inf(x, z) = sum_i eta_i cos(grad l(z; theta_i), Gamma(x; theta_i))

A pool example's score is the mean of Inf(x, z) over the target examples z, or with
--subtask-field the largest such mean over the target's subtasks (LESS's max over subtasks);
the top --fraction (at least one) are written out, highest first, each record unchanged (its id
and every field). Features are [N, dims] float32 .npy files under --features (default
RUN_DIR/less_features), named by what they depend on (file size and mtime, checkpoint, dims,
seed, data settings), so a later target reuses the pool's. A pool record whose conversation the
template cannot use (too long with truncation drop, no assistant token) gets no score. The report
(--report, default OUT.report.json) has the counts, the checkpoints and their learning rates, the
score of the last kept example and the feature files.
"""

from __future__ import annotations

import hashlib
import json
import os
import time

import jax
import numpy as np

from jaxllm.checkpoint import Checkpointer
from jaxllm.data import chat
from jaxllm.data.rows import stack_rows
from jaxllm.data.sft_packing import RowBuilder
from jaxllm.parallel.mesh import mesh_from_config
from jaxllm.run import initial_model_params
from jaxllm.select.grads import FeatureFunction
from jaxllm.select.records import SelectError, read_jsonl
from jaxllm.train import Trainer


class ExampleRows:
    """The one-row-per-record SFT rows of a jsonl file, as the warm-up run builds them."""

    def __init__(self, cfg, tokenizer, path: str, what: str):
        self.path, self.records = path, read_jsonl(path, what)
        d, s = cfg.data, cfg.sft
        template = chat.load_template(s.template, tokenizer)
        encoder = chat.ChatEncoder(tokenizer)
        builder = RowBuilder(d.seq_len, tokenizer.pad_id)
        rows, self.usable, self.skipped = [], [], {}
        for i, (_, record) in enumerate(self.records):
            try:
                ids, mask, _ = chat.sft_segments(record.get(s.messages_field), tokenizer, template,
                                                 max_len=d.seq_len + 1, truncation=s.truncation,
                                                 add_bos=d.add_bos, encoder=encoder)[0]
            except chat.ConversationError as e:
                self.skipped[e.reason] = self.skipped.get(e.reason, 0) + 1
                continue
            builder.add(ids, mask)
            rows.append(builder.flush())
            self.usable.append(i)
        self.rows = rows
        self.usable = np.asarray(self.usable, np.int64)

    def batches(self, batch_size: int):
        """(start, per-process batch) of the usable rows, the last completed by repeating row 0."""
        n, p, count = len(self.rows), jax.process_index(), jax.process_count()
        per = batch_size // count
        for start in range(0, n, batch_size):
            idx = [start + p * per + j for j in range(per)]
            yield start, stack_rows([self.rows[i] if i < n else self.rows[0] for i in idx])


def checkpoint_lrs(trainer, steps: list[int]) -> list[float]:
    """eta_i: the mean learning rate of the optimizer updates since the previous checkpoint."""
    per = trainer.updates_per_step
    out, prev = [], 0
    for step in steps:
        lrs = jax.vmap(trainer.schedule)(np.arange(prev * per, step * per))
        out.append(float(np.mean(np.asarray(lrs, np.float64))))
        prev = step
    return out


def _fingerprint(path: str, **settings) -> str:
    st = os.stat(path)
    blob = json.dumps({"file": os.path.abspath(path), "size": st.st_size, "mtime": st.st_mtime_ns, **settings},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class FeatureStore:
    """Features [N records, dims] per (file, kind, checkpoint), computed once and kept on disk."""

    def __init__(self, folder: str, trainer, dims: int, seed: int, batch_size: int, run_dir: str, log):
        self.folder, self.trainer, self.dims, self.seed = folder, trainer, dims, seed
        self.batch_size, self.run_dir, self.log = batch_size, os.path.abspath(run_dir), log
        self.fns = {kind: FeatureFunction(trainer, kind, dims, seed) for kind in ("sgd", "adam")}
        self.files: list[dict] = []

    def get(self, rows: ExampleRows, kind: str, step: int, load_state) -> np.ndarray:
        cfg = self.trainer.cfg
        key = _fingerprint(rows.path, kind=kind, run=self.run_dir, step=step, dims=self.dims, seed=self.seed,
                           data=[cfg.data.seq_len, cfg.data.add_bos, cfg.sft.template, cfg.sft.messages_field,
                                 cfg.sft.truncation, cfg.sft.reduce_loss], model=repr(cfg.model), lora=repr(cfg.lora))
        path = os.path.join(self.folder, f"{kind}-step{step}-{key}.npy")
        reused = os.path.isfile(path)
        if reused:
            out = np.load(path)
        else:
            state, frozen = load_state(step)
            t0 = time.perf_counter()
            out = np.full((len(rows.records), self.dims), np.nan, np.float32)
            for start, local in rows.batches(self.batch_size):
                feats = self.fns[kind](state, frozen, self.trainer.to_global(local))
                if jax.process_count() > 1:  # every process's rows, in global order
                    from jax.experimental import multihost_utils

                    feats = multihost_utils.process_allgather(feats, tiled=True)
                feats = np.asarray(jax.device_get(feats))
                take = rows.usable[start:start + self.batch_size]
                out[take] = feats[:len(take)]
            self.log(f"less: {kind} features of {len(rows.usable)} examples of {rows.path} at step {step}: "
                     f"{len(rows.usable) / (time.perf_counter() - t0):.1f} examples/s")
            if jax.process_index() == 0:
                os.makedirs(self.folder, exist_ok=True)
                np.save(path + ".tmp.npy", out)
                os.replace(path + ".tmp.npy", path)
        self.files.append({"path": path, "kind": kind, "step": step, "reused": reused})
        return out


def _unit(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-30)


def influence(train_feats: list[np.ndarray], target_feats: list[np.ndarray], lrs: list[float],
              groups: np.ndarray | None = None) -> np.ndarray:
    """Per pool example: max over target groups of the mean over the group of
    sum_i eta_i cos(target_i, train_i) (one group when `groups` is None); NaN rows stay NaN."""
    scores = sum(lr * _unit(a) @ _unit(b).T for a, b, lr in zip(train_feats, target_feats, lrs))
    groups = np.zeros(scores.shape[1], np.int64) if groups is None else groups
    return np.max(np.stack([scores[:, groups == g].mean(axis=1) for g in np.unique(groups)], axis=1), axis=1)


def _groups(rows: ExampleRows, field: str | None) -> np.ndarray | None:
    if not field:
        return None
    values = []
    for i in rows.usable:
        where, record = rows.records[i]
        if field not in record:
            raise SelectError(f"{where}: --subtask-field {field!r} is missing")
        values.append(json.dumps(record[field], sort_keys=True))
    return np.unique(values, return_inverse=True)[1]


def less_scores(cfg, run_dir: str, train_path: str, target_path: str, *, dims: int = 8192, seed: int = 0,
                batch_size: int = 16, features_dir: str | None = None, subtask_field: str | None = None,
                log=print) -> tuple[np.ndarray, dict]:
    """(score per pool record, NaN where unusable; report) of the LESS influence (module doc)."""
    from jaxllm.data.tokenizer import run_tokenizer

    if not cfg.lora.enabled:
        raise SelectError(f"--checkpoints {run_dir}: LESS scores with the LoRA gradients of a LoRA warm-up run; "
                          "this run has lora.rank 0")
    tokenizer = run_tokenizer(cfg, run_dir)
    target, pool = (ExampleRows(cfg, tokenizer, path, what) for path, what in ((target_path, "--target"),
                                                                              (train_path, "--train")))
    for rows, what in ((pool, "--train"), (target, "--target")):
        if not len(rows.usable):
            raise SelectError(f"{what} {rows.path}: no example the run's template can use (skipped: {rows.skipped})")
    groups = _groups(target, subtask_field)
    ckpt = Checkpointer(run_dir, async_save=False)
    steps = sorted(ckpt.all_steps())
    if not steps:
        raise SelectError(f"--checkpoints {run_dir}: the run has no complete checkpoint")
    trainer = Trainer(cfg, mesh_from_config(cfg.mesh))
    shards = trainer.mesh.shape["data"] * trainer.mesh.shape["fsdp"]
    batch_size = -(-batch_size // shards) * shards
    lrs = checkpoint_lrs(trainer, steps)
    frozen = trainer.make_frozen(trainer.layout.place(initial_model_params(cfg)))
    loaded: dict = {}

    def load_state(step):
        if step not in loaded:
            loaded.clear()
            loaded[step] = ckpt.restore(step, trainer.abstract_state)[0]
        return loaded[step], frozen

    store = FeatureStore(features_dir or os.path.join(run_dir, "less_features"), trainer, dims, seed, batch_size,
                         run_dir, log)
    train_feats = [store.get(pool, "adam", s, load_state) for s in steps]
    target_feats = [store.get(target, "sgd", s, load_state)[target.usable] for s in steps]
    ckpt.close()
    scores = influence(train_feats, target_feats, lrs, groups)
    report = {"pool": len(pool.records), "pool_scored": int(np.isfinite(scores).sum()), "pool_skipped": pool.skipped,
              "target": len(target.records), "target_used": len(target.usable), "target_skipped": target.skipped,
              "subtasks": 1 if groups is None else int(groups.max()) + 1,
              "checkpoints": [{"step": s, "lr": lr} for s, lr in zip(steps, lrs)], "dims": dims, "seed": seed,
              "features": store.files}
    return scores, report


def select_top(scores: np.ndarray, fraction: float) -> np.ndarray:
    """Indices of the top `fraction` (at least one) of the scored records, highest first (ties:
    the earlier record)."""
    if not 0 < fraction <= 1:
        raise SelectError(f"--fraction must be in (0, 1], got {fraction}")
    valid = np.flatnonzero(np.isfinite(scores))
    order = valid[np.argsort(-scores[valid], kind="stable")]
    return order[:max(1, round(fraction * len(valid)))]


def main(argv) -> int:
    import argparse

    from jaxllm.errors import run_cli
    from jaxllm.train import configure

    p = argparse.ArgumentParser(prog="python -m jaxllm.select less", description=__doc__.splitlines()[0])
    p.add_argument("--train", required=True, help="the pool: jsonl SFT records (messages) to select from")
    p.add_argument("--target", required=True, help="jsonl SFT records of the target task")
    p.add_argument("--checkpoints", required=True, help="the LoRA warm-up run directory")
    p.add_argument("--config", help="config to use instead of the run's (same model and LoRA; e.g. another mesh)")
    p.add_argument("--fraction", type=float, default=0.05)
    p.add_argument("--dims", type=int, default=8192, help="projected feature dimensions (a multiple of 32)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random projection")
    p.add_argument("--batch-size", type=int, default=16, help="examples per feature batch")
    p.add_argument("--features", help="folder of the stored features (default RUN_DIR/less_features)")
    p.add_argument("--subtask-field", help="target field naming its subtasks (score: max over subtasks)")
    p.add_argument("--out", required=True, help="jsonl of the selected records, highest score first")
    p.add_argument("--report", help="JSON report (default OUT.report.json)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides of the config")
    args = p.parse_args(argv)

    def body():
        if args.dims <= 0 or args.dims % 32 or args.batch_size <= 0:
            raise SelectError("--dims must be a positive multiple of 32 and --batch-size > 0")
        select_top(np.zeros(1), args.fraction)  # checks --fraction before any work
        run_cfg = os.path.join(args.checkpoints, "config.yaml")
        if not os.path.isfile(run_cfg):
            raise SelectError(f"--checkpoints {args.checkpoints}: no config.yaml, not a jaxllm run directory")
        cfg = configure(args.config or run_cfg, args.overrides)
        if cfg is None:
            return 2
        if args.config:
            run = configure(run_cfg, [])
            if (cfg.model, cfg.lora) != (run.model, run.lora):
                raise SelectError(f"--config {args.config}: its model or lora settings differ from the run's")
        t0 = time.perf_counter()
        scores, report = less_scores(cfg, args.checkpoints, args.train, args.target, dims=args.dims, seed=args.seed,
                                     batch_size=args.batch_size, features_dir=args.features,
                                     subtask_field=args.subtask_field,
                                     log=print if jax.process_index() == 0 else lambda _: None)
        top = select_top(scores, args.fraction)
        if jax.process_index() == 0:
            records = read_jsonl(args.train, "--train")
            with open(args.out, "w", encoding="utf-8") as f:
                f.writelines(json.dumps(records[i][1], ensure_ascii=False) + "\n" for i in top)
            report |= {"fraction": args.fraction, "selected": len(top), "min_selected_score": float(scores[top[-1]]),
                       "max_score": float(scores[top[0]]), "seconds": time.perf_counter() - t0, "out": args.out}
            with open(args.report or args.out + ".report.json", "w") as f:
                json.dump(report, f, indent=1)
            print(f"less: {len(top)} of {report['pool_scored']} scored examples -> {args.out}")
        return 0

    return run_cli(body)
