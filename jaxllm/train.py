"""`python -m jaxllm.train --config configs/X.yaml [a.b=c ...]`

The train step is a pure function `(state, batch) -> (state, metrics)`, jitted once with
explicit shardings and donation. The host loop around it feeds data, logs step n-1's metrics
after step n is dispatched (so logging never stalls the device), evaluates, checkpoints and
resumes.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from jaxllm import config as config_lib
from jaxllm.checkpoint import Checkpointer
from jaxllm.metrics import MetricsLogger, peak_tflops_per_device
from jaxllm import params as params_lib
from jaxllm import reference as reference_lib
from jaxllm.objectives import make_objective
from jaxllm.optim import make_optimizer, make_schedule
from jaxllm.parallel import distributed
from jaxllm.parallel.mesh import activation_sharding, batch_sharding, mesh_from_config, tree_shardings


@struct.dataclass
class TrainState:
    step: jax.Array
    params: Any  # the trainable params (under LoRA: adapters and objective extras)
    opt_state: Any
    rng: jax.Array  # raw uint32[2] key; each step folds in its step number
    # Frozen params (LoRA base, live DPO reference): rebuilt from the config, never checkpointed.
    frozen: Any = struct.field(default_factory=dict)


# ----------------------------------------------------------------------------- building the step


class Trainer:
    """Everything compiled for one config and mesh: state init, train step, eval step."""

    def __init__(self, cfg: config_lib.Config, mesh):
        self.cfg, self.mesh = cfg, mesh
        self.objective = make_objective(cfg)
        self.schedule = make_schedule(cfg.optimizer, cfg.schedule, cfg.trainer.total_steps)
        self.tx = make_optimizer(cfg.optimizer, self.schedule, decay_mask=params_lib.decay_mask(cfg))
        self.keys = params_lib.run_keys(cfg)
        self.replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

        abstract_model = jax.eval_shape(self._init_model, self.keys.model)
        self.model_shardings = tree_shardings(mesh, params_lib.model_param_axes(cfg),
                                              jax.tree.map(lambda a: a.shape, abstract_model))
        abstract_state = jax.eval_shape(self._init, abstract_model, self.keys.adapters, self.keys.state)
        self.state_shardings = self._state_shardings(abstract_state)
        self.abstract_state = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, self.state_shardings)
        self.init_model = jax.jit(self._init_model, out_shardings=self.model_shardings)
        self.init_state = jax.jit(self._init, out_shardings=self.state_shardings)
        self.make_frozen = jax.jit(lambda m: params_lib.frozen_params(cfg, m),
                                   out_shardings=self.state_shardings.frozen)
        self.train_step = jax.jit(self._train_step, donate_argnums=0,
                                  out_shardings=(self.state_shardings, None))
        self.eval_step = jax.jit(self._eval_step)
        self.effective = jax.jit(lambda params, frozen: params_lib.effective_params(cfg, params, frozen),
                                 out_shardings=self.model_shardings)

    def _init_model(self, key):
        return params_lib.init_model_params(self.cfg, key)

    def _init(self, model_params, adapter_key, state_key):
        trainable = params_lib.init_trainable(self.cfg, model_params, adapter_key)
        return TrainState(step=jnp.zeros((), jnp.int32), params=trainable, opt_state=self.tx.init(trainable),
                          rng=state_key, frozen=params_lib.frozen_params(self.cfg, model_params))

    def _state_shardings(self, abstract_state):
        cfg = self.cfg
        params = tree_shardings(self.mesh, params_lib.trainable_axes(cfg, abstract_state.params),
                                jax.tree.map(lambda a: a.shape, abstract_state.params))
        # Optimizer moments mirror the params' shardings; counters are replicated.
        opt = optax.tree_map_params(self.tx, lambda _, s: s, abstract_state.opt_state, params,
                                    transform_non_params=lambda _: self.replicated,
                                    is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
        decoder, _ = params_lib.split_model_params(cfg, self.model_shardings)
        frozen = {k: (decoder if k == "base" else self.model_shardings) for k in abstract_state.frozen}
        return TrainState(step=self.replicated, params=params, opt_state=opt, rng=self.replicated, frozen=frozen)

    def fresh_state(self, model_params=None) -> TrainState:
        """Step-0 state from the seed, or from given model params (e.g. `model.init_from`)."""
        if model_params is None:
            model_params = self.init_model(self.keys.model)
        return self.init_state(model_params, self.keys.adapters, self.keys.state)

    def initial_model_params(self):
        """The run's model params before step 1, sharded: seed init, then `model.init_from`."""
        model = self.init_model(self.keys.model)
        if not self.cfg.model.init_from:
            return model
        loaded = params_lib.load_initial_params(self.cfg, jax.device_get(model))
        return jax.tree.map(lambda a, s: jax.make_array_from_callback(
            a.shape, s, lambda idx, a=a: np.asarray(a[idx], np.float32)), loaded, self.model_shardings)

    def _loss(self, trainable, frozen, batch, rng, deterministic: bool):
        cfg = self.cfg
        params = params_lib.effective_params(cfg, trainable, frozen, rng, deterministic=deterministic)
        ref = params_lib.reference_params(cfg, frozen, trainable)
        if ref is not None:
            ref = jax.lax.stop_gradient(ref)
        return self.objective.loss(params, batch, ref_params=ref, rng=rng)

    def _train_step(self, state: TrainState, batch):
        accum = self.cfg.trainer.grad_accum_steps
        rng = jax.random.fold_in(state.rng, state.step)
        grad_fn = jax.value_and_grad(self._loss, has_aux=True)
        with activation_sharding(self.mesh):
            if accum == 1:
                (loss_sum, aux), grads = grad_fn(state.params, state.frozen, batch, rng, False)
            else:
                # Microbatch j takes rows j, j+A, j+2A...: every device keeps an equal share.
                micro = jax.tree.map(
                    lambda x: x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1), batch)

                def body(carry, xs):
                    j, mb = xs
                    (l, a), g = grad_fn(state.params, state.frozen, mb, jax.random.fold_in(rng, j), False)
                    return jax.tree.map(jnp.add, carry, (l, a, g)), None

                first = jax.tree.map(lambda x: x[0], micro)
                aux_shape = jax.eval_shape(self._loss, state.params, state.frozen, first, rng, False)[1]
                zeros = (jnp.zeros(()), jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), aux_shape),
                         jax.tree.map(jnp.zeros_like, state.params))
                (loss_sum, aux, grads), _ = jax.lax.scan(body, zeros, (jnp.arange(accum), micro))
        weight = jnp.maximum(aux["weight"], 1.0)
        # Sums divided once by the whole batch's weight: accumulation equals the big batch.
        grads = jax.tree.map(lambda g: g / weight, grads)
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = self.objective.finalize(aux | {"loss_sum": loss_sum})
        metrics |= {"grad_norm": optax.tree_utils.tree_norm(grads), "lr": self.schedule(state.step),
                    "tokens": aux["tokens"]}
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        return new_state, metrics

    def _eval_step(self, params, frozen, batch):
        with activation_sharding(self.mesh):
            loss_sum, aux = self._loss(params, frozen, batch, None, True)
        return aux | {"loss_sum": loss_sum}

    def to_global(self, local_batch: dict):
        """Per-process numpy rows -> one global array per key, sharded along batch."""
        return {k: jax.make_array_from_process_local_data(batch_sharding(self.mesh, np.ndim(v)), np.asarray(v))
                for k, v in local_batch.items()}

    def evaluate(self, state: TrainState, batches) -> dict:
        sums = None
        for b in batches:
            out = jax.device_get(self.eval_step(state.params, state.frozen, self.to_global(b)))
            sums = out if sums is None else jax.tree.map(np.add, sums, out)
        metrics = {k: float(v) for k, v in self.objective.finalize(sums).items()}
        out = {f"eval_{k}": v for k, v in metrics.items()}
        if self.cfg.task in ("pretrain", "sft"):  # per-token NLL (sft's loss may be a sum or add UL)
            out["eval_ppl"] = float(np.exp(min(metrics.get("nll", metrics["loss"]), 50.0)))
        return out


# ----------------------------------------------------------------------------- the host loop


class _Preempted:
    """SIGTERM sets a flag; with several processes they agree on it, so all save the same step."""

    def __init__(self):
        self._flag = False
        self._old = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self._flag = True

    def should_stop(self, step: int, every: int) -> bool:
        if jax.process_count() == 1:
            return self._flag
        # The agreement is a collective that waits for the step in flight: do it only every
        # `every` steps, not every step, so the host keeps dispatching ahead of the device.
        if step % every:
            return False
        from jax.experimental import multihost_utils

        return bool(np.any(multihost_utils.process_allgather(np.array(self._flag))))

    def restore(self):
        signal.signal(signal.SIGTERM, self._old)


def _trim_metrics(run_dir: str, last_step: int) -> None:
    """After a resume, drop logged steps beyond the checkpoint: they are about to be redone."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if jax.process_index() != 0 or not os.path.exists(path):
        return
    import json

    with open(path) as f:
        kept = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= last_step]
    with open(path, "w") as f:
        f.writelines(kept)


def _data(cfg, tokenizer, reference=None):
    """(endless train iterator, fixed eval batches) of the config's task."""
    if cfg.task == "pretrain":
        from jaxllm.data.pipeline import make_eval_batches, make_train_iterator

        return make_train_iterator(cfg, tokenizer), make_eval_batches(cfg, tokenizer, cfg.trainer.eval_batches)
    from jaxllm.data import tasks

    return (tasks.make_train_iterator(cfg, tokenizer, reference=reference),
            tasks.make_eval_batches(cfg, tokenizer, cfg.trainer.eval_batches, reference=reference))


def _epoch_fingerprint(cfg, tokenizer) -> dict:
    """What one epoch's batch count depends on; a cached count with another fingerprint is stale.
    Files by path, size and mtime: a stat each, not another pass over the records."""
    from jaxllm.data.sources import resolve_files

    d = cfg.data
    files = [[f, os.stat(f).st_size, os.stat(f).st_mtime_ns] for spec in d.train for f in resolve_files(spec)]
    return {"task": cfg.task, "train": list(d.train), "files": files,
            "seq_len": d.seq_len, "batch_size": cfg.trainer.batch_size, "processes": jax.process_count(),
            "seed": d.seed, "add_bos": d.add_bos, "vocab_size": tokenizer.vocab_size,
            "sft": repr(cfg.sft), "preference": repr(cfg.preference)}


def resolve_epochs(cfg: config_lib.Config, tokenizer, run_dir: str, log=print) -> config_lib.Config:
    """With trainer.epochs > 0: cfg with total_steps = ceil(epochs * batches in one epoch) (and
    epochs 0, so the run's saved config is plain). The count takes one tokenizing pass over
    data.train; it is kept in RUN_DIR/epoch_size.json, so a resumed run does not count again."""
    import json
    import math

    t = cfg.trainer
    if t.epochs <= 0:
        return cfg
    from jaxllm.data import tasks

    path = os.path.join(run_dir, "epoch_size.json")
    want = _epoch_fingerprint(cfg, tokenizer)
    size = None
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        size = saved["size"] if saved.get("fingerprint") == want else None
    if size is None:
        log(f"trainer.epochs {t.epochs:g}: counting the batches in one pass over data.train")
        size = tasks.batches_per_epoch(cfg, tokenizer)
        if jax.process_index() == 0:
            tmp = f"{path}.tmp-{os.getpid()}"
            with open(tmp, "w") as f:
                json.dump({"fingerprint": want, "size": size}, f)
            os.replace(tmp, path)
    if size["batches"] < 1:
        raise config_lib.ConfigError(
            f"trainer.epochs: one pass over data.train gives {size['rows']} rows, not one full batch of "
            f"trainer.batch_size {t.batch_size} (per process)")
    steps = math.ceil(t.epochs * size["batches"])
    log(f"trainer.epochs {t.epochs:g} x {size['batches']} batches per epoch ({size['rows']} rows, "
        f"{size['skipped']} records skipped) = {steps} steps")
    resolved = dataclasses.replace(cfg, trainer=dataclasses.replace(t, total_steps=steps, epochs=0.0))
    config_lib.validate(resolved)  # e.g. schedule.warmup_steps against the new total
    return resolved


def train(cfg: config_lib.Config) -> dict:
    """Runs (or resumes) training; returns a summary with the initial and final losses."""
    from jaxllm.data.tokenizer import keep_tokenizer, run_tokenizer

    run_dir = cfg.trainer.run_dir
    mesh = mesh_from_config(cfg.mesh)
    if jax.process_index() == 0:
        os.makedirs(run_dir, exist_ok=True)
    tokenizer = run_tokenizer(cfg, run_dir)
    cfg = config_lib.resolve_total_tokens(cfg)
    cfg = resolve_epochs(cfg, tokenizer, run_dir, log=print if jax.process_index() == 0 else lambda _: None)
    t = cfg.trainer
    if jax.process_index() == 0:
        config_lib.dump_yaml(cfg, os.path.join(run_dir, "config.yaml"))
        keep_tokenizer(tokenizer, run_dir)
    trainer = Trainer(cfg, mesh)

    ckpt = Checkpointer(run_dir, keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save) \
        if cfg.checkpoint.enabled else None
    resume_step = ckpt.latest_step() if ckpt else None
    initial = []  # the initial model params, built at most once and only when needed

    def initial_model_params():
        if not initial:
            initial.append(trainer.initial_model_params())
        return initial[0]

    reference = None
    if reference_lib.needs_cache(cfg):
        reference = reference_lib.load_or_compute(cfg, trainer, tokenizer, initial_model_params, run_dir)
    train_iter, eval_batches = _data(cfg, tokenizer, reference)
    if resume_step is not None:
        state, data_state = ckpt.restore(resume_step, trainer.abstract_state)
        if trainer.abstract_state.frozen:
            state = state.replace(frozen=trainer.make_frozen(initial_model_params()))
        train_iter.set_state(data_state)
        _trim_metrics(run_dir, resume_step)
    else:
        state = trainer.fresh_state(initial_model_params())
    initial.clear()
    start = int(state.step)

    logger = MetricsLogger(run_dir, t.total_steps, progress_bar=cfg.logging.progress_bar,
                           tensorboard=cfg.logging.tensorboard, initial_step=start)
    n_params = cfg.model.num_params()
    flops_per_token = cfg.model.flops_per_token(cfg.data.seq_len)
    peak = peak_tflops_per_device(cfg.logging.peak_tflops_per_device)
    trainable = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(trainer.abstract_state.params))
    logger.write(f"jaxllm: task {cfg.task}, {n_params / 1e6:.1f}M params ({trainable / 1e6:.2f}M trained), "
                 f"mesh {dict(mesh.shape)}, {jax.device_count()} {jax.devices()[0].platform} devices, "
                 f"{'resuming from step ' + str(start) if start else 'from scratch'}, run dir {run_dir}")

    staged = {cfg.model: trainer}  # one compiled trainer per stage model (rope_theta may change)

    def trainer_at(step: int) -> Trainer:
        if cfg.task != "pretrain" or not cfg.data.stages:
            return trainer
        from jaxllm.data.curriculum import model_config_at

        model = model_config_at(cfg, step)
        if model not in staged:
            logger.write(f"step {step}: stage model {model_overrides_text(cfg.model, model)}")
            staged[model] = Trainer(dataclasses.replace(cfg, model=model), mesh)
        return staged[model]

    def data_stats() -> dict:
        from jaxllm.data.packing import packing_stats

        out = dict(train_iter.stats()) if hasattr(train_iter, "stats") else {}
        if cfg.task == "pretrain":
            out["padding_fraction"] = packing_stats(train_iter)["padding_fraction"]
        return out

    summary = {"start_step": start}
    if start == 0:
        ev = trainer_at(0).evaluate(state, eval_batches)
        summary["initial_eval"] = ev
        summary["initial_eval_loss"] = ev["eval_loss"]
        logger.log(0, ev)

    def log_pending():
        m = {k: float(v) for k, v in jax.device_get(pending[1]).items()}
        summary["last_loss"] = m["loss"]
        logger.log(pending[0], m | data_stats(), advance=1)

    preempted = _Preempted()
    pending = None  # (step, device metrics) of the step before the one in flight
    last_time, last_step, compile_s = time.perf_counter(), start, None
    paused = 0.0  # seconds spent in eval and checkpoint calls, kept out of step timing
    step = start
    exhausted = False
    try:
        while step < t.total_steps:
            try:
                local = next(train_iter)
            except StopIteration:  # a source with on_exhaust: stop ran out
                exhausted = True
                break
            current = trainer_at(step)
            state, metrics = current.train_step(state, current.to_global(local))
            step += 1
            if compile_s is None:
                jax.block_until_ready(metrics)
                compile_s = time.perf_counter() - last_time
                last_time, last_step = time.perf_counter(), step
                logger.write(f"first step (with compilation) took {compile_s:.1f} s")
            if pending is not None:
                p_step, p_metrics = pending
                m = {k: float(v) for k, v in jax.device_get(p_metrics).items()}
                now = time.perf_counter()
                dt = (now - last_time - paused) / max(p_step - last_step, 1)
                m |= {"step_time_s": dt, "tokens_per_s": m["tokens"] / dt}
                if peak:
                    m["mfu"] = flops_per_token * m["tokens"] / dt / (peak * 1e12 * jax.device_count())
                last_time, last_step, paused = now, p_step, 0.0
                summary["last_loss"] = m["loss"]
                logger.log(p_step, m | data_stats(), advance=1)
                pending = None
            if step % cfg.logging.every_steps == 0 or step == t.total_steps:
                pending = (step, metrics)
            else:
                logger.advance(1)
            stop = preempted.should_stop(step, cfg.logging.every_steps)
            do_eval = step % t.eval_every_steps == 0 or step == t.total_steps
            do_save = ckpt is not None and (step % cfg.checkpoint.every_steps == 0 or step == t.total_steps or stop)
            if do_eval or do_save:
                jax.block_until_ready(metrics)  # the step's own time stays in the step timing
                t0 = time.perf_counter()
                if do_eval:
                    ev = current.evaluate(state, eval_batches)
                    summary["final_eval"] = ev
                    summary["final_eval_loss"] = ev["eval_loss"]
                    logger.log(step, ev)
                if do_save:
                    ckpt.save(step, state, train_iter.get_state())
                paused += time.perf_counter() - t0
            if stop:
                if pending is not None:
                    log_pending()
                logger.write(f"SIGTERM: saved a checkpoint at step {step}, exiting")
                if ckpt:
                    ckpt.wait()
                raise SystemExit(143)
        if pending is not None:
            log_pending()
        if exhausted:
            logger.write(f"data: a source with on_exhaust: stop ran out after step {step}; "
                         "evaluating, saving and ending the run")
            ev = trainer_at(step).evaluate(state, eval_batches)
            summary["final_eval"], summary["final_eval_loss"] = ev, ev["eval_loss"]
            logger.log(step, ev)
            if ckpt is not None and ckpt.latest_step() != step:
                ckpt.save(step, state, train_iter.get_state())
    finally:
        preempted.restore()
        if ckpt:
            ckpt.close()
        logger.close()

    summary["final_step"] = step
    sample = t.sample_tokens > 0 and cfg.task != "reward"  # a reward model does not generate
    if sample:
        params = trainer_at(step).effective(state.params, state.frozen)
        if jax.process_count() > 1:  # params may be sharded across hosts: every process gathers
            from jax.experimental import multihost_utils

            params = multihost_utils.process_allgather(params, tiled=True)
        params = jax.device_get(params)
    if sample and jax.process_index() == 0:
        from jaxllm.generate import sample_text

        text = sample_text(trainer_at(step).cfg, params, tokenizer, t.sample_prompt,
                           max_new_tokens=t.sample_tokens, temperature=0.8, seed=t.seed)
        summary["sample"] = text
        print(f"\n--- sample (prompt {t.sample_prompt!r}) ---\n{t.sample_prompt}{text}\n---", flush=True)
    return summary


def model_overrides_text(old, new) -> str:
    return ", ".join(f"{f.name} {getattr(old, f.name)} -> {getattr(new, f.name)}"
                     for f in dataclasses.fields(old) if getattr(old, f.name) != getattr(new, f.name)) or "unchanged"


def check_runtime(cfg: config_lib.Config) -> None:
    """Checks that depend on the machine: device count, platform, process count."""
    from jaxllm.data.curriculum import stage_plan
    from jaxllm.parallel.mesh import mesh_shape

    n, platform = jax.device_count(), jax.devices()[0].platform
    try:
        data, fsdp, _ = mesh_shape(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, n)
    except ValueError as e:
        raise config_lib.ConfigError(f"{e} (mesh.data, mesh.fsdp, mesh.tensor)") from None
    if cfg.model.attention == "cudnn" and platform != "gpu":
        raise config_lib.ConfigError(f"model.attention=cudnn needs an NVIDIA GPU, this machine has {platform} "
                                     "devices; valid here: xla" + (", pallas" if platform == "tpu" else ""))
    if cfg.model.attention == "pallas" and platform not in ("gpu", "tpu"):
        raise config_lib.ConfigError(f"model.attention=pallas needs a GPU or TPU, this machine has {platform} "
                                     "devices; valid here: xla")
    sizes = {"trainer.batch_size": cfg.trainer.batch_size}
    if cfg.task == "pretrain":  # a curriculum stage may set its own batch size
        sizes |= {f"data.stages[{i}].batch_size": s.batch_size for i, s in enumerate(stage_plan(cfg))}
    for key, size in sizes.items():
        micro = size // cfg.trainer.grad_accum_steps
        if micro % (data * fsdp):
            raise config_lib.ConfigError(
                f"{key} / trainer.grad_accum_steps = {micro} rows must divide over the "
                f"{data * fsdp} data-parallel shards (mesh.data * mesh.fsdp)")
        if size % jax.process_count():
            raise config_lib.ConfigError(f"{key} ({size}) must divide over {jax.process_count()} processes")


def configure(path: str, overrides) -> config_lib.Config | None:
    """Loads the config, starts multi-host JAX and checks the config against the machine;
    on a config problem prints one line to stderr and returns None."""
    try:
        cfg = config_lib.load_config(path, overrides)
        if cfg.mesh.cpu_devices:  # must precede the first use of any JAX backend
            jax.config.update("jax_num_cpu_devices", cfg.mesh.cpu_devices)
        distributed.initialize()
        check_runtime(cfg)
    except config_lib.ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return None
    return cfg


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxllm.train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="a YAML file under configs/")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. trainer.total_steps=100")
    args = parser.parse_args(argv)
    cfg = configure(args.config, args.overrides)
    if cfg is None:
        return 2
    summary = train(cfg)
    if "final_eval_loss" in summary and jax.process_index() == 0:
        print(f"done: step {summary['final_step']}, eval loss "
              f"{summary.get('initial_eval_loss', float('nan')):.3f} -> {summary['final_eval_loss']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
