"""Checkpoint merging along a training trajectory (PMA: pre-trained model averaging).

    sma  equal weights 1/N
    ema  M_1 = theta_1, M_i = alpha theta_i + (1 - alpha) M_{i-1}; closed form: theta_1 weighs
         (1-alpha)^(N-1), theta_i (i >= 2) weighs alpha (1-alpha)^(N-i)
    wma  weights proportional to 1, 2, ..., N: later checkpoints count more

Checkpoints are folded one at a time into a running fp32 sum (`Merger`), so merging N checkpoints
holds about two models, never N. Each leaf is combined by a jitted elementwise op on the device(s)
it lives on: sharded params stay sharded, nothing is copied to the host, and the output keeps each
leaf's sharding and dtype.

    python -m jaxllm.merge --method wma --checkpoints RUN_DIR --last 4 [--interval K] --out DIR
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from typing import Iterable

import jax
import jax.numpy as jnp

from jaxllm.errors import UserError, run_cli

METHODS = ("sma", "ema", "wma")


class MergeError(UserError, ValueError):
    """A bad merge request (flags, run, checkpoints that do not match), said in one line."""


def merge_weights(method: str, n: int, alpha: float | None = None) -> list[float]:
    """The weight of each of `n` checkpoints (oldest first) in the merged params; sums to 1."""
    _check_method(method, alpha)
    if n < 1:
        raise MergeError(f"need at least one checkpoint to merge, got {n}")
    if method == "sma":
        return [1.0 / n] * n
    if method == "wma":
        return [i / (n * (n + 1) / 2) for i in range(1, n + 1)]
    return [(1 - alpha) ** (n - 1)] + [alpha * (1 - alpha) ** (n - i) for i in range(2, n + 1)]


def _check_method(method, alpha):
    if method not in METHODS:
        raise MergeError(f"unknown merge method {method!r}; valid: {list(METHODS)}")
    if method == "ema":
        if alpha is None or not 0.0 < alpha <= 1.0:
            raise MergeError(f"ema needs alpha in (0, 1], got {alpha}")
    elif alpha is not None:
        raise MergeError(f"alpha applies only to ema, not {method}")


# Jitted once per sharding (and per shape/dtype) and reused for every checkpoint; the weights are
# traced scalars so changing them does not recompile. Pinning out_shardings to the leaf's own
# sharding keeps the output exactly as the input was laid out. The accumulator is donated.
@functools.lru_cache(maxsize=None)
def _ops(sharding):
    axpby = jax.jit(lambda acc, x, a, b: a * acc + b * x.astype(jnp.float32),
                    out_shardings=sharding, donate_argnums=0)
    scale = jax.jit(lambda x, b: b * x.astype(jnp.float32), out_shardings=sharding)
    finish = jax.jit(lambda acc, b, dtype: (acc * b).astype(dtype), static_argnums=2,
                     out_shardings=sharding, donate_argnums=0)
    return axpby, scale, finish


class Merger:
    """Folds checkpoints in, oldest first; `result()` gives the merged params.

    sma and wma keep the unnormalised sum  sum_i w_i theta_i  and divide by sum_i w_i at the end;
    ema applies its recursion in order. Neither needs N in advance.
    """

    def __init__(self, method: str, alpha: float | None = None):
        _check_method(method, alpha)
        self.method, self.alpha, self.count = method, alpha, 0
        self._acc = self._treedef = self._paths = self._like = None

    def add(self, params) -> None:
        leaves_with_paths, treedef = jax.tree_util.tree_flatten_with_path(params)
        leaves = [x if isinstance(x, jax.Array) else jnp.asarray(x) for _, x in leaves_with_paths]
        paths = [jax.tree_util.keystr(p) for p, _ in leaves_with_paths]
        i = self.count + 1
        if self._acc is None:
            self._treedef, self._paths = treedef, paths
            self._like = [(x.shape, x.dtype, x.sharding) for x in leaves]
            w = 1.0 if self.method != "wma" else float(i)
            self._acc = [_ops(x.sharding)[1](x, jnp.float32(w)) for x in leaves]
        else:
            self._check_like(treedef, paths, leaves)
            if self.method == "ema":
                a, b = 1.0 - self.alpha, self.alpha
            else:
                a, b = 1.0, (1.0 if self.method == "sma" else float(i))
            new = []
            for acc, x, (_, _, sharding) in zip(self._acc, leaves, self._like):
                if x.sharding != sharding:  # e.g. restored onto other devices: move, don't fail
                    x = jax.device_put(x, sharding)
                new.append(_ops(sharding)[0](acc, x, jnp.float32(a), jnp.float32(b)))
            self._acc = new
        self.count = i

    def _check_like(self, treedef, paths, leaves):
        if treedef != self._treedef:
            have, first = set(paths), set(self._paths)
            missing = [p for p in self._paths if p not in have]
            extra = [p for p in paths if p not in first]
            where = (f"leaf {missing[0]} missing" if missing else f"unexpected leaf {extra[0]}" if extra
                     else f"containers differ (first leaf {self._paths[0] if self._paths else '<none>'})")
            raise MergeError(f"checkpoint {self.count + 1} does not match the first one's tree structure: {where}")
        for path, x, (shape, _, _) in zip(paths, leaves, self._like):
            if x.shape != shape:
                raise MergeError(f"checkpoint {self.count + 1}: leaf {path} has shape {x.shape}, "
                                 f"the first checkpoint has {shape}")

    def weights(self) -> list[float]:
        return merge_weights(self.method, self.count, self.alpha)

    def result(self):
        """The merged params (each leaf in its first checkpoint's dtype). Ends the merger."""
        if self._acc is None:
            raise MergeError("no checkpoints were added")
        n = self.count
        scale = {"sma": 1.0 / n, "wma": 1.0 / (n * (n + 1) / 2), "ema": 1.0}[self.method]
        out = [_ops(sharding)[2](acc, jnp.float32(scale), dtype)
               for acc, (_, dtype, sharding) in zip(self._acc, self._like)]
        self._acc = None
        return jax.tree_util.tree_unflatten(self._treedef, out)


def merge_params(params_list: Iterable, method: str, alpha: float | None = None):
    """Merges params pytrees (oldest first) with `sma`, `ema` (needs alpha) or `wma`. Any iterable
    works; a generator that restores checkpoints lazily keeps only two models in memory."""
    merger = Merger(method, alpha)
    for params in params_list:
        merger.add(params)
    return merger.result()


# ----------------------------------------------------------------------------- CLI


def select_steps(steps: Iterable[int], last: int, interval: int | None = None) -> list[int]:
    """The last `last` of `steps` (only multiples of `interval` when given), oldest first."""
    if last < 1:
        raise MergeError(f"--last must be >= 1, got {last}")
    if interval is not None and interval < 1:
        raise MergeError(f"--interval must be >= 1, got {interval}")
    available = sorted(steps)
    matching = [s for s in available if interval is None or s % interval == 0]
    if len(matching) < last:
        which = f" that are multiples of {interval}" if interval else ""
        raise MergeError(f"asked for the last {last} checkpoints{which} but only {len(matching)} match; "
                         f"available steps: {available}")
    return matching[-last:]


def _restore_target(model_cfg):
    """Abstract params spread FSDP-style over all local devices (so a model larger than one device
    can be merged), or on one device where the shapes do not divide."""
    from jaxllm.models import param_axes
    from jaxllm.run import abstract_params
    from jaxllm.parallel.mesh import make_mesh, tree_shardings

    abstract = abstract_params(model_cfg)
    try:
        mesh = make_mesh(data=1, fsdp=-1, tensor=1, devices=jax.local_devices())
        shardings = tree_shardings(mesh, param_axes(model_cfg), jax.tree.map(lambda a: a.shape, abstract))
    except ValueError:  # shapes that do not divide over the devices
        return abstract
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def merge_run(run_dir: str, method: str, last: int, out_dir: str, interval: int | None = None,
              alpha: float | None = None, log=print) -> tuple[list[int], list[float]]:
    """Merges the last checkpoints of a run and writes them where `load_run(out_dir)` finds them."""
    from jaxllm.checkpoint import Checkpointer
    from jaxllm.run import read_config, save_params
    from jaxllm.tasks import make_task

    _check_method(method, alpha)
    cfg = read_config(run_dir)
    if os.path.abspath(out_dir) == os.path.abspath(run_dir):
        raise MergeError("--out must differ from the run directory (it would add a step 0 to the run)")
    extras = make_task(cfg).objective.extra_param_axes(cfg.model)
    if cfg.lora.enabled or extras:
        held = "LoRA adapters" if cfg.lora.enabled else f"objective params ({', '.join(extras)})"
        raise MergeError(f"{run_dir}: PMA merges full decoder checkpoints; this run's checkpoints hold {held} "
                         "(fold them into the model first, e.g. through jaxllm.run.load_run and save_params)")
    ckpt = Checkpointer(run_dir, async_save=False)
    try:
        steps = select_steps(ckpt.all_steps(), last, interval)
        weights = merge_weights(method, len(steps), alpha)
        log(f"merging {method} of {run_dir}: " +
            ", ".join(f"step {s} x {w:.6g}" for s, w in zip(steps, weights)))
        target = _restore_target(cfg.model)
        merger = Merger(method, alpha)
        for step in steps:
            # One restored checkpoint at a time: the merger holds the running sum, this holds one model.
            merger.add(ckpt.restore_params(step, target))
        merged = merger.result()
    finally:
        ckpt.close()
    # A curriculum's last merged stage sets the model (e.g. its long-context rope_theta).
    save_params(make_task(cfg).model_at(steps[-1]), merged, out_dir, cfg=cfg)
    from jaxllm.data.tokenizer import keep_tokenizer, saved_tokenizer

    if saved_tokenizer(run_dir):  # the merged model keeps the run's tokenizer beside it
        keep_tokenizer(saved_tokenizer(run_dir), out_dir)
    log(f"wrote merged params to {out_dir}")
    return steps, weights


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxllm.merge",
                                     description="Average the last checkpoints of a run (PMA).")
    parser.add_argument("--method", choices=METHODS, required=True)
    parser.add_argument("--checkpoints", required=True, help="a run directory (trainer.run_dir)")
    parser.add_argument("--last", type=int, required=True, help="how many of the newest checkpoints")
    parser.add_argument("--interval", type=int, default=None, help="only steps that are multiples of K")
    parser.add_argument("--alpha", type=float, default=None, help="ema: weight of each newer checkpoint")
    parser.add_argument("--out", required=True, help="output directory, loadable with load_run")
    args = parser.parse_args(argv)
    return run_cli(lambda: merge_run(args.checkpoints, args.method, args.last, args.out, interval=args.interval,
                                     alpha=args.alpha) and 0)


if __name__ == "__main__":
    sys.exit(main())
