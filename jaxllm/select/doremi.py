"""DoReMi (Xie et al. 2023): mixture weights for pretraining domains from a small proxy run.

    python -m jaxllm.select doremi --config CFG [--reference RUN_DIR] [--work DIR] --out weights.yaml \\
        [--eta 1] [--smoothing 1e-3] [--proxy-steps N] [key=value ...]

CFG is a pretraining config with two or more `data.sources` and one stage, whose weights are
the base mixture (uniform in the paper). Step 1: a reference model trained on the base mixture,
CFG as is (`jaxllm.train.train` into WORK/reference, resumable), unless --reference gives one.
Step 2: a proxy with CFG's model, from its initialisation, on batches drawn by the base mixture,
with group DRO over the domains (the paper's Algorithm 1); at step t, from the proxy's
per-token losses l (params theta_{t-1}) and the reference's l_ref on the batch:

    lambda_i = sum over domain-i tokens of max(l - l_ref, 0) / (domain-i tokens)   (0 if none)
    alpha'   = alpha_{t-1} exp(eta lambda), normalised             (exponentiated gradient)
    alpha_t  = (1 - c) alpha' + c / k                               (smoothing, c = --smoothing)

and the proxy steps on sum_i alpha_t[i] * (mean loss of domain i's tokens): the batch's
loss_mask scaled by alpha_t[i] / tokens_i, through the run's own Trainer step (its weight sums
to at most 1, which the step does not change). alpha_0 is uniform. The result is the mean of
alpha_t over the proxy's steps, written as a config that `base:`-includes CFG and sets
`data.stages` to one stage with those weights (the stage's seq_len / batch_size / rope_theta
kept), so `python -m jaxllm.train --config weights.yaml` trains on the DoReMi mixture. The
proxy keeps checkpoints (its state, alpha and the running sum) in WORK/proxy and resumes exactly;
metrics.jsonl there logs alpha/<domain> and excess/<domain> per step.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import yaml

from jaxllm.checkpoint import Checkpointer
from jaxllm.data.mixture import MixtureIterator
from jaxllm.data.tokenizer import run_tokenizer
from jaxllm.metrics import MetricsLogger
from jaxllm.models import hidden_states, output_embedding, param_axes
from jaxllm.objectives.lm import chunked_token_stats
from jaxllm.parallel.mesh import mesh_from_config, tree_shardings
from jaxllm.run import load_initial_params, load_run
from jaxllm.select.records import SelectError
from jaxllm.tasks import make_task
from jaxllm.train import Trainer


def doremi_update(alpha_prev, excess, eta: float, smoothing: float) -> np.ndarray:
    """alpha_t from alpha_{t-1} and the per-domain excess losses lambda (module doc); float64."""
    a = np.log(np.asarray(alpha_prev, np.float64)) + eta * np.asarray(excess, np.float64)
    a = np.exp(a - a.max())
    return (1.0 - smoothing) * a / a.sum() + smoothing / len(a)


def check_base_mixture(cfg) -> tuple[list[str], tuple[float, ...]]:
    """(domain names, base weights): two or more sources, one stage, every weight > 0."""
    d = cfg.data
    if not make_task(cfg).uses_mixtures or len(d.sources) < 2:
        raise SelectError("doremi: the config must be a pretraining mixture with two or more data.sources")
    if d.dynamic_weights.enabled:
        raise SelectError("doremi: data.dynamic_weights is on; the reference and the proxy train on the fixed base "
                          "mixture (set data.dynamic_weights.every_steps=0)")
    if len(d.stages) != 1:
        raise SelectError(f"doremi: the config has {len(d.stages)} stages; give one, whose weights are the "
                          "base mixture the reference and the proxy train on")
    names = [s.name for s in d.sources]
    weights = tuple(d.stages[0].weights.get(n, 0.0) for n in names)
    zero = [n for n, w in zip(names, weights) if w <= 0]
    if zero:
        raise SelectError(f"doremi: data.stages[0].weights.{zero[0]} is 0: the proxy must see every domain "
                          "(give each a weight > 0)")
    return names, tuple(w / sum(weights) for w in weights)


def check_seen(names: list[str], tokens, steps: int) -> None:
    """A domain without a token in the proxy's batches has no excess loss to weigh: an error."""
    never = [n for n, t in zip(names, tokens) if t == 0]
    if never:
        raise SelectError(f"doremi: domain {never[0]!r} never appeared in the proxy's {steps} batches; raise its "
                          "base weight or the batch size")


def token_losses(model_cfg, params, batch, chunk: int):
    """-log p(target) per position [B, T], fp32, chunked like the training loss."""
    h = hidden_states(model_cfg, params, batch["tokens"], batch["positions"], batch["segment_ids"])
    logp, _ = chunked_token_stats(h, output_embedding(model_cfg, params).astype(h.dtype), batch["targets"], chunk)
    return -logp


def domain_excess(task, ref_model, k: int, chunk: int, trainable, frozen, ref_params, batch, domain_B):
    """Per domain over the (global) batch: sums of the clipped excess loss, of the proxy's and
    the reference's losses, and the token counts ([k] each)."""
    mask = batch["loss_mask"].astype(jnp.float32)
    loss = token_losses(task.cfg.model, task.effective_params(trainable, frozen), batch, chunk)
    ref = token_losses(ref_model, ref_params, batch, chunk)
    onehot_BK = jax.nn.one_hot(domain_B, k, dtype=jnp.float32)
    per = lambda x_BT: jnp.sum(x_BT * mask, axis=1) @ onehot_BK
    return {"excess": per(jnp.maximum(loss - ref, 0.0)), "loss": per(loss), "ref_loss": per(ref),
            "tokens": per(jnp.ones_like(mask))}


@dataclasses.dataclass
class DROState:
    """alpha_t, the running sum of alpha over the steps done, and tokens seen per domain."""

    alpha: np.ndarray
    alpha_sum: np.ndarray
    tokens: np.ndarray

    def to_json(self) -> dict:
        return {k: getattr(self, k).tolist() for k in ("alpha", "alpha_sum", "tokens")}

    @classmethod
    def from_json(cls, saved: dict) -> "DROState":
        return cls(*(np.asarray(saved[k], np.float64) for k in ("alpha", "alpha_sum", "tokens")))


class Proxy:
    """The group-DRO proxy run (module doc, step 2)."""

    def __init__(self, cfg, ref_cfg, ref_params, tokenizer, *, eta: float, smoothing: float):
        self.cfg, self.eta, self.smoothing = cfg, eta, smoothing
        self.names, _ = check_base_mixture(cfg)
        self.trainer = Trainer(cfg, mesh_from_config(cfg.mesh))
        shapes = jax.tree.map(lambda a: a.shape, ref_params)
        self.ref_params = jax.device_put(ref_params, tree_shardings(self.trainer.mesh, param_axes(ref_cfg.model),
                                                                    shapes))
        fn = functools.partial(domain_excess, self.trainer.task, ref_cfg.model, len(self.names),
                               cfg.trainer.loss_chunk_size)
        self.excess = jax.jit(fn)
        self.iterator = MixtureIterator(cfg, tokenizer, process_index=jax.process_index(),
                                        process_count=jax.process_count(), keep_source=True)

    def step(self, state, dro: DROState):
        """One proxy step: (state, dro, per-step metrics)."""
        batch = next(self.iterator)
        domain = batch.pop("source")
        sums = jax.device_get(self.excess(state.params, state.frozen, self.ref_params, self.trainer.to_global(batch),
                                          self.trainer.to_global({"d": domain})["d"]))
        sums = {k: np.asarray(v, np.float64) for k, v in sums.items()}
        seen = sums["tokens"] > 0
        lam = np.where(seen, sums["excess"] / np.maximum(sums["tokens"], 1.0), 0.0)
        alpha = doremi_update(dro.alpha, lam, self.eta, self.smoothing)
        row_weight = (alpha / np.maximum(sums["tokens"], 1.0))[domain].astype(np.float32)
        batch["loss_mask"] = batch["loss_mask"] * row_weight[:, None]
        state, metrics = self.trainer.train_step(state, self.trainer.to_global(batch))
        dro = DROState(alpha, dro.alpha_sum + alpha, dro.tokens + sums["tokens"])
        logged = {"loss": metrics["loss"]}
        for i, n in enumerate(self.names):
            logged |= {f"alpha/{n}": alpha[i], f"excess/{n}": lam[i],
                       f"loss/{n}": sums["loss"][i] / max(sums["tokens"][i], 1.0)}
        return state, dro, logged

    def _initial_params(self):
        host = jax.device_get(self.trainer.init_model(self.trainer.keys.model))
        if self.cfg.model.init_from:
            host = load_initial_params(self.cfg, host)
        return self.trainer.layout.place(host)

    def run(self, work_dir: str, steps: int) -> DROState:
        """Trains (or resumes) the proxy to `steps` steps in `work_dir`; returns the DRO state."""
        from jaxllm.run import trim_metrics

        ckpt = Checkpointer(work_dir, keep=2, async_save=False)
        start = ckpt.latest_step()
        if start is None:
            start, state = 0, self.trainer.fresh_state(self._initial_params())
            k = len(self.names)
            dro = DROState(np.full(k, 1.0 / k), np.zeros(k), np.zeros(k))
        else:
            state, saved = ckpt.restore(start, self.trainer.abstract_state)
            if self.trainer.abstract_state.frozen:
                state = state.replace(frozen=self.trainer.make_frozen(self._initial_params()))
            self.iterator.set_state(saved["mixture"])
            dro = DROState.from_json(saved["dro"])
            trim_metrics(work_dir, start)
        lg = self.cfg.logging
        logger = MetricsLogger(work_dir, steps, progress_bar=lg.progress_bar, tensorboard=False, initial_step=start)
        every = self.cfg.checkpoint.every_steps
        for t in range(start + 1, steps + 1):
            state, dro, metrics = self.step(state, dro)
            if t % lg.every_steps == 0 or t == steps:
                logger.log(t, {k: float(v) for k, v in metrics.items()}, advance=1)
            else:
                logger.advance(1)
            if t % every == 0 or t == steps:
                ckpt.save(t, state, {"mixture": self.iterator.get_state(), "dro": dro.to_json()})
        ckpt.close()
        logger.close()
        return dro


def write_weights(out: str, config_path: str, cfg, names: list[str], weights, note: str) -> None:
    """A config that includes `config_path` (`base:`) and sets data.stages to the DoReMi weights."""
    st = cfg.data.stages[0]
    keep = {k: getattr(st, k) for k in ("seq_len", "batch_size", "rope_theta") if getattr(st, k) is not None}
    out_dir = os.path.dirname(os.path.abspath(out))
    doc = {"base": os.path.relpath(os.path.abspath(config_path), out_dir),
           "data": {"stages": [{"name": "doremi", "weights": {n: float(w) for n, w in zip(names, weights)}, **keep}]}}
    os.makedirs(out_dir, exist_ok=True)
    with open(out, "w") as f:
        f.write("".join(f"# {line}\n" for line in note.splitlines()))
        yaml.safe_dump(doc, f, sort_keys=False)


def run_doremi(cfg, config_path: str, out: str, *, reference: str | None, work: str, eta: float = 1.0,
               smoothing: float = 1e-3, proxy_steps: int | None = None, log=print) -> dict:
    """Steps 1-2 of the module doc and the weights file; returns a summary."""
    from jaxllm.train import train

    names, base = check_base_mixture(cfg)
    if not (eta > 0 and 0 <= smoothing <= 1):
        raise SelectError(f"doremi: need --eta > 0 and --smoothing in [0, 1], got {eta} and {smoothing}")
    if reference is None:
        reference = os.path.join(work, "reference")
        log(f"doremi: training the reference model on the base mixture in {reference}")
        train(dataclasses.replace(cfg, trainer=dataclasses.replace(cfg.trainer, run_dir=reference)))
    ref_cfg, ref_params = load_run(reference)
    if ref_cfg.model.vocab_size != cfg.model.vocab_size:
        raise SelectError(f"--reference {reference}: model.vocab_size {ref_cfg.model.vocab_size} differs from the "
                          f"proxy's {cfg.model.vocab_size}; they must share a tokenizer")
    steps = proxy_steps or cfg.trainer.total_steps
    proxy_cfg = dataclasses.replace(cfg, trainer=dataclasses.replace(
        cfg.trainer, total_steps=steps, run_dir=os.path.join(work, "proxy")))
    proxy = Proxy(proxy_cfg, ref_cfg, ref_params, run_tokenizer(ref_cfg, reference), eta=eta, smoothing=smoothing)
    dro = proxy.run(proxy_cfg.trainer.run_dir, steps)
    check_seen(names, dro.tokens, steps)
    weights = dro.alpha_sum / steps
    summary = {"domains": names, "base": list(base), "weights": weights.tolist(), "final_alpha": dro.alpha.tolist(),
               "tokens": dro.tokens.tolist(), "steps": steps, "eta": eta, "smoothing": smoothing,
               "reference": reference}
    if jax.process_index() == 0:
        write_weights(out, config_path, cfg, names, weights,
                      f"DoReMi domain weights: mean of alpha over {steps} proxy steps (eta {eta:g}, smoothing "
                      f"{smoothing:g}), reference {reference}\n" + json.dumps(dict(zip(names, base))) + " (base)")
        log(f"doremi: {', '.join(f'{n} {b:.3f} -> {w:.3f}' for n, b, w in zip(names, base, weights))} -> {out}")
    return summary


def main(argv) -> int:
    import argparse

    from jaxllm.errors import run_cli
    from jaxllm.train import configure

    p = argparse.ArgumentParser(prog="python -m jaxllm.select doremi", description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="pretraining config: data.sources and one base-mixture stage")
    p.add_argument("--reference", help="a trained reference run (default: train one on the base mixture)")
    p.add_argument("--work", help="folder of the reference and proxy runs (default: OUT without .yaml + '-work')")
    p.add_argument("--out", required=True, help="the weights: a config with base: CONFIG and data.stages")
    p.add_argument("--eta", type=float, default=1.0, help="step size of the domain-weight update")
    p.add_argument("--smoothing", type=float, default=1e-3, help="mixing with the uniform weights")
    p.add_argument("--proxy-steps", type=int, help="proxy steps (default trainer.total_steps)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides (not written into OUT)")
    args = p.parse_args(argv)

    def body():
        cfg = configure(args.config, args.overrides)
        if cfg is None:
            return 2
        if args.proxy_steps is not None and args.proxy_steps <= 0:
            raise SelectError("--proxy-steps must be > 0")
        work = args.work or os.path.splitext(args.out)[0] + "-work"
        run_doremi(cfg, args.config, args.out, reference=args.reference, work=work, eta=args.eta,
                   smoothing=args.smoothing, proxy_steps=args.proxy_steps,
                   log=print if jax.process_index() == 0 else lambda _: None)
        return 0

    return run_cli(body)
