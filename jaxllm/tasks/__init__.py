"""Training tasks and their registry: `make_task(cfg)` is the only place that picks a task by
`cfg.task`, and config validation reads the valid names and each task's own checks from here.

Adding a task: a module with a `Task` subclass (tasks/base.py says what it provides), one entry
in `TASKS`, and its config section in jaxllm/config.py if it needs one.
"""

from __future__ import annotations

from jaxllm.errors import ConfigError
from jaxllm.tasks.base import BatchSource, IteratorSource, RunContext, Task
from jaxllm.tasks.dpo import DPOTask
from jaxllm.tasks.pretrain import PretrainTask
from jaxllm.tasks.rating import EduTask, RaterTask
from jaxllm.tasks.reward import RewardTask
from jaxllm.tasks.rl import RLTask
from jaxllm.tasks.sft import SFTTask

TASKS: dict[str, type[Task]] = {t.name: t for t in (PretrainTask, SFTTask, DPOTask, RewardTask, RLTask, RaterTask,
                                                    EduTask)}


def task_class(name: str) -> type[Task]:
    if name not in TASKS:
        raise ConfigError(f"task: {name!r} is not one of {', '.join(TASKS)}")
    return TASKS[name]


def make_task(cfg) -> Task:
    """The task of `cfg.task` (a full Config)."""
    return task_class(cfg.task)(cfg)


def _tasks_with(predicate) -> str:
    names = [n for n, t in TASKS.items() if predicate(t)]
    return ", ".join(names[:-1]) + f" or {names[-1]}" if len(names) > 1 else names[0]


def validate(cfg) -> None:
    """The task-dependent config checks: a known task, run-length keys and mixtures it accepts,
    and the task's own `check_config`."""
    task = task_class(cfg.task)
    t, d = cfg.trainer, cfg.data
    if t.epochs > 0 and "epochs" not in task.length_keys:
        raise ConfigError(f"trainer.epochs is for task {_tasks_with(lambda c: 'epochs' in c.length_keys)}; "
                          f"for {'pretraining' if task.uses_mixtures else 'task ' + task.name} set trainer.total_steps")
    if t.total_tokens > 0 and "total_tokens" not in task.length_keys:
        raise ConfigError("trainer.total_tokens is for pretraining; post-training runs set trainer.epochs or total_steps")
    if (d.sources or d.stages) and not task.uses_mixtures:
        raise ConfigError(f"data.sources / data.stages: mixtures are for task "
                          f"{_tasks_with(lambda c: c.uses_mixtures)}, not {task.name}")
    task.check_config(cfg)


__all__ = ["TASKS", "BatchSource", "IteratorSource", "RunContext", "Task", "make_task", "task_class", "validate"]
