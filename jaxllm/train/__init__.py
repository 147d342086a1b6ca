"""Training shared by every task: `state.py` (TrainState, born sharded), `step.py` (the jitted
step and PPO-style multi-update), `hooks.py` + `loop.py` (the host loop), `cli.py`
(`python -m jaxllm.train --config X`)."""

from jaxllm.train.cli import check_runtime, configure
from jaxllm.train.loop import train
from jaxllm.train.state import TrainState
from jaxllm.train.step import Trainer

__all__ = ["Trainer", "TrainState", "check_runtime", "configure", "train"]
