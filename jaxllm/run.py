"""Run directories: what a run writes besides its checkpoints, and how other tools read a run.

    RUN_DIR/config.yaml        the resolved config (total_steps from epochs / total_tokens)
    RUN_DIR/tokenizer.model    (or tokenizer.json) the run's own copy of its tokenizer
    RUN_DIR/metrics.jsonl      one JSON object per logged step (`jaxllm.metrics`)
    RUN_DIR/epoch_size.json    the counted batches of one epoch (trainer.epochs), with what they depend on
    RUN_DIR/checkpoints/       orbax steps (`jaxllm.checkpoint`)

`load_run` gives a run's (config, model params) at its newest complete checkpoint, with LoRA
adapters folded into the base and a curriculum's model at that step; `save_params` writes a
params-only directory that `load_run` and `model.init_from` read (PMA merges, conversions);
`load_init_params` reads `model.init_from` (a jaxllm run or params directory, or a Hugging Face
folder) checked against the model's shapes.

A run directory may be a URL (`gs://bucket/run`): files go through `jaxllm.paths`, checkpoints
through orbax directly. config.yaml is written once the run's state exists (`write_config`,
called by the train loop after a fresh start or a successful restore), so a rerun with a config
that does not fit the checkpoints leaves the saved one in place, and `config_changes` can name
the keys that differ from it.
"""

from __future__ import annotations

import dataclasses
import json
import math

import jax
import numpy as np
import yaml

from jaxllm import config as config_lib
from jaxllm import paths
from jaxllm.checkpoint import Checkpointer, save_params_only
from jaxllm.errors import ConfigError
from jaxllm.models import init_params, param_shapes
from jaxllm.tasks import make_task
from jaxllm.tasks.params import run_keys


def abstract_tree(fn, sharding=None):
    """ShapeDtypeStructs of `fn()`'s output, placed on `sharding` (default: the first device)."""
    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), jax.eval_shape(fn))


def abstract_params(model_cfg, sharding=None):
    """Abstract decoder params (no objective extras, no adapters)."""
    return abstract_tree(lambda: init_params(model_cfg, jax.random.PRNGKey(0)), sharding)


def read_config(run_dir: str) -> config_lib.Config:
    path = paths.join(paths.expand(run_dir), "config.yaml")
    if not paths.exists(path):
        raise FileNotFoundError(f"{run_dir} has no config.yaml: not a jaxllm run directory")
    if not paths.is_url(path):
        return config_lib.load_config(path)
    # A saved config is resolved and has no base: building it is what load_config does.
    cfg = config_lib.build(config_lib.Config, yaml.safe_load(paths.read_text(path)) or {})
    config_lib.validate(cfg)
    return cfg


def write_config(cfg, run_dir: str | None = None) -> None:
    """Process 0 writes the resolved config to RUN_DIR/config.yaml."""
    if jax.process_index() == 0:
        paths.write_text(paths.join(paths.expand(run_dir or cfg.trainer.run_dir), "config.yaml"),
                         yaml.safe_dump(config_lib.to_dict(cfg), sort_keys=False))


def _flat(tree, prefix: str = "") -> dict:
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _flat(sub, f"{prefix}{key}.").items()}
    return {prefix[:-1]: tree}


def config_changes(run_dir: str, cfg) -> list[str]:
    """`key: saved -> now` for each config key whose value differs from RUN_DIR/config.yaml
    (empty when the run has none); trainer.run_dir is left out (a run directory may move)."""
    try:
        saved = _flat(config_lib.to_dict(read_config(run_dir)))
    except FileNotFoundError:
        return []
    now = _flat(config_lib.to_dict(cfg))
    return [f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(saved) | set(now))
            if saved.get(k) != now.get(k) and k != "trainer.run_dir"]


# ----------------------------------------------------------------------------- reading a run


def initial_model_params(cfg) -> dict:
    """The run's model params before step 1, on the host: seed init, then `model.init_from`."""
    task = make_task(cfg)
    fresh = jax.device_get(jax.jit(task.init_model_params)(run_keys(cfg.trainer.seed).model))
    return load_initial_params(cfg, fresh) if cfg.model.init_from else fresh


def load_initial_params(cfg, fresh: dict) -> dict:
    """`fresh` (host or device model params from the seed) with the decoder's params replaced by
    `model.init_from`'s; objective extras (a reward head) keep their fresh init unless the
    source has them too."""
    loaded = load_init_params(cfg.model, cfg.model.init_from, extra_keys=tuple(
        k for k in fresh if k not in param_shapes(cfg.model)))
    out = dict(fresh)
    for k, v in loaded.items():
        out[k] = jax.tree.map(lambda x: np.asarray(x, np.float32), v)
    return out


def load_trainable(run_dir: str, step: int | None = None):
    """(Config with the model of the checkpoint's stage, trainable params) of the newest complete
    checkpoint of a run: the model params, or under LoRA the adapters and objective extras."""
    cfg = read_config(run_dir)
    ckpt = Checkpointer(run_dir, async_save=False)
    step = ckpt.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"{ckpt.directory} holds no complete checkpoint")
    # The model of the stage the checkpoint was saved in (a curriculum may change rope_theta).
    cfg = dataclasses.replace(cfg, model=make_task(cfg).model_at(step))
    task = make_task(cfg)
    keys = run_keys(cfg.trainer.seed)

    def abstract_trainable():
        return task.init_trainable(task.init_model_params(keys.model), keys.adapters)

    trainable = ckpt.restore_params(step, abstract_tree(abstract_trainable))
    ckpt.close()
    return cfg, trainable


def load_run(run_dir: str, step: int | None = None):
    """(Config, model params) of the newest complete checkpoint of a run (or of `save_params`
    output). Model params include objective extras (a reward head); a LoRA run's adapters are
    folded into its base model (rebuilt from the run's config)."""
    cfg, trainable = load_trainable(run_dir, step)
    if not cfg.lora.enabled:
        return cfg, trainable
    task = make_task(cfg)
    return cfg, task.effective_params(trainable, task.frozen_params(initial_model_params(cfg)))


def load_params(run_dir: str, step: int | None = None):
    """(ModelConfig, params) of a run's newest complete checkpoint."""
    cfg, params = load_run(run_dir, step)
    return cfg.model, params


def save_params(model_cfg, params, out_dir: str, cfg=None) -> None:
    """Writes a params-only checkpoint (step 0) plus config.yaml, loadable by `load_run`."""
    paths.makedirs(out_dir)
    cfg = cfg or config_lib.Config()
    # A params directory holds whole params (adapters folded in) and has no curriculum: its
    # model is `model_cfg` at every step.
    cfg = dataclasses.replace(cfg, model=model_cfg, lora=type(cfg.lora)(),
                              data=dataclasses.replace(cfg.data, sources=(), stages=()))
    write_config(cfg, out_dir)
    save_params_only(params, paths.join(out_dir, "checkpoints"))


def load_init_params(model_cfg, path: str, extra_keys: tuple[str, ...] = ()):
    """Host params for `model.init_from`, checked against `model_cfg`'s shapes. Top-level
    `extra_keys` (an objective's own params, e.g. a reward head) may be present or not."""
    path = paths.expand(path)
    if paths.exists(paths.join(path, "adapter_config.json")):  # a PEFT adapter over its base
        from jaxllm.models.peft import load_peft_model

        _, params = load_peft_model(paths.local_folder(path))
    elif paths.exists(paths.join(path, "config.json")):
        from jaxllm.models.hf import load_hf_checkpoint

        _, params = load_hf_checkpoint(paths.local_folder(path))
    elif paths.exists(paths.join(path, "config.yaml")):
        _, params = load_run(path)
    else:
        raise FileNotFoundError(f"model.init_from: {path} is neither a jaxllm run/params directory "
                                "(config.yaml), a Hugging Face directory (config.json) nor a PEFT adapter "
                                "folder (adapter_config.json)")
    want = jax.tree_util.tree_flatten_with_path(param_shapes(model_cfg), is_leaf=lambda x: isinstance(x, tuple))[0]
    got = dict(jax.tree_util.tree_flatten_with_path(params)[0])
    wrong = [f"{jax.tree_util.keystr(k)}: expected {shape}, found {'missing' if k not in got else tuple(got[k].shape)}"
             for k, shape in want if k not in got or tuple(got[k].shape) != tuple(shape)]
    known = {k for k, _ in want}
    extra = sorted(jax.tree_util.keystr(k) for k in set(got) - known if k[0].key not in extra_keys)
    if wrong or extra:
        raise ConfigError(f"model.init_from {path} does not match the model config: "
                         + "; ".join(wrong + [f"{e}: unexpected" for e in extra]))
    return params


# ----------------------------------------------------------------------------- writing a run


def trim_metrics(run_dir: str, last_step: int) -> None:
    """After a resume, drop logged steps beyond the checkpoint: they are about to be redone."""
    path = paths.join(paths.expand(run_dir), "metrics.jsonl")
    if jax.process_index() != 0 or not paths.exists(path):
        return
    lines = paths.read_text(path).splitlines(keepends=True)
    kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= last_step]
    paths.write_text(path, "".join(kept))


def _epoch_fingerprint(cfg, tokenizer) -> dict:
    """What one epoch's batch count depends on; a cached count with another fingerprint is stale.
    Files by path, size and mtime: a stat each, not another pass over the records."""
    from jaxllm.data.files import resolve_files

    d = cfg.data
    files = [[f, *paths.size_and_mtime(f)] for spec in d.train for f in resolve_files(spec)]
    return {"task": cfg.task, "train": list(d.train), "files": files,
            "seq_len": d.seq_len, "batch_size": cfg.trainer.batch_size, "processes": jax.process_count(),
            "seed": d.seed, "add_bos": d.add_bos, "vocab_size": tokenizer.vocab_size,
            "sft": repr(cfg.sft), "preference": repr(cfg.preference)}


def resolve_epochs(cfg, tokenizer, run_dir: str, log=print):
    """With trainer.epochs > 0: cfg with total_steps = ceil(epochs * batches in one epoch) (and
    epochs 0, so the run's saved config is plain). The count takes one tokenizing pass over
    data.train; it is kept in RUN_DIR/epoch_size.json, so a resumed run does not count again."""
    t = cfg.trainer
    if t.epochs <= 0:
        return cfg
    path = paths.join(paths.expand(run_dir), "epoch_size.json")
    want = _epoch_fingerprint(cfg, tokenizer)
    size = None
    if paths.exists(path):
        saved = json.loads(paths.read_text(path))
        size = saved["size"] if saved.get("fingerprint") == want else None
    if size is None:
        log(f"trainer.epochs {t.epochs:g}: counting the batches in one pass over data.train")
        size = make_task(cfg).batches_per_epoch(tokenizer)
        if jax.process_index() == 0:
            paths.write_text(path, json.dumps({"fingerprint": want, "size": size}))
    if size["batches"] < 1:
        raise ConfigError(
            f"trainer.epochs: one pass over data.train gives {size['rows']} rows, not one full batch of "
            f"trainer.batch_size {t.batch_size} (per process)")
    steps = math.ceil(t.epochs * size["batches"])
    log(f"trainer.epochs {t.epochs:g} x {size['batches']} batches per epoch ({size['rows']} rows, "
        f"{size['skipped']} records skipped) = {steps} steps")
    resolved = dataclasses.replace(cfg, trainer=dataclasses.replace(t, total_steps=steps, epochs=0.0))
    config_lib.validate(resolved)  # e.g. schedule.warmup_steps against the new total
    return resolved


def open_run(cfg):
    """Creates the run directory and returns (cfg with its run length resolved, tokenizer): the
    tokenizer is the run's own copy, else `model.init_from`'s, else `data.tokenizer`; process 0
    keeps a copy of the tokenizer. config.yaml is written by `write_config` once the run's state
    is known to fit it (see the module docstring)."""
    from jaxllm.data.tokenizer import keep_tokenizer, run_tokenizer

    run_dir = paths.expand(cfg.trainer.run_dir)
    if jax.process_index() == 0:
        paths.makedirs(run_dir)
    tokenizer = run_tokenizer(cfg, run_dir)
    cfg = config_lib.resolve_total_tokens(cfg)
    cfg = resolve_epochs(cfg, tokenizer, run_dir, log=print if jax.process_index() == 0 else lambda _: None)
    if jax.process_index() == 0:
        keep_tokenizer(tokenizer, run_dir)
    return cfg, tokenizer
