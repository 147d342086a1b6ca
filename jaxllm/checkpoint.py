"""Checkpoints with orbax: async save, keep the last K, exact resume, reshard on restore.

This module only wraps orbax; what a run directory holds besides checkpoints, and how to read a
run's params, is `jaxllm.run`.

A step directory holds three items: `params`, `train` (optimizer state, step, RNG) and `data`
(each process's data-iterator state as JSON). Orbax writes a step into a temporary directory and
renames it only once every item is complete, so `latest_step()` never returns a half-written
checkpoint, even after SIGKILL. Restoring takes target shardings, so a run can resume on a
different number of devices.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath


# ----------------------------------------------------------------------------- per-process data state


class DataStateHandler(ocp.CheckpointHandler):
    """Stores one JSON file per process: every host's data iterator is at its own position."""

    def save(self, directory: epath.Path, args: "DataStateSave"):
        name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        (directory / name).write_text(json.dumps(args.state))

    def restore(self, directory: epath.Path, args: "DataStateRestore" = None):
        name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        path = directory / name
        if not path.exists():
            found = sorted(p.name for p in directory.iterdir())
            raise ValueError(f"checkpoint {directory} has no data state for this process ({name}); "
                             f"found {found}: was it written with a different number of processes?")
        return json.loads(path.read_text())

    def metadata(self, directory):
        return None

    def structure(self, directory):
        return None

    def finalize(self, directory):
        pass

    def close(self):
        pass


@ocp.args.register_with_handler(DataStateHandler, for_save=True)
@dataclasses.dataclass
class DataStateSave(ocp.args.CheckpointArgs):
    state: Any


@ocp.args.register_with_handler(DataStateHandler, for_restore=True)
@dataclasses.dataclass
class DataStateRestore(ocp.args.CheckpointArgs):
    pass


# ----------------------------------------------------------------------------- the manager


class Checkpointer:
    """A thin wrapper over `ocp.CheckpointManager` for one run directory."""

    def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(os.path.join(directory, "checkpoints"))
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                               create=True, cleanup_tmp_directories=True)
        self._mngr = ocp.CheckpointManager(self.directory, options=options,
                                           item_names=("params", "train", "data"))

    def latest_step(self) -> int | None:
        return self._mngr.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._mngr.all_steps())

    def save(self, step: int, state, data_state: dict | None) -> None:
        """Starts an async save of `state` (a TrainState) and a snapshot of the data state."""
        items = {"params": ocp.args.StandardSave(state.params),
                 "train": ocp.args.StandardSave({"opt_state": state.opt_state, "step": state.step,
                                                 "rng": state.rng}),
                 "data": DataStateSave(data_state or {})}
        self._mngr.save(step, args=ocp.args.Composite(**items), force=True)

    def restore(self, step: int, abstract_state):
        """Restores onto the shardings in `abstract_state` (ShapeDtypeStructs with `.sharding`)."""
        a = abstract_state
        args = ocp.args.Composite(
            params=ocp.args.StandardRestore(a.params),
            train=ocp.args.StandardRestore({"opt_state": a.opt_state, "step": a.step, "rng": a.rng}),
            data=DataStateRestore())
        try:
            out = self._mngr.restore(step, args=args)
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"checkpoint {self.directory}/{step} does not match this run's model or "
                             f"optimizer: {str(e).splitlines()[0]}") from e
        train = out["train"]
        state = type(abstract_state)(step=train["step"], params=out["params"],
                                     opt_state=train["opt_state"], rng=train["rng"])
        return state, out["data"]

    def restore_params(self, step: int, abstract_params):
        out = self._mngr.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract_params)))
        return out["params"]

    def wait(self) -> None:
        self._mngr.wait_until_finished()

    def close(self) -> None:
        self._mngr.wait_until_finished()
        self._mngr.close()


# ----------------------------------------------------------------------------- params-only checkpoints


def save_params_only(params, directory: str) -> None:
    """Writes `params` as step 0 of a params-only checkpoint directory (read back with
    `Checkpointer(...).restore_params(0, ...)`, as `jaxllm.run.load_run` does)."""
    mngr = ocp.CheckpointManager(os.path.abspath(directory),
                                 options=ocp.CheckpointManagerOptions(enable_async_checkpointing=False),
                                 item_names=("params",))
    mngr.save(0, args=ocp.args.Composite(params=ocp.args.StandardSave(params)), force=True)
    mngr.wait_until_finished()
    mngr.close()
