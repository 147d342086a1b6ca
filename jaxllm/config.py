"""Typed, frozen run configuration loaded from YAML.

`load_config(path, overrides)` reads a YAML file (`yaml.safe_load`), follows its `base:` chain
(paths relative to the including file), applies dotted `key=value` overrides and builds frozen
dataclasses. Every mistake raises `ConfigError` with one line that names the key and, where there
is a fixed set, the valid choices; `python -m jaxllm.train` prints that line and exits 2.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from typing import Any, Literal

import yaml

from jaxllm.data import curriculum
from jaxllm.data.curriculum import DynamicWeightsConfig, SourceConfig, StageConfig
from jaxllm.errors import ConfigError
from jaxllm.frozendict import FrozenDict
from jaxllm.models.llama import ModelConfig, RopeScaling
from jaxllm.models.lora import LoraConfig
from jaxllm.optim import check_schedule
from jaxllm.rl.config import RLConfig
from jaxllm import tasks




@dataclasses.dataclass(frozen=True)
class DataConfig:
    # Entries are files, folders or globs (.txt, .jsonl, .jsonl.gz, .jsonl.zst, .parquet,
    # .array_record), the built-in corpus `stdlib:train` / `stdlib:eval` (the Python standard
    # library's own source files), or token shards from `python -m jaxllm.data.prepare`
    # (`prepared:DIR`, or a folder holding manifest.json).
    train: tuple[str, ...] = ("stdlib:train",)
    eval: tuple[str, ...] = ("stdlib:eval",)
    text_field: str = "text"
    # A SentencePiece .model file, or "auto": train one on `train` (vocab = model.vocab_size)
    # once and cache it under `tokenizer_cache_dir`.
    tokenizer: str = "auto"
    tokenizer_cache_dir: str = "~/.cache/jaxllm/tokenizers"
    seq_len: int = 256
    add_bos: bool = True
    add_eos: bool = True
    seed: int = 0
    # Fraction of the built-in corpus's files held out for evaluation.
    eval_fraction: float = 0.05
    # Threads grain uses to read and tokenize (0: in the training process).
    num_workers: int = 0
    strict: bool = False
    # Packing of documents into rows (jaxllm.data.packing): greedy (stream order, documents cut
    # at row ends) or best_fit (best-fit-decreasing from a buffer of pack_buffer documents; a
    # document that fits a row stays whole). Documents longer than a row: split (continue in the
    # next rows) or truncate (keep the first seq_len + 1 tokens).
    packing: Literal["greedy", "best_fit"] = "greedy"
    split_policy: Literal["split", "truncate"] = "split"
    pack_buffer: int = 256

    def __post_init__(self):  # DataConfig's range checks (ConfigError "data: ..." via build)
        if self.pack_buffer <= 0:
            raise ValueError(f"pack_buffer must be > 0, got {self.pack_buffer}")

    # Pretraining mixtures (jaxllm.data.mixture): named sources, and stages that set their
    # weights (and seq_len, batch_size, rope_theta) from a step on. Without sources, data.train
    # is the one source, named "train" (with sources, data.train only feeds the training of an
    # `auto` tokenizer); without stages, one stage covers the run.
    sources: tuple[SourceConfig, ...] = ()
    stages: tuple[StageConfig, ...] = ()
    # Dynamic batch loading: the stage weights move every dynamic_weights.every_steps steps by
    # the sources' held-out losses against reference losses (jaxllm.data.curriculum).
    dynamic_weights: DynamicWeightsConfig = DynamicWeightsConfig()


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    name: Literal["adamw"] = "adamw"
    lr: float = 3e-4
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
    name: Literal["wsd", "cosine", "linear", "constant"] = "wsd"
    warmup_steps: int = 100
    # > 0: warm up for this fraction of trainer.total_steps instead (e.g. Tulu 3's 0.03).
    warmup_ratio: float = 0.0
    decay_fraction: float = 0.1
    decay_shape: Literal["linear", "cosine", "1-sqrt"] = "linear"
    min_lr: float = 0.0


@dataclasses.dataclass(frozen=True)
class TrainerConfig:
    total_steps: int = 1000
    # > 0 (sft, dpo, reward): train this many passes over data.train instead; total_steps is then
    # computed from the data at the start of the run (and must not be set as well).
    epochs: float = 0.0
    # > 0 (pretraining): train this many tokens instead; total_steps follows from the stages'
    # batch_size * seq_len (and must not be set as well).
    total_tokens: int = 0
    batch_size: int = 32  # global, in sequences of data.seq_len tokens
    grad_accum_steps: int = 1  # microbatches per step; batch_size must divide evenly
    run_dir: str = "runs/default"
    seed: int = 0
    loss_chunk_size: int = 128  # sequence positions per cross-entropy chunk
    eval_every_steps: int = 200
    eval_batches: int = 8
    sample_prompt: str = "def "
    sample_tokens: int = 64


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    data: int = -1  # -1: all devices left over by the other axes
    fsdp: int = 1
    tensor: int = 1
    # On a machine whose only platform is the CPU, expose this many CPU devices (0: JAX's
    # default of one), so a laptop's cores run data-parallel shards of the batch.
    cpu_devices: int = 0


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    enabled: bool = True
    every_steps: int = 500
    keep: int = 3
    async_save: bool = True


@dataclasses.dataclass(frozen=True)
class LoggingConfig:
    every_steps: int = 10
    progress_bar: bool = True
    tensorboard: bool = True
    # Peak dense bf16 TFLOP/s of one device for the MFU estimate; 0 looks it up by device kind.
    peak_tflops_per_device: float = 0.0


@dataclasses.dataclass(frozen=True)
class SFTConfig:
    """`task: sft`: data.train / data.eval hold conversations (`messages` lists)."""

    # A built-in name (chatml, tulu, llama3), a Jinja2 string, a tokenizer_config.json or
    # chat_template.jinja path, or a tokenizer folder holding one.
    template: str = "chatml"
    messages_field: str = "messages"
    truncation: Literal["truncate_end", "drop"] = "truncate_end"
    # mean: average over the batch's assistant tokens; sum: summed over each row's assistant
    # tokens, averaged over rows (Tulu 3, with packing false: a row is one conversation).
    reduce_loss: Literal["mean", "sum"] = "mean"
    # true: conversations packed whole into rows of data.seq_len (segment ids keep them apart);
    # false: one conversation per row, padded (as TRL's default and open-instruct's Tulu 3 runs).
    packing: bool = True
    # Unlikelihood (Welleck et al. 2020) on a record's negative reply tokens: weight * sum of
    # -log(1 - p(token)); 0 turns it off. The negative reply is the record's `negative_field`.
    unlikelihood_weight: float = 0.0
    negative_field: str = "negative"


@dataclasses.dataclass(frozen=True)
class PreferenceConfig:
    """`task: dpo` (pairs: prompt, chosen, rejected) and `task: reward` (the same pairs)."""

    loss_type: Literal["sigmoid", "dpo_norm", "ipo", "hinge", "rdpo", "simpo", "cpo", "orpo", "rrhf",
                       "slic", "kto"] = "sigmoid"
    beta: float = 0.1
    gamma: float = 0.5
    alpha: float = 0.01
    delta: float = 1.0
    nll_weight: float = 1.0
    label_smoothing: float = 0.0
    desirable_weight: float = 1.0  # KTO
    undesirable_weight: float = 1.0  # KTO
    # cached: reference log-probs computed once before training into run_dir/reference_logps
    # (the reference model is not kept in memory); live: a frozen reference copy (or the base
    # model under LoRA) evaluated every step.
    reference: Literal["cached", "live"] = "cached"
    prompt_field: str = "prompt"
    chosen_field: str = "chosen"
    rejected_field: str = "rejected"
    # Prompts longer than this many tokens keep their end (0: no limit besides data.seq_len).
    max_prompt_len: int = 0
    # Reward models: Bradley-Terry with an optional per-pair margin from this field ("": none).
    margin_field: str = ""


@dataclasses.dataclass(frozen=True)
class Config:
    task: str = "pretrain"  # a name in jaxllm.tasks.TASKS
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    trainer: TrainerConfig = TrainerConfig()
    mesh: MeshConfig = MeshConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    logging: LoggingConfig = LoggingConfig()
    sft: SFTConfig = SFTConfig()
    preference: PreferenceConfig = PreferenceConfig()
    lora: LoraConfig = LoraConfig()
    rl: RLConfig = RLConfig()


# ----------------------------------------------------------------------------- YAML and overrides


def _read_yaml(path: str, seen: tuple[str, ...] = ()) -> dict:
    path = os.path.abspath(path)
    if path in seen:
        raise ConfigError(f"base: cycle through {path}")
    try:
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    base = raw.pop("base", None)
    if base is None:
        return _deep_merge(_run_length_yields({}, raw, path), raw)
    if not isinstance(base, str):
        raise ConfigError(f"{path}: base must be a path to another YAML file")
    parent = _read_yaml(os.path.join(os.path.dirname(path), base), seen + (path,))
    return _deep_merge(_run_length_yields(parent, raw, path), raw)


def _run_length_yields(parent: dict, layer: dict, where: str) -> dict:
    """trainer.total_steps, trainer.epochs and trainer.total_tokens each set the run's length:
    the one a later layer (a file over its base, an override over the file) sets replaces the
    others from the earlier layers; one layer setting two is an error."""
    trainer = layer.get("trainer")
    if not isinstance(trainer, dict):
        return parent
    given = [k for k in RUN_LENGTH_KEYS if trainer.get(k) or (k == "total_steps" and k in trainer)]
    if len(given) > 1:
        raise ConfigError(f"{where}: set one of {', '.join('trainer.' + k for k in given)}: each sets "
                          "the run's length")
    if not given or not isinstance(parent.get("trainer"), dict):
        return parent
    return {**parent, "trainer": {k: v for k, v in parent["trainer"].items()
                                  if k == given[0] or k not in RUN_LENGTH_KEYS}}


RUN_LENGTH_KEYS = ("total_steps", "epochs", "total_tokens")


def _deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def apply_override(raw: dict, override: str) -> dict:
    """Sets `a.b.c=value` in the nested dict; the value is parsed as YAML (`3`, `true`, `[1, 2]`)."""
    if "=" not in override:
        raise ConfigError(f"override {override!r} is not of the form key=value")
    key, value = override.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {override!r} has an empty key part")
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        parsed = value
    out = dict(raw)
    if parts[:1] == ["trainer"] and parts[-1] in RUN_LENGTH_KEYS:
        out = _run_length_yields(out, {"trainer": {parts[-1]: parsed}}, f"override {override!r}")
    node = out
    for p in parts[:-1]:
        child = node.get(p)
        node[p] = dict(child) if isinstance(child, dict) else {}
        node = node[p]
    node[parts[-1]] = parsed
    return out


# ----------------------------------------------------------------------------- typed construction


def _type_name(tp) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(c) for c in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp, key: str):
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, choices))}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if origin is tuple:
        (item,) = {a for a in typing.get_args(tp) if a is not Ellipsis}
        if isinstance(value, (str, int, float)) or isinstance(value, dict):
            value = [value]  # a single entry is a one-entry list
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return tuple(_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        key_tp, value_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return FrozenDict({_coerce(k, key_tp, key): _coerce(v, value_tp, f"{key}.{k}") for k, v in value.items()})
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return build(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads `1e-3` (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{key}: unsupported type {_type_name(tp)}")


def build(cls, raw: dict, prefix: str = ""):
    """Builds dataclass `cls` from a nested dict, checking names, types and choices."""
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in raw.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in fields:
            raise ConfigError(f"unknown key {key!r}; valid keys here: {', '.join(sorted(fields))}")
        if v is None and dataclasses.is_dataclass(hints[k]):
            v = {}
        kwargs[k] = _coerce(v, hints[k], key)
    try:
        obj = cls(**kwargs)
    except ValueError as e:  # __post_init__ checks of value ranges
        raise ConfigError(f"{prefix}: {e}" if prefix else str(e)) from None
    return obj


def validate(cfg: Config) -> None:
    """Cross-field checks that no single field's type can express."""
    t, d = cfg.trainer, cfg.data
    checks = [
        (t.total_steps > 0, "trainer.total_steps must be > 0"),
        (t.epochs >= 0, "trainer.epochs must be >= 0"),
        (t.total_tokens >= 0, "trainer.total_tokens must be >= 0"),
        (t.batch_size > 0, "trainer.batch_size must be > 0"),
        (t.grad_accum_steps > 0 and t.batch_size % t.grad_accum_steps == 0,
         f"trainer.grad_accum_steps ({t.grad_accum_steps}) must divide trainer.batch_size ({t.batch_size})"),
        (d.seq_len > 0, "data.seq_len must be > 0"),
        (t.loss_chunk_size > 0, "trainer.loss_chunk_size must be > 0"),
        (cfg.checkpoint.every_steps > 0, "checkpoint.every_steps must be > 0"),
        (cfg.checkpoint.keep > 0, "checkpoint.keep must be > 0"),
        (cfg.logging.every_steps > 0, "logging.every_steps must be > 0"),
        (0.0 <= cfg.schedule.decay_fraction <= 1.0, "schedule.decay_fraction must be in [0, 1]"),
        (0.0 <= cfg.schedule.warmup_ratio < 1.0, "schedule.warmup_ratio must be in [0, 1)"),
        (cfg.schedule.warmup_steps >= 0, "schedule.warmup_steps must be >= 0"),
        (cfg.optimizer.lr > 0, "optimizer.lr must be > 0"),
        (0.0 <= cfg.optimizer.b1 < 1.0 and 0.0 <= cfg.optimizer.b2 < 1.0,
         "optimizer.b1 and optimizer.b2 must be in [0, 1)"),
        (0.0 < d.eval_fraction < 1.0, "data.eval_fraction must be in (0, 1)"),
        (all(x == -1 or x > 0 for x in (cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)),
         "mesh.data, mesh.fsdp and mesh.tensor must be positive or -1"),
        (cfg.mesh.cpu_devices >= 0, "mesh.cpu_devices must be >= 0"),
        ([cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor].count(-1) <= 1,
         "at most one of mesh.data, mesh.fsdp, mesh.tensor may be -1"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ConfigError(msg)
    # With epochs or total_tokens, total_steps is known later: validate runs again then.
    length_known = t.epochs <= 0 and t.total_tokens <= 0
    # The schedule counts optimizer updates (several per step for PPO-style RL).
    updates = t.total_steps * tasks.task_class(cfg.task).updates_per_step(cfg)
    check_schedule(cfg.optimizer, cfg.schedule, updates if length_known else None)
    tasks.validate(cfg)
    curriculum.validate_mixture(cfg)


def resolve_total_tokens(cfg: Config) -> Config:
    """With trainer.total_tokens > 0: cfg with total_steps = the steps that train that many tokens
    through the stages, and total_tokens 0 (so the run's saved config is plain). Otherwise cfg."""
    t = cfg.trainer
    if t.total_tokens <= 0:
        return cfg
    steps = curriculum.steps_for_tokens(cfg, t.total_tokens)
    resolved = dataclasses.replace(cfg, trainer=dataclasses.replace(t, total_steps=steps, total_tokens=0))
    validate(resolved)
    return resolved


def load_config(path: str, overrides: typing.Sequence[str] = ()) -> Config:
    raw = _read_yaml(path)
    for o in overrides:
        raw = apply_override(raw, o)
    cfg = build(Config, raw)
    validate(cfg)
    return resolve_total_tokens(cfg)


def load_config_or_report(path: str, overrides: typing.Sequence[str] = ()) -> Config | None:
    """`load_config` for command-line tools: on a config problem prints its one line to stderr
    and returns None (the caller exits 2)."""
    import sys

    try:
        return load_config(path, overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return None


def to_dict(cfg) -> dict:
    """The resolved config as plain YAML-able data (tuples become lists)."""

    def conv(x):
        if dataclasses.is_dataclass(x):
            return {f.name: conv(getattr(x, f.name)) for f in dataclasses.fields(x)}
        if isinstance(x, (list, tuple)):
            return [conv(v) for v in x]
        if isinstance(x, dict):
            return {k: conv(v) for k, v in x.items()}
        return x

    return conv(cfg)


def dump_yaml(cfg, path: str) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)


__all__ = [
    "Config", "ConfigError", "DataConfig", "OptimizerConfig", "ScheduleConfig", "TrainerConfig",
    "MeshConfig", "CheckpointConfig", "LoggingConfig", "ModelConfig", "RopeScaling", "SFTConfig",
    "PreferenceConfig", "LoraConfig", "RLConfig", "SourceConfig", "StageConfig", "FrozenDict",
    "load_config", "load_config_or_report", "build", "validate", "to_dict", "dump_yaml", "apply_override",
]
