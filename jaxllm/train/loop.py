"""The host loop shared by every task: `train(cfg)` runs (or resumes) a run.

Each step asks the task's batch source for a batch (with the current state, so an on-policy
source samples from the current policy), dispatches the jitted step, logs the previous step's
metrics once this one is in flight, and evaluates, checkpoints and handles SIGTERM at their
intervals. A resumed run restores state and data position from the newest complete checkpoint
and reaches the same losses as an uninterrupted one.
"""

from __future__ import annotations

import time

import jax

from jaxllm import run as run_lib
from jaxllm.checkpoint import Checkpointer, CheckpointMismatch, CheckpointUnreadable
from jaxllm.errors import ConfigError, UserError
from jaxllm.metrics import MetricsLogger, peak_tflops_per_device
from jaxllm.parallel.mesh import mesh_from_config
from jaxllm.tasks import RunContext
from jaxllm.train.hooks import Evaluator, Preemption, StageTrainers, StepLogger, sample_text_at_end
from jaxllm.train.step import Trainer


def _log_on_process_0(text: str) -> None:
    if jax.process_index() == 0:
        print(text, flush=True)


def _initial_params_once(trainer: Trainer):
    """A getter of the run's model params before step 1 (seed init, then `model.init_from`),
    built at most once: the cached reference pass and a fresh state may both need them."""
    made = []

    def get():
        if not made:
            model = trainer.init_model(trainer.keys.model)
            task = trainer.task
            if trainer.cfg.model.init_from or task.edits_initial_params:
                host = jax.device_get(model)
                if trainer.cfg.model.init_from:
                    host = run_lib.load_initial_params(trainer.cfg, host)
                model = trainer.layout.place(task.edit_initial_params(host, run_lib.load_run))
            made.append(model)
        return made[0]

    get.clear = made.clear
    return get


def _restore_or_init(trainer: Trainer, ckpt, source, initial_params):
    """(state, start step): the newest readable checkpoint's state and data position, or step 0.

    A checkpoint with a damaged file is reported (step and file), set aside and the previous one
    tried; one that does not fit the run's state stops the run with the config keys that differ
    from the run's saved config.yaml. config.yaml is written once the state is known."""
    cfg = trainer.cfg
    set_aside = []
    while True:
        step = ckpt.latest_step() if ckpt else None
        if step is None:
            if set_aside:
                _stop(ckpt, UserError(f"no readable checkpoint left in {ckpt.directory} (set aside: "
                                      f"{', '.join(set_aside)}); move one back, or remove them to start over"))
            state = trainer.fresh_state(initial_params())
            break
        try:
            state, data_state = ckpt.restore(step, trainer.abstract_state)
        except CheckpointUnreadable as e:
            set_aside.append(ckpt.set_aside(step))
            _log_on_process_0(f"checkpoint: {e}; set aside as {set_aside[-1]}, trying the previous one")
            continue
        except CheckpointMismatch as e:
            changed = run_lib.config_changes(cfg.trainer.run_dir, cfg)
            keys = (f"config keys that differ from the run's config.yaml: {'; '.join(changed)}" if changed else
                    "no config key differs from the run's config.yaml")
            _stop(ckpt, ConfigError(f"checkpoint step {step} does not fit this run ({keys}): "
                                    f"{str(e).split(': ', 1)[-1]}"))
        if trainer.abstract_state.frozen:
            state = state.replace(frozen=trainer.make_frozen(initial_params()))
        source.set_state(data_state)
        run_lib.trim_metrics(cfg.trainer.run_dir, step)
        break
    run_lib.write_config(cfg)
    return state, int(state.step)


def _stop(ckpt, error: Exception):
    """Raises `error` after closing the checkpoint manager, so no save thread outlives it."""
    if ckpt:
        ckpt.close()
    raise error


def _announce(logger, trainer: Trainer, start: int) -> None:
    cfg, mesh = trainer.cfg, trainer.mesh
    n_params = cfg.model.num_params()
    trained = sum(x.size for x in jax.tree.leaves(trainer.abstract_state.params))
    logger.write(f"jaxllm: task {cfg.task}, {n_params / 1e6:.1f}M params ({trained / 1e6:.2f}M trained), "
                 f"mesh {dict(mesh.shape)}, {jax.device_count()} {jax.devices()[0].platform} devices, "
                 f"{'resuming from step ' + str(start) if start else 'from scratch'}, run dir {cfg.trainer.run_dir}")


def train(cfg) -> dict:
    """Runs (or resumes) training; returns a summary with the initial and final losses."""
    cfg, tokenizer = run_lib.open_run(cfg)
    t = cfg.trainer
    trainer = Trainer(cfg, mesh_from_config(cfg.mesh))
    task = trainer.task
    ckpt = Checkpointer(t.run_dir, keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save) \
        if cfg.checkpoint.enabled else None
    initial_params = _initial_params_once(trainer)
    ctx = RunContext(t.run_dir, tokenizer, trainer.to_global, initial_params, _log_on_process_0, trainer=trainer,
                     load_run=run_lib.load_run)
    task.prepare(ctx)
    source, eval_sets = task.train_source(ctx), task.eval_sets(ctx)
    state, start = _restore_or_init(trainer, ckpt, source, initial_params)
    initial_params.clear()

    logger = MetricsLogger(t.run_dir, t.total_steps, progress_bar=cfg.logging.progress_bar,
                           tensorboard=cfg.logging.tensorboard, initial_step=start)
    _announce(logger, trainer, start)
    stages = StageTrainers(trainer, logger.write)
    summary = {"start_step": start}
    evaluate = Evaluator(eval_sets, logger, summary)
    if start == 0:
        evaluate(stages.at(0), state, 0, initial=True)
    steps = StepLogger(logger, summary, source.stats, every=cfg.logging.every_steps, total_steps=t.total_steps,
                       start=start, flops_per_token=cfg.model.flops_per_token(cfg.data.seq_len),
                       peak_tflops=peak_tflops_per_device(cfg.logging.peak_tflops_per_device))
    preemption = Preemption()
    step, exhausted = start, False
    try:
        while step < t.total_steps:
            try:
                batch = source.next(state)
            except StopIteration:  # a source with on_exhaust: stop ran out
                exhausted = True
                break
            current = stages.at(step)
            state, metrics = current.train_step(state, batch)
            step += 1
            steps.dispatched(step, metrics)
            stop = preemption.requested(step, cfg.logging.every_steps)
            do_eval = step % t.eval_every_steps == 0 or step == t.total_steps
            do_save = ckpt is not None and (step % cfg.checkpoint.every_steps == 0 or step == t.total_steps or stop)
            if do_eval or do_save:
                jax.block_until_ready(metrics)  # the step's own time stays in the step timing
                t0 = time.perf_counter()
                if do_eval:
                    evaluate(current, state, step)
                if do_save:
                    ckpt.save(step, state, source.get_state())
                steps.pause(time.perf_counter() - t0)
            if stop:
                steps.flush()
                logger.write(f"SIGTERM: saved a checkpoint at step {step}, exiting")
                if ckpt:
                    ckpt.wait()
                raise SystemExit(143)
        steps.flush()
        if exhausted:
            logger.write(f"data: a source with on_exhaust: stop ran out after step {step}; "
                         "evaluating, saving and ending the run")
            evaluate(stages.at(step), state, step)
            if ckpt is not None and ckpt.latest_step() != step:
                ckpt.save(step, state, source.get_state())
    finally:
        preemption.restore()
        if ckpt:
            ckpt.close()
        logger.close()

    summary["final_step"] = step
    if t.sample_tokens > 0 and task.samples_text:
        summary["sample"] = sample_text_at_end(stages.at(step), state, tokenizer)
    return summary

