"""`task: pretrain`: next-token loss on packed documents from a mixture of sources and stages.

The batches come from `jaxllm.data.pipeline.make_train_iterator` (named sources mixed by the
weights of the current curriculum stage); a stage that sets rope_theta changes the model from
its start on (`model_at`). Eval: data.eval, plus each source of data.sources that lists eval
files of its own (logged as eval_loss/<source> and eval_ppl/<source>).

With `data.dynamic_weights` (dynamic batch loading, Sheared-LLaMA) the batch source uses the
train state it is handed: when every_steps, 2 * every_steps, ... steps are done it evaluates the
current params on each source's fixed held-out batches (a jitted eval of this task's objective),
sets the mixture's weights to `softmax(log w_prev + max(loss - reference_loss, 0))` for the
batches from then on, and logs them (`weight/<source>` and `dynamic_loss/<source>` with every
logged step, a line per update). The weights and the last update's losses are part of the
source's state, so a resumed run continues with the same weights.
"""

from __future__ import annotations

import contextlib
import functools

import jax
import numpy as np

from jaxllm.data import curriculum, pipeline
from jaxllm.data.packing import packing_stats
from jaxllm.objectives import LMObjective
from jaxllm.parallel.mesh import activation_sharding
from jaxllm.tasks.base import IteratorSource, RunContext, Task


def _mixture_stats(iterator) -> dict:
    return dict(iterator.stats()) | {"padding_fraction": packing_stats(iterator)["padding_fraction"]}


class PretrainTask(Task):
    name = "pretrain"
    length_keys = ("total_tokens",)
    uses_mixtures = True
    reports_ppl = True

    def make_objective(self):
        return LMObjective(self.cfg.model, self.cfg.trainer.loss_chunk_size)

    def model_at(self, step: int):
        if not self.cfg.data.stages:
            return self.cfg.model
        return curriculum.model_config_at(self.cfg, step)

    def batch_sizes(self) -> dict[str, int]:
        stages = {f"data.stages[{s.index}].batch_size": s.batch_size for s in curriculum.stage_plan(self.cfg)}
        return super().batch_sizes() | stages

    def train_source(self, ctx: RunContext):
        iterator = pipeline.make_train_iterator(self.cfg, ctx.tokenizer)
        if self.cfg.data.dynamic_weights.enabled:
            return DynamicWeightsSource(self, ctx, iterator)
        return IteratorSource(iterator, ctx.to_global, _mixture_stats)

    def eval_sets(self, ctx: RunContext) -> dict[str, list[dict]]:
        n = self.cfg.trainer.eval_batches
        sets = {"": pipeline.make_eval_batches(self.cfg, ctx.tokenizer, n)}
        for name in pipeline.eval_source_names(self.cfg):
            sets[name] = pipeline.make_eval_batches(self.cfg, ctx.tokenizer, n, source_name=name)
        return sets


class DynamicWeightsSource:
    """The mixture's batches, reweighted by per-source held-out losses (see the module doc)."""

    def __init__(self, task: PretrainTask, ctx: RunContext, iterator):
        self.task, self.ctx, self.iterator = task, ctx, iterator
        dw = task.cfg.data.dynamic_weights
        self.names = list(iterator.names)
        self.reference = np.array([dw.reference_losses[n] for n in self.names], np.float64)
        # Global (sharded) held-out batches, made once: every update evaluates the same rows.
        self.eval_sets = [[ctx.to_global(b) for b in pipeline.make_eval_batches(
            task.cfg, ctx.tokenizer, dw.eval_batches, source_name=n)] for n in self.names]
        self.mesh = ctx.trainer.mesh if ctx.trainer is not None else None
        self._eval_fns: dict = {}  # model config (a curriculum stage may change it) -> jitted sums
        self.last: dict | None = None  # {"step", "losses"} of the last update

    def next(self, state) -> dict:
        if self.iterator.weight_update_due:
            self.update(state)
        return self.ctx.to_global(next(self.iterator))

    def update(self, state) -> np.ndarray:
        """Sets the weights of the batches from `iterator.step` on from the held-out losses of
        `state`'s params; returns them."""
        step = self.iterator.step
        losses = self.source_losses(state, step)
        before = np.asarray(self.iterator.next_weights())
        weights = curriculum.dynamic_weights_update(before, losses, self.reference)
        self.iterator.set_weights(weights)
        self.last = {"step": step, "losses": [float(x) for x in losses]}
        self.ctx.log(f"step {step}: data.dynamic_weights: " + ", ".join(
            f"{n} loss {l:.4f} (ref {r:.4f}) weight {a:.4f} -> {b:.4f}"
            for n, l, r, a, b in zip(self.names, losses, self.reference, before, weights)))
        return weights

    def source_losses(self, state, step: int) -> np.ndarray:
        """Per source: the objective's mean token loss over its held-out batches, with the
        model trained when `step` steps are done."""
        model = self.task.model_at(step)
        fn = self._eval_fns.get(model)
        if fn is None:
            objective = LMObjective(model, self.task.cfg.trainer.loss_chunk_size)
            fn = self._eval_fns[model] = jax.jit(functools.partial(self._loss_sums, objective))
        out = []
        for batches in self.eval_sets:
            sums = [jax.device_get(fn(state.params, state.frozen, b)) for b in batches]
            out.append(sum(float(s) for s, _ in sums) / max(sum(float(w) for _, w in sums), 1.0))
        return np.array(out, np.float64)

    def _loss_sums(self, objective, params, frozen, batch):
        with activation_sharding(self.mesh) if self.mesh is not None else contextlib.nullcontext():
            loss_sum, aux = objective.loss(self.task.effective_params(params, frozen), batch)
        return loss_sum, aux["weight"]

    def get_state(self) -> dict:
        return {"mixture": self.iterator.get_state(), "dynamic_last": self.last}

    def set_state(self, saved: dict) -> None:
        if "mixture" not in saved:
            raise ValueError("data iterator state was saved without data.dynamic_weights; a run cannot "
                             "turn dynamic weights on when it resumes")
        self.iterator.set_state(saved["mixture"])
        self.last = saved["dynamic_last"]

    def stats(self, step: int) -> dict:
        """The mixture's counters and the weights of the last batch made (`weight/<source>`),
        plus the held-out losses of the last update (`dynamic_loss/<source>`, `dynamic_step`)."""
        out = _mixture_stats(self.iterator)
        if self.last is not None:
            out["dynamic_step"] = self.last["step"]
            out |= {f"dynamic_loss/{n}": l for n, l in zip(self.names, self.last["losses"])}
        return out
