"""Checkpoints with orbax: async save, keep the last K, exact resume, reshard on restore.

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


# ----------------------------------------------------------------------------- params-only access


def _abstract(fn, sharding=None):
    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), jax.eval_shape(fn))


def _abstract_params(model_cfg, sharding=None):
    """Abstract decoder params (no objective extras, no adapters)."""
    from jaxllm.models import init_params

    return _abstract(lambda: init_params(model_cfg, jax.random.PRNGKey(0)), sharding)


def load_run(run_dir: str, step: int | None = None):
    """(Config, model params) of the newest complete checkpoint of a run (or of `save_params`
    output). Model params include objective extras (a reward head); a LoRA run's adapters are
    folded into its base model (rebuilt from the run's config)."""
    from jaxllm import params as params_lib
    from jaxllm.config import load_config

    cfg_path = os.path.join(run_dir, "config.yaml")
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"{run_dir} has no config.yaml: not a jaxllm run directory")
    cfg = load_config(cfg_path)
    ckpt = Checkpointer(run_dir, async_save=False)
    step = ckpt.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"{ckpt.directory} holds no complete checkpoint")
    if cfg.data.stages:  # the model of the stage the checkpoint was saved in
        from jaxllm.data.curriculum import model_config_at

        cfg = dataclasses.replace(cfg, model=model_config_at(cfg, step))
    keys = params_lib.run_keys(cfg)

    def abstract_trainable():
        return params_lib.init_trainable(cfg, params_lib.init_model_params(cfg, keys.model), keys.adapters)

    trainable = ckpt.restore_params(step, _abstract(abstract_trainable))
    ckpt.close()
    if not params_lib.uses_lora(cfg):
        return cfg, trainable
    model = params_lib.initial_model_params(cfg)
    return cfg, params_lib.effective_params(cfg, trainable, params_lib.frozen_params(cfg, model))


def load_params(run_dir: str, step: int | None = None):
    """(ModelConfig, params) of a run's newest complete checkpoint."""
    cfg, params = load_run(run_dir, step)
    return cfg.model, params


def save_params(model_cfg, params, out_dir: str, cfg=None) -> None:
    """Writes a params-only checkpoint (step 0) plus config.yaml, loadable by `load_run`."""
    from jaxllm.config import Config, dump_yaml

    os.makedirs(out_dir, exist_ok=True)
    cfg = cfg or Config()
    # A params directory holds whole params (adapters folded in) and has no curriculum: its
    # model is `model_cfg` at every step.
    cfg = dataclasses.replace(cfg, model=model_cfg, lora=type(cfg.lora)(),
                              data=dataclasses.replace(cfg.data, sources=(), stages=()))
    dump_yaml(cfg, os.path.join(out_dir, "config.yaml"))
    mngr = ocp.CheckpointManager(os.path.abspath(os.path.join(out_dir, "checkpoints")),
                                 options=ocp.CheckpointManagerOptions(enable_async_checkpointing=False),
                                 item_names=("params",))
    mngr.save(0, args=ocp.args.Composite(params=ocp.args.StandardSave(params)), force=True)
    mngr.wait_until_finished()
    mngr.close()


def load_init_params(model_cfg, path: str, extra_keys: tuple[str, ...] = ()):
    """Host params for `model.init_from`, checked against `model_cfg`'s shapes. Top-level
    `extra_keys` (an objective's own params, e.g. a reward head) may be present or not."""
    from jaxllm.models import param_shapes

    path = os.path.expanduser(path)
    if os.path.exists(os.path.join(path, "config.json")):
        from jaxllm.models.hf import load_hf_checkpoint

        _, params = load_hf_checkpoint(path)
    elif os.path.exists(os.path.join(path, "config.yaml")):
        _, params = load_run(path)
    else:
        raise FileNotFoundError(f"model.init_from: {path} is neither a jaxllm run/params directory "
                                "(config.yaml) nor a Hugging Face directory (config.json)")
    want = jax.tree_util.tree_flatten_with_path(param_shapes(model_cfg), is_leaf=lambda x: isinstance(x, tuple))[0]
    got = dict(jax.tree_util.tree_flatten_with_path(params)[0])
    wrong = [f"{jax.tree_util.keystr(k)}: expected {shape}, found {'missing' if k not in got else tuple(got[k].shape)}"
             for k, shape in want if k not in got or tuple(got[k].shape) != tuple(shape)]
    known = {k for k, _ in want}
    extra = sorted(jax.tree_util.keystr(k) for k in set(got) - known if k[0].key not in extra_keys)
    if wrong or extra:
        raise ValueError(f"model.init_from {path} does not match the model config: "
                         + "; ".join(wrong + [f"{e}: unexpected" for e in extra]))
    return params
