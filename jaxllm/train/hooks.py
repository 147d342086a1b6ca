"""The small pieces the host loop calls: stage switches, step logging, evaluation, preemption and
the sample at the end of a run. Each keeps its own state, so `loop.train` reads as the recipe.
"""

from __future__ import annotations

import dataclasses
import signal
import time

import jax
import numpy as np

from jaxllm.train.step import Trainer


class StageTrainers:
    """One compiled Trainer per model config a curriculum trains (a stage may change rope_theta)."""

    def __init__(self, base: Trainer, log):
        self.base, self.log = base, log
        self._by_model = {base.cfg.model: base}

    def at(self, step: int) -> Trainer:
        model = self.base.task.model_at(step)
        if model not in self._by_model:
            self.log(f"step {step}: stage model {model_overrides_text(self.base.cfg.model, model)}")
            self._by_model[model] = Trainer(dataclasses.replace(self.base.cfg, model=model), self.base.mesh)
        return self._by_model[model]


def model_overrides_text(old, new) -> str:
    return ", ".join(f"{f.name} {getattr(old, f.name)} -> {getattr(new, f.name)}"
                     for f in dataclasses.fields(old) if getattr(old, f.name) != getattr(new, f.name)) or "unchanged"


class StepLogger:
    """Logs step n-1's metrics after step n is dispatched, so logging never stalls the device.

    Step time excludes the first step (compilation) and the time spent in evaluation and
    checkpointing (`pause`); tokens/s and MFU follow from it.
    """

    def __init__(self, logger, summary: dict, stats, *, every: int, total_steps: int, start: int,
                 flops_per_token: float, peak_tflops: float | None):
        self.logger, self.summary, self.stats = logger, summary, stats
        self.every, self.total_steps = every, total_steps
        self.flops_per_token, self.peak = flops_per_token, peak_tflops
        self.pending = None  # (step, device metrics) of the step before the one in flight
        self.last_time, self.last_step, self.compiled = time.perf_counter(), start, False
        self.paused = 0.0

    def dispatched(self, step: int, metrics) -> None:
        """Called right after step `step` was dispatched with its (device) metrics."""
        if not self.compiled:
            jax.block_until_ready(metrics)
            self.compiled = True
            compile_s = time.perf_counter() - self.last_time
            self.last_time, self.last_step = time.perf_counter(), step
            self.logger.write(f"first step (with compilation) took {compile_s:.1f} s")
        if self.pending is not None:
            p_step, p_metrics = self.pending
            m = {k: float(v) for k, v in jax.device_get(p_metrics).items()}
            now = time.perf_counter()
            dt = (now - self.last_time - self.paused) / max(p_step - self.last_step, 1)
            m |= {"step_time_s": dt, "tokens_per_s": m["tokens"] / dt}
            if self.peak:
                m["mfu"] = self.flops_per_token * m["tokens"] / dt / (self.peak * 1e12 * jax.device_count())
            self.last_time, self.last_step, self.paused = now, p_step, 0.0
            self.summary["last_loss"] = m["loss"]
            self.logger.log(p_step, m | self.stats(p_step), advance=1)
            self.pending = None
        if step % self.every == 0 or step == self.total_steps:
            self.pending = (step, metrics)
        else:
            self.logger.advance(1)

    def pause(self, seconds: float) -> None:
        self.paused += seconds

    def flush(self) -> None:
        """Logs the pending step (without timing: nothing was dispatched after it)."""
        if self.pending is None:
            return
        m = {k: float(v) for k, v in jax.device_get(self.pending[1]).items()}
        self.summary["last_loss"] = m["loss"]
        self.logger.log(self.pending[0], m | self.stats(self.pending[0]), advance=1)
        self.pending = None


class Evaluator:
    """Evaluates the task's eval sets and logs them as one row (eval_<metric>, and
    eval_<metric>/<set> for named sets such as a mixture source's own eval files)."""

    def __init__(self, eval_sets: dict[str, list], logger, summary: dict):
        self.eval_sets, self.logger, self.summary = eval_sets, logger, summary

    def __call__(self, trainer: Trainer, state, step: int, *, initial: bool = False) -> dict:
        out = {}
        for name, batches in self.eval_sets.items():
            metrics = trainer.evaluate(state, batches)
            out |= metrics if not name else {f"{k}/{name}": v for k, v in metrics.items()}
        key = "initial" if initial else "final"
        self.summary[f"{key}_eval"] = out
        if "eval_loss" in out:
            self.summary[f"{key}_eval_loss"] = out["eval_loss"]
        self.logger.log(step, out)
        return out


class Preemption:
    """SIGTERM sets a flag; with several processes they agree on it, so all save the same step."""

    def __init__(self):
        self._flag = False
        self._old = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self._flag = True

    def requested(self, step: int, every: int) -> bool:
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


def sample_text_at_end(trainer: Trainer, state, tokenizer) -> str:
    """A sample from `trainer.sample_prompt` with the final params, sharded as in training (every
    process takes part; process 0 prints it)."""
    from jaxllm.generate import sample_text

    t = trainer.cfg.trainer
    params = trainer.effective(state.params, state.frozen)
    text = sample_text(trainer.cfg, params, tokenizer, t.sample_prompt, max_new_tokens=t.sample_tokens,
                       temperature=0.8, seed=t.seed, mesh=trainer.mesh)
    if jax.process_index() == 0:
        print(f"\n--- sample (prompt {t.sample_prompt!r}) ---\n{t.sample_prompt}{text}\n---", flush=True)
    return text
