"""Checkpoints with orbax: async save, keep the last K, exact resume, reshard on restore.

This module only wraps orbax; what a run directory holds besides checkpoints, and how to read a
run's params, is `jaxllm.run`.

A step directory holds three items: `params`, `train` (optimizer state, step, RNG) and `data`
(each process's data-iterator state as JSON). Orbax writes a step into a temporary directory and
renames it only once every item is complete (on an object store, `gs://`, it writes a
commit marker last), so `latest_step()` never returns a half-written checkpoint, even after
SIGKILL. Restoring takes target shardings, so a run can resume on a different number of devices
or processes and another mesh.

Integrity: a complete step can still be damaged later (bit rot, a disk that filled up). Before
reading arrays, `restore` compares the step's metadata (tree paths, shapes, dtypes) with the
run's state: a difference is `CheckpointMismatch` (the run's config changed); metadata or data
that cannot be read is `CheckpointUnreadable`, naming the step and the file. `set_aside(step)`
renames such a step to `<step>.unreadable`, out of orbax's sight, so the run can fall back to the
previous one (`train.loop`).
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from jaxllm import paths
from jaxllm.errors import UserError


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
            raise CheckpointMismatch(f"checkpoint {directory} has no data state for this process ({name}); "
                                     f"found {found}: was it written with a different number of processes?")
        try:
            return json.loads(path.read_text())
        except ValueError as e:
            raise CheckpointUnreadable(_step_of(directory), str(path), f"not valid JSON ({e})") from None

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


# ----------------------------------------------------------------------------- integrity


class CheckpointMismatch(UserError, ValueError):
    """A checkpoint whose arrays do not fit this run's state (another model or optimizer)."""


class CheckpointUnreadable(UserError):
    """A complete checkpoint with a file that cannot be read."""

    def __init__(self, step: int | None, file: str, reason: str):
        super().__init__(f"checkpoint step {step}: {file} cannot be read: {reason}")
        self.step, self.file, self.reason = step, file, reason


def _step_of(directory) -> int | None:
    m = re.search(r"/(\d+)/[^/]+/?$", str(directory))
    return int(m.group(1)) if m else None


# Errors of tensorstore / orbax that mean a file's bytes are bad, not that the code or the
# target is: truncated or corrupt data, a missing object, undecodable JSON.
_DATA_ERRORS = re.compile(r"DATA_LOSS|OUT_OF_RANGE|NOT_FOUND|Error reading|Error decoding|Unexpected end|"
                          r"checksum|JSONDecodeError|Expecting value|Unterminated string|Expecting .* delimiter")
_FILE_IN_ERROR = re.compile(r"(?:local file|file|object) \"([^\"]+)\"")


def _key_names(path) -> tuple[str, ...]:
    """A tree path as plain names ("opt_state", "0", "mu"): orbax stores tuples as lists and
    named tuples as dicts, so the key types differ from the live tree's."""
    return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def _leaves(tree) -> dict:
    return {_key_names(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def tree_differences(saved, target) -> list[str]:
    """Paths whose shape or dtype differ between a checkpoint's metadata tree and the target's
    abstract tree, and paths only one of them has."""
    a, b = _leaves(saved), _leaves(target)
    out = [f"{'/'.join(k)}: only in the checkpoint" for k in sorted(set(a) - set(b))]
    out += [f"{'/'.join(k)}: not in the checkpoint" for k in sorted(set(b) - set(a))]
    for k in sorted(set(a) & set(b)):
        sa, sb = tuple(a[k].shape), tuple(b[k].shape)
        if sa != sb or str(a[k].dtype) != str(b[k].dtype):
            out.append(f"{'/'.join(k)}: checkpoint {a[k].dtype}{list(sa)}, run {b[k].dtype}{list(sb)}")
    return out


def _broken_json(step_dir: epath.Path) -> tuple[str, str] | None:
    """(file, error) of the first JSON file of a step that does not parse, else None."""
    for p in map(epath.Path, paths.walk_files(str(step_dir))):
        if p.name in ("_METADATA", "_CHECKPOINT_METADATA", "_sharding") or p.parent.name == "array_metadatas" \
                or p.suffix == ".json":
            try:
                json.loads(p.read_text())
            except ValueError as e:
                return str(p), f"not valid JSON ({e})"
    return None


def _chain(e: BaseException) -> list[BaseException]:
    out = []
    while e is not None and e not in out:
        out.append(e)
        e = e.__cause__ or e.__context__
    return out


def _unreadable(step: int, step_dir: epath.Path, e: Exception) -> CheckpointUnreadable | None:
    """The CheckpointUnreadable that error `e` (or one it was raised from) shows, else None."""
    if isinstance(e, CheckpointUnreadable):
        return e
    data_error = next((x for x in _chain(e) if _DATA_ERRORS.search(f"{type(x).__name__}: {x}")), None)
    if data_error is None:
        return None
    broken = _broken_json(step_dir)
    if broken:
        return CheckpointUnreadable(step, *broken)
    text = str(data_error)
    reason = re.sub(r"\s*\[tensorstore_spec.*", "", text.strip().splitlines()[0] if text.strip() else "")[:300]
    files = _FILE_IN_ERROR.findall(text)
    file = files[-1] if files else str(step_dir)
    size = re.search(r"value of size (\d+)", text)
    if size and file.endswith("/"):  # an OCDBT database read past the end of one of its files
        short = [p for p in paths.walk_files(file) if paths.size_and_mtime(p)[0] == int(size.group(1))]
        file = short[0] if len(short) == 1 else file
    return CheckpointUnreadable(step, file, reason or type(data_error).__name__)


# ----------------------------------------------------------------------------- the manager


class Checkpointer:
    """A thin wrapper over `ocp.CheckpointManager` for one run directory."""

    def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
        self.directory = paths.join(paths.resolve(directory), "checkpoints")
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                               create=True, cleanup_tmp_directories=True)
        handlers = {"params": ocp.StandardCheckpointHandler(), "train": ocp.StandardCheckpointHandler(),
                    "data": DataStateHandler()}  # known up front, so item_metadata can read each item
        self._mngr = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

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

    def restore(self, step: int, abstract_state, *, data: bool = True):
        """(state, data state or None) of `step`, restored onto the shardings in
        `abstract_state` (ShapeDtypeStructs with `.sharding`). Raises CheckpointMismatch when
        the step's trees differ from the run's, CheckpointUnreadable when a file is damaged."""
        a = abstract_state
        target = {"params": a.params, "train": {"opt_state": a.opt_state, "step": a.step, "rng": a.rng}}
        step_dir = epath.Path(self.directory) / str(step)
        try:
            meta = self._mngr.item_metadata(step)
            saved = {k: getattr(meta[k], "tree", meta[k]) for k in target}
        except Exception as e:  # orbax raises many types for a damaged metadata file
            raise _unreadable(step, step_dir, e) or e
        wrong = tree_differences(saved, target)
        if wrong:
            raise CheckpointMismatch(f"checkpoint {step_dir} does not match this run's model or optimizer: "
                                     f"{'; '.join(wrong[:6])}{' ...' if len(wrong) > 6 else ''}")
        items = {k: ocp.args.StandardRestore(v) for k, v in target.items()}
        if data:
            items["data"] = DataStateRestore()
        try:
            out = self._mngr.restore(step, args=ocp.args.Composite(**items))
        except CheckpointMismatch:
            raise
        except Exception as e:
            raise _unreadable(step, step_dir, e) or e
        train = out["train"]
        state = type(abstract_state)(step=train["step"], params=out["params"],
                                     opt_state=train["opt_state"], rng=train["rng"])
        return state, (out["data"] if data else None)

    def set_aside(self, step: int) -> str:
        """Renames an unreadable step to `<step>.unreadable` (every process calls this; process
        0 renames) and rescans the steps; returns the new path."""
        src = paths.join(self.directory, str(step))
        dst = f"{src}.unreadable"
        _sync(f"jaxllm_set_aside_{step}_before")
        if jax.process_index() == 0:
            paths.rename(src, dst)
        _sync(f"jaxllm_set_aside_{step}_after")
        self._mngr.reload()
        return dst

    def restore_params(self, step: int, abstract_params):
        out = self._mngr.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract_params)))
        return out["params"]

    def wait(self) -> None:
        self._mngr.wait_until_finished()

    def close(self) -> None:
        self._mngr.wait_until_finished()
        self._mngr.close()


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


# ----------------------------------------------------------------------------- params-only checkpoints


def save_params_only(params, directory: str) -> None:
    """Writes `params` as step 0 of a params-only checkpoint directory (read back with
    `Checkpointer(...).restore_params(0, ...)`, as `jaxllm.run.load_run` does)."""
    mngr = ocp.CheckpointManager(paths.resolve(directory),
                                 options=ocp.CheckpointManagerOptions(enable_async_checkpointing=False),
                                 item_names=("params",))
    mngr.save(0, args=ocp.args.Composite(params=ocp.args.StandardSave(params)), force=True)
    mngr.wait_until_finished()
    mngr.close()
