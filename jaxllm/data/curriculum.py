"""Curricula: `data.stages` resolved into a plan of stages, and the stage in effect at a step.

A stage sets the mixture weights of the named sources (`data.sources`; without them `data.train`
is the one source "train") and optionally seq_len, batch_size and rope_theta from its start on.
Stages start at a step or at a number of training tokens (each step is its stage's
batch_size * seq_len tokens). Every inconsistency is a `ConfigError` naming the key.

`data.dynamic_weights` (dynamic batch loading, Xia et al. 2024, Sheared-LLaMA) lets the weights
move during a stage: every `every_steps` steps the pretraining task measures each source's
held-out loss with the current params and sets `w = softmax(log w_prev + max(loss - ref, 0))`
(`dynamic_weights_update`); a stage's start resets the weights to that stage's own.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Literal

import numpy as np

from jaxllm.errors import ConfigError
from jaxllm.frozendict import FrozenDict


# Source names appear in metric keys (tokens/<name>) and in stage weights.
_SOURCE_NAME = r"[A-Za-z0-9][A-Za-z0-9_.\-]*"


@dataclasses.dataclass(frozen=True)
class SourceConfig:
    """One named source of a pretraining data mixture (`data.sources`)."""

    name: str = ""
    # Files, folders, globs or built-in specs, as in data.train; eval: optional held-out ones
    # (pipeline.make_eval_batches(..., source=name)).
    train: tuple[str, ...] = ()
    eval: tuple[str, ...] = ()
    text_field: str | None = None  # None: data.text_field
    # repeat: start the next epoch (reshuffled); stop: the mixture ends when this source runs out.
    on_exhaust: Literal["repeat", "stop"] = "repeat"

    def __post_init__(self):
        if not re.fullmatch(_SOURCE_NAME, self.name):
            raise ValueError(f"name {self.name!r} must be letters, digits, '_', '-' or '.', starting "
                             "with a letter or digit (it names metrics)")
        if not self.train:
            raise ValueError(f"train: source {self.name!r} lists no files")


@dataclasses.dataclass(frozen=True)
class StageConfig:
    """One stage of a pretraining curriculum (`data.stages`), in effect from its start on."""

    name: str = ""
    # Where the stage begins: a step, or a number of training tokens (batch_size * seq_len per
    # step, converted with the stages before it). The first stage begins at step 0.
    start_step: int | None = None
    start_tokens: int | None = None
    # Source name -> weight (>= 0; normalised): the expected share of the stage's rows (= tokens).
    # May be left out when there is one source.
    weights: dict[str, float] = dataclasses.field(default_factory=FrozenDict)
    seq_len: int | None = None  # None: data.seq_len
    batch_size: int | None = None  # None: trainer.batch_size (global rows)
    rope_theta: float | None = None  # None: model.rope_theta

    def __post_init__(self):
        if self.start_step is not None and self.start_tokens is not None:
            raise ValueError("give start_step or start_tokens, not both")
        for key in ("start_step", "start_tokens"):
            if getattr(self, key) is not None and getattr(self, key) < 0:
                raise ValueError(f"{key} must be >= 0, got {getattr(self, key)}")
        for k, w in self.weights.items():
            if not (math.isfinite(w) and w >= 0):
                raise ValueError(f"weights.{k} must be a finite number >= 0, got {w}")
        if self.weights and not sum(self.weights.values()) > 0:
            raise ValueError("weights: at least one weight must be > 0")
        for key in ("seq_len", "batch_size", "rope_theta"):
            if getattr(self, key) is not None and not getattr(self, key) > 0:
                raise ValueError(f"{key} must be > 0, got {getattr(self, key)}")


@dataclasses.dataclass(frozen=True)
class DynamicWeightsConfig:
    """Dynamic batch loading (`data.dynamic_weights`): source weights updated during the run
    from per-source held-out losses against reference losses (jaxllm.tasks.pretrain)."""

    every_steps: int = 0  # m: update the weights when m, 2m, ... steps are done; 0: off
    # Source name -> the loss the run should reach on that source's eval files (Sheared-LLaMA:
    # the source model's loss, or a scaling-law prediction for the target size).
    reference_losses: dict[str, float] = dataclasses.field(default_factory=FrozenDict)
    eval_batches: int = 1  # fixed held-out batches (trainer.batch_size rows) per source per update

    def __post_init__(self):
        if self.every_steps < 0:
            raise ValueError(f"every_steps must be >= 0 (0: off), got {self.every_steps}")
        if self.eval_batches < 1:
            raise ValueError(f"eval_batches must be >= 1, got {self.eval_batches}")
        for k, v in self.reference_losses.items():
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"reference_losses.{k} must be a finite number >= 0, got {v}")

    @property
    def enabled(self) -> bool:
        return self.every_steps > 0


def dynamic_weights_update(weights, losses, reference_losses) -> np.ndarray:
    """Sheared-LLaMA's update: Delta = max(loss - ref, 0), w = softmax(log w_prev + Delta).

    float64 throughout; a source at weight 0 stays at 0 (log 0 = -inf)."""
    w = np.asarray(weights, np.float64)
    delta = np.maximum(np.asarray(losses, np.float64) - np.asarray(reference_losses, np.float64), 0.0)
    with np.errstate(divide="ignore"):
        alpha = np.log(w / w.sum()) + delta
    alpha -= alpha.max()
    out = np.exp(alpha)
    return out / out.sum()


@dataclasses.dataclass(frozen=True)
class Stage:
    """One curriculum stage, resolved: `stage_plan(cfg)[i]`."""

    index: int
    name: str
    start_step: int  # the first step (state.step before it) that trains on this stage's batches
    weights: tuple[float, ...]  # per source of `mixture_sources`, in order, summing to 1
    seq_len: int
    batch_size: int  # global rows per step
    rope_theta: float | None  # None: model.rope_theta unchanged


def mixture_sources(data) -> tuple[SourceConfig, ...]:
    """`data.sources`, or the one implicit source "train" made of data.train."""
    return data.sources or (SourceConfig(name="train", train=data.train, text_field=data.text_field),)


def stage_plan(cfg) -> tuple[Stage, ...]:
    """`data.stages` resolved: start steps (start_tokens converted), normalised weights, shapes.

    Raises ConfigError naming the key of anything inconsistent.
    """
    d = cfg.data
    names = [s.name for s in mixture_sources(d)]
    if not d.stages and len(names) > 1:
        raise ConfigError(f"data.stages: required with more than one source in data.sources ({', '.join(names)}); "
                          "give the stages' weights")
    out: list[Stage] = []
    tokens_at_start = 0  # tokens (batch_size * seq_len per step) before the stage's start
    for i, st in enumerate(d.stages or (StageConfig(),)):
        key = f"data.stages[{i}]"
        for k in st.weights:
            if k not in names:
                raise ConfigError(f"{key}.weights.{k}: no such source; data.sources names: {', '.join(names)}")
        if not st.weights and len(names) > 1:
            raise ConfigError(f"{key}.weights: required with more than one source ({', '.join(names)})")
        raw = [st.weights.get(n, 0.0) for n in names] if st.weights else [1.0]
        weights = tuple(w / sum(raw) for w in raw)
        if i == 0:
            if st.start_step or st.start_tokens:
                raise ConfigError(f"{key}: the first stage starts at step 0 (got start_step "
                                  f"{st.start_step}, start_tokens {st.start_tokens})")
            start = 0
        else:
            prev = out[-1]
            per_step = prev.batch_size * prev.seq_len
            if st.start_step is not None:
                start = st.start_step
            elif st.start_tokens is not None:
                if st.start_tokens <= tokens_at_start:
                    raise ConfigError(f"{key}.start_tokens ({st.start_tokens}) must be after the start of "
                                      f"data.stages[{i - 1}] ({tokens_at_start} tokens)")
                start = prev.start_step + -(-(st.start_tokens - tokens_at_start) // per_step)
            else:
                raise ConfigError(f"{key}: set start_step or start_tokens")
            if start <= prev.start_step:
                raise ConfigError(f"{key}.start_step ({start}) must be after the start of "
                                  f"data.stages[{i - 1}] (step {prev.start_step})")
            tokens_at_start += (start - prev.start_step) * per_step
        out.append(Stage(index=i, name=st.name or f"stage{i}", start_step=start, weights=weights,
                         seq_len=st.seq_len or d.seq_len, batch_size=st.batch_size or cfg.trainer.batch_size,
                         rope_theta=st.rope_theta))
    return tuple(out)


def validate_dynamic_weights(cfg) -> None:
    """data.dynamic_weights: several named sources, each with eval files and a reference loss."""
    d, dw = cfg.data, cfg.data.dynamic_weights
    key = "data.dynamic_weights"
    if not dw.enabled:
        if dw.reference_losses:
            raise ConfigError(f"{key}.reference_losses is set but {key}.every_steps is 0 (off)")
        return
    names = [s.name for s in d.sources]
    if len(names) < 2:
        raise ConfigError(f"{key}: reweighting needs at least two sources in data.sources (has {len(names)})")
    for k in dw.reference_losses:
        if k not in names:
            raise ConfigError(f"{key}.reference_losses.{k}: no such source; data.sources names: {', '.join(names)}")
    for i, s in enumerate(d.sources):
        if s.name not in dw.reference_losses:
            raise ConfigError(f"{key}.reference_losses: no reference loss for source {s.name!r}")
        if not s.eval:
            raise ConfigError(f"data.sources[{i}].eval: {key} measures every source's held-out loss; "
                              f"source {s.name!r} lists no eval files")


def validate_mixture(cfg) -> None:
    d = cfg.data
    validate_dynamic_weights(cfg)
    if not (d.sources or d.stages):
        return
    seen = set()
    for i, s in enumerate(d.sources):
        if s.name in seen:
            raise ConfigError(f"data.sources[{i}].name: {s.name!r} names two sources")
        seen.add(s.name)
    for st in stage_plan(cfg):
        key = f"data.stages[{st.index}]"
        if st.batch_size % cfg.trainer.grad_accum_steps:
            raise ConfigError(f"{key}.batch_size ({st.batch_size}) must be divisible by "
                              f"trainer.grad_accum_steps ({cfg.trainer.grad_accum_steps})")
        if st.seq_len > cfg.model.max_seq_len:
            raise ConfigError(f"{key}.seq_len ({st.seq_len}) exceeds model.max_seq_len ({cfg.model.max_seq_len})")


def stage_at(cfg, step: int) -> tuple[int, Stage]:
    """(index, stage) of the batch trained when `step` steps are done (state.step before it)."""
    plan = stage_plan(cfg)
    i = stage_index(plan, step)
    return i, plan[i]


def model_overrides(stage: Stage) -> dict[str, Any]:
    """The model fields a stage changes: `dataclasses.replace(cfg.model, **model_overrides(stage))`."""
    return {} if stage.rope_theta is None else {"rope_theta": stage.rope_theta}


def model_config_at(cfg, step: int):
    """cfg.model with the overrides of the stage trained when `step` steps are done (e.g. the
    model a finished run has trained: `model_config_at(cfg, cfg.trainer.total_steps)`)."""
    return dataclasses.replace(cfg.model, **model_overrides(stage_at(cfg, step)[1]))


def stage_index(plan: tuple[Stage, ...], step: int) -> int:
    """The index of the stage in effect when `step` steps are done."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return max(s.index for s in plan if s.start_step <= step)


def steps_for_tokens(cfg, total_tokens: int) -> int:
    """The steps that train `total_tokens` tokens through the stages (trainer.total_tokens)."""
    plan = stage_plan(cfg)
    before_last = sum((b.start_step - a.start_step) * a.batch_size * a.seq_len for a, b in zip(plan, plan[1:]))
    last = plan[-1]
    if total_tokens <= before_last:
        raise ConfigError(f"trainer.total_tokens ({total_tokens}) ends before data.stages[{last.index}] "
                          f"starts ({before_last} tokens in)")
    return last.start_step + -(-(total_tokens - before_last) // (last.batch_size * last.seq_len))
