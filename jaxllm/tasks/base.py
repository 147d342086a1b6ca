"""The task interface: what differs between pretraining, SFT, DPO, reward models (and RL).

A task names its config section, builds its objective, says which params it adds (a reward head)
and which frozen trees it needs (a live reference), makes the train batch source and the fixed
eval batches, and turns evaluation sums into metrics. The loop, the step, sharding,
checkpointing and logging (`jaxllm.train`) are shared by every task and never look at its name.

A run's checkpoint holds the trainable params, the optimizer state, the step, the RNG and the
batch source's state (`get_state`); frozen trees are rebuilt from the config (seed init or
`model.init_from`), so they are never saved.

A batch source is asked for each step's batch with the current train state, so an on-policy
source (RL) can sample from the current policy; an offline source ignores it.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, Callable, ClassVar, Iterator, Protocol

import jax
import numpy as np

from jaxllm.models import init_params, param_axes
from jaxllm.optim import make_optimizer
from jaxllm.tasks import params as params_lib


class BatchSource(Protocol):
    def next(self, state) -> dict:
        """The batch for the step after `state`, as global (sharded) arrays; StopIteration when
        the data ends (a mixture source with on_exhaust: stop)."""

    def get_state(self) -> dict:
        """JSON-able position, saved with each checkpoint."""

    def set_state(self, saved: dict) -> None: ...

    def stats(self, step: int) -> dict:
        """Numbers logged with step `step`'s metrics (tokens per source, rewards, ...); asked
        when that step is logged, after the next batch was made."""


class IteratorSource:
    """A BatchSource over an offline iterator of per-process numpy batches; ignores the state."""

    def __init__(self, iterator: Iterator[dict], to_global: Callable[[dict], dict],
                 stats: Callable[[Any], dict] | None = None):
        self.iterator, self.to_global, self._stats = iterator, to_global, stats

    def next(self, state) -> dict:
        return self.to_global(next(self.iterator))

    def get_state(self) -> dict:
        return self.iterator.get_state()

    def set_state(self, saved: dict) -> None:
        self.iterator.set_state(saved)

    def stats(self, step: int) -> dict:
        """The iterator's running counters (so far, including the batch made after `step`)."""
        return self._stats(self.iterator) if self._stats else {}


@dataclasses.dataclass(frozen=True)
class RunContext:
    """What a task may use of the run it is part of (built by the train loop)."""

    run_dir: str
    tokenizer: Any
    to_global: Callable[[dict], dict]  # per-process numpy rows -> global arrays sharded over batch
    initial_params: Callable[[], dict]  # the run's model params before step 1 (sharded, built once)
    log: Callable[[str], None] = print
    trainer: Any = None  # the compiled train.step.Trainer (mesh, effective params), for on-policy sources
    load_run: Callable[[str], tuple] | None = None  # jaxllm.run.load_run, for tasks that read other runs


class Task(abc.ABC):
    """One training task. Subclasses set the class attributes and implement the abstract methods."""

    name: ClassVar[str]
    section: ClassVar[str | None] = None  # the config section it reads (cfg.<section>)
    # Run-length keys it accepts besides trainer.total_steps: "epochs" (counted passes over
    # data.train) and/or "total_tokens" (through the curriculum's stages).
    length_keys: ClassVar[tuple[str, ...]] = ()
    uses_mixtures: ClassVar[bool] = False  # data.sources / data.stages
    samples_text: ClassVar[bool] = True  # a run ends with a text sample from trainer.sample_prompt
    reports_ppl: ClassVar[bool] = False  # eval_ppl from the per-token NLL
    # Optimizer updates per step: epochs over each batch, cut into mini-batches (PPO-style RL
    # makes several; every other task one).
    update_epochs: int = 1
    mini_batches: int = 1
    # Each mini-batch is updated once per entry, with the batch field it names as the loss mask
    # ("" keeps loss_mask): Lopti updates the low-probability tokens, then the others.
    update_passes: tuple[str, ...] = ("",)
    # Whether `edit_initial_params` changes the run's initial params (e.g. a critic's init).
    edits_initial_params: ClassVar[bool] = False

    def __init__(self, cfg):
        self.cfg = cfg
        self.objective = self.make_objective()

    @classmethod
    def updates_per_step(cls, cfg) -> int:
        """Optimizer updates per step (what the LR schedule counts)."""
        return 1

    @classmethod
    def check_config(cls, cfg) -> None:
        """Task-specific config checks (ConfigError); the registry's `validate` calls it."""

    @abc.abstractmethod
    def make_objective(self):
        """The task's `jaxllm.objectives` objective."""

    @property
    def live_reference(self) -> bool:
        """Whether each step evaluates a frozen reference model (DPO with reference: live)."""
        return False

    # ------------------------------------------------------------------ params

    def init_model_params(self, rng) -> dict:
        k_model, k_extra = jax.random.split(rng)
        return init_params(self.cfg.model, k_model) | self.objective.extra_params(self.cfg.model, k_extra)

    def model_param_axes(self) -> dict:
        return param_axes(self.cfg.model) | self.objective.extra_param_axes(self.cfg.model)

    def init_trainable(self, model_params: dict, rng) -> dict:
        return params_lib.init_trainable(self.cfg.lora, self.cfg.model, model_params, rng)

    def trainable_axes(self, abstract_trainable: dict) -> dict:
        return params_lib.trainable_axes(self.cfg.lora, self.cfg.model, self.model_param_axes(), abstract_trainable)

    def frozen_params(self, model_params: dict) -> dict:
        return params_lib.frozen_params(self.cfg.lora, self.cfg.model, model_params, self.live_reference)

    def effective_params(self, trainable: dict, frozen: dict, rng=None, deterministic: bool = True) -> dict:
        return params_lib.effective_params(self.cfg.lora, trainable, frozen, rng, deterministic)

    def reference_params(self, frozen: dict, trainable: dict) -> dict | None:
        return params_lib.reference_params(self.cfg.lora, frozen, trainable, self.live_reference)

    def decay_mask(self):
        return params_lib.decay_mask(self.cfg.lora)

    def make_optimizer(self, schedule, total_updates: int):
        """The optimizer of the trainable params (one AdamW; a task with a critic adds its own)."""
        return make_optimizer(self.cfg.optimizer, schedule, decay_mask=self.decay_mask())

    def edit_initial_params(self, host_params: dict, load_run) -> dict:
        """The run's initial model params (host, after model.init_from) as the task wants them."""
        return host_params

    # ------------------------------------------------------------------ models and shapes

    def model_at(self, step: int):
        """The model config trained when `step` steps are done (a curriculum may change it)."""
        return self.cfg.model

    def batch_sizes(self) -> dict[str, int]:
        """Global batch sizes by config key, for the runtime divisibility checks."""
        return {"trainer.batch_size": self.cfg.trainer.batch_size}

    # ------------------------------------------------------------------ data

    def prepare(self, ctx: RunContext) -> None:
        """Work before the data sources exist (e.g. a cached reference pass)."""

    @abc.abstractmethod
    def train_source(self, ctx: RunContext) -> BatchSource:
        """The source of each step's training batch."""

    @abc.abstractmethod
    def eval_sets(self, ctx: RunContext) -> dict[str, list[dict]]:
        """Fixed per-process eval batches by set name; "" is the main set (data.eval)."""

    def batches_per_epoch(self, tokenizer) -> dict[str, int]:
        """{"batches", "rows", "skipped"} of one pass over data.train, for tasks whose
        `length_keys` hold "epochs" (config validation keeps the others from asking)."""
        raise TypeError(f"task {self.name} does not count epochs")

    # ------------------------------------------------------------------ metrics

    def evaluate(self, trainer, state, batches) -> dict[str, float]:
        """Eval metrics (keyed eval_<name>) of one eval set: by default the objective's loss and
        statistics over the fixed batches (`Trainer.loss_metrics`)."""
        return trainer.loss_metrics(state, batches)

    def eval_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        """Finalized eval metrics -> what is logged, without the eval_ prefix."""
        if self.reports_ppl:  # per-token NLL (sft's loss may be a sum or add unlikelihood)
            metrics = metrics | {"ppl": float(np.exp(min(metrics.get("nll", metrics["loss"]), 50.0)))}
        return metrics
