"""Every published recipe in configs/recipes/ against a table of the published numbers.

The table is written here from the sources, not read from the recipes, so a recipe that drifts
(a value inherited from a base config, a typo, a default nobody set) fails. Sources:
  Tulu 3     Lambert et al. 2024, arXiv 2411.15124: Table 11 (SFT), Table 20 (DPO), Table 36
             (reward model); open-instruct docs/tulu3.md (the commands that produced the models:
             seeds, weight decay, loss) and, where a command leaves a flag out, the default of the
             script it runs (finetune.py / dpo_tune*.py: torch AdamW, seed 42; reward_modeling.py:
             eps 1e-5, warm_up_steps 0, seed 1).
  SmolLM2    Ben Allal et al. 2025, arXiv 2502.02737: Sec. 4.1, Table 6, Fig. 2-3, Sec. 4.2-4.6
             (1.7B pretraining), Sec. 5.2-5.3 (1.7B SFT / DPO), Sec. 6 (135M / 360M); the authors'
             configs where the paper gives no number: huggingface/smollm
             text/pretraining/smollm2/config_smollm2_{135M,360M,1B}.yaml (nanotron) and
             huggingface/alignment-handbook recipes/smollm2/{sft,dpo}/config{,_smol}.yaml
             (transformers' TrainingArguments defaults for what they leave unset).
The learning-rate curve is compared step by step with the published schedule written in NumPy
(transformers' linear / cosine with warmup, nanotron's warmup-stable-decay), so the peak, the
warmup, the decay share and the LR at the last step are all checked.

A new recipe needs a row: `test_every_recipe_has_a_row` fails until it has one. An RL recipe
adds its own keys through `extra` (dotted config keys -> published values).
"""

from __future__ import annotations

import dataclasses
import glob
import math
import os

import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.config import load_config
from jaxllm.data.curriculum import stage_plan
from jaxllm.optim import make_schedule

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = os.path.join(ROOT, "configs", "recipes")
# Examples, not published runs (kk-grpo-lopti follows the AR-Lopti scripts, but on Qwen2.5-3B's
# shape with optimizer defaults its fork leaves unstated).
NOT_PUBLISHED = {"tiny-3stage.yaml", "smollm2-135m-4stage.yaml", "kk-grpo-lopti.yaml"}

# alignment-handbook recipes/smollm2/sft/config.yaml chat_template (SmolLM2-Instruct's).
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}")


@dataclasses.dataclass(frozen=True)
class Published:
    file: str
    task: str
    params_m: float         # model parameters, millions (the released config.json)
    lr: float
    schedule: str           # the published curve: "linear" | "cosine" (transformers), "wsd" (nanotron)
    warmup: float           # steps (>= 1) or a share of the run (< 1)
    batch: int              # sequences (pairs for DPO and reward models) per optimizer step
    seq_len: int
    betas: tuple[float, float]
    eps: float
    weight_decay: float
    grad_clip: float
    seed: int
    decay: float = 0.0      # wsd: the share of the run the decay to 0 takes
    final_lr: float = 0.0   # the LR at the end of the run
    epochs: float = 0.0     # post-training
    total_steps: int = 0    # pretraining (the authors' config)
    tokens: float = 0.0     # pretraining: the paper's round total
    data_seed: int | None = None  # None: the seed
    init_from: str = ""     # the recipe whose run this one starts from
    extra: tuple = ()       # (dotted config key, published value)


TULU_ADAMW = dict(betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, grad_clip=1.0)
TULU_SFT = dict(task="sft", schedule="linear", warmup=0.03, batch=128, seq_len=4096, epochs=2, **TULU_ADAMW,
                extra=(("sft.reduce_loss", "sum"), ("sft.packing", False), ("sft.template", "tulu")))
TULU_DPO = dict(task="dpo", schedule="linear", warmup=0.1, batch=128, seq_len=2048, epochs=1, seed=42, **TULU_ADAMW,
                extra=(("preference.loss_type", "dpo_norm"), ("preference.beta", 5.0), ("sft.template", "tulu")))
SMOL_PRETRAIN = dict(task="pretrain", schedule="wsd", warmup=2000, seq_len=2048, betas=(0.9, 0.95), eps=1e-8,
                     weight_decay=0.01, grad_clip=1.0)
HF_ADAMW = dict(betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, grad_clip=1.0)
SMOL_SFT = dict(task="sft", schedule="cosine", warmup=0.1, batch=128, seq_len=8192, epochs=2, seed=42, **HF_ADAMW,
                extra=(("sft.template", SMOLLM2_TEMPLATE), ("sft.packing", True)))
SMOL_DPO = dict(task="dpo", schedule="cosine", warmup=0.1, batch=128, seq_len=1024, epochs=2, seed=42, lr=1e-6,
                **HF_ADAMW, extra=(("preference.loss_type", "sigmoid"), ("preference.beta", 0.5),
                                   ("preference.label_smoothing", 0.0), ("preference.max_prompt_len", 512),
                                   ("sft.template", SMOLLM2_TEMPLATE)))
SMOL_135M = dict(params_m=134.5, lr=3e-3, decay=0.2, batch=512, total_steps=2_000_000, tokens=2e12, seed=8)

TABLE = [
    Published("tulu3-8b-sft.yaml", params_m=8030.3, lr=5e-6, seed=123, **TULU_SFT),
    Published("tulu3-70b-sft.yaml", params_m=70553.7, lr=2e-6, seed=456, **TULU_SFT),
    Published("tulu3-8b-dpo.yaml", params_m=8030.3, lr=5e-7, init_from="tulu3-8b-sft.yaml", **TULU_DPO),
    Published("tulu3-70b-dpo.yaml", params_m=70553.7, lr=2e-7, init_from="tulu3-70b-sft.yaml", **TULU_DPO),
    Published("tulu3-8b-rm.yaml", task="reward", params_m=8030.3, lr=3e-6, schedule="linear", warmup=0,
              batch=256, seq_len=2048, epochs=1, betas=(0.9, 0.999), eps=1e-5, weight_decay=0.01, grad_clip=1.0,
              seed=1, init_from="tulu3-8b-sft.yaml",
              extra=(("preference.max_prompt_len", 2048), ("sft.template", "tulu"))),
    Published("smollm2-135m-pretrain.yaml", **SMOL_135M, **SMOL_PRETRAIN),
    Published("smollm2-360m-pretrain.yaml", params_m=361.8, lr=3e-3, decay=0.2, batch=768, total_steps=2_600_000,
              tokens=4e12, seed=8, **SMOL_PRETRAIN),
    Published("smollm2-1.7b-pretrain.yaml", params_m=1711.4, lr=5e-4, decay=0.1, batch=1024,
              total_steps=5_240_000, tokens=11e12, seed=42, data_seed=8, **SMOL_PRETRAIN),
    Published("smollm2-1.7b-sft.yaml", params_m=1711.4, lr=3e-4, **SMOL_SFT),
    Published("smollm2-360m-sft.yaml", params_m=361.8, lr=1e-3, **SMOL_SFT),
    Published("smollm2-135m-sft.yaml", params_m=134.5, lr=1e-3, **SMOL_SFT),
    Published("smollm2-1.7b-dpo.yaml", params_m=1711.4, init_from="smollm2-1.7b-sft.yaml", **SMOL_DPO),
    Published("smollm2-360m-dpo.yaml", params_m=361.8, init_from="smollm2-360m-sft.yaml", **SMOL_DPO),
    Published("smollm2-135m-dpo.yaml", params_m=134.5, init_from="smollm2-135m-sft.yaml", **SMOL_DPO),
    # open-instruct docs/tulu3.md's RLVR command and ppo_vllm_thread_ray_gtrl.py's defaults: batch is
    # prompts x samples per step, seq_len prompt + response tokens.
    Published("tulu3-8b-rlvr.yaml", task="rl", params_m=8030.3, lr=3e-7, schedule="linear", warmup=0, batch=224,
              seq_len=4096, betas=(0.9, 0.999), eps=1e-5, weight_decay=0.0, grad_clip=1.0, seed=3,
              total_steps=44642, init_from="tulu3-8b-dpo.yaml",
              extra=(("rl.estimator", "gae"), ("rl.ppo_epochs", 4), ("rl.mini_batches", 1), ("rl.rollout_n", 1),
                     ("rl.kl_coef", 0.05), ("rl.kl_kind", "k1"), ("rl.kl_in_reward", True), ("rl.temperature", 1.0),
                     ("rl.gamma", 1.0), ("rl.lam", 0.95), ("rl.clip_low", 0.2), ("rl.clip_high", 0.2),
                     ("rl.value_clip", 0.2), ("rl.rewards", {"verifiable": 10.0}), ("rl.non_stop_penalty", -10.0),
                     ("rl.value_init", "runs/tulu3-8b-rm"), ("sft.template", "tulu"))),
    # Not a published run, but it must keep the 135M's published optimizer, schedule and length.
    Published("smollm2-135m-4stage.yaml", **SMOL_135M, **SMOL_PRETRAIN),
]


def published_lr(p: Published, steps: np.ndarray, total: int) -> np.ndarray:
    """The published schedule at `steps` of a `total`-step run, in float64."""
    warmup = int(p.warmup * total) if p.warmup < 1 else int(p.warmup)  # open-instruct: int(ratio * steps)
    s = steps.astype(np.float64)
    ramp = s / warmup if warmup else np.ones_like(s)
    after = np.maximum(s - warmup, 0) / (total - warmup)  # progress through the post-warmup part
    if p.schedule == "linear":  # transformers get_linear_schedule_with_warmup
        lr = p.lr * np.where(s < warmup, ramp, 1 - after)
    elif p.schedule == "cosine":  # transformers get_cosine_schedule_with_warmup
        lr = p.lr * np.where(s < warmup, ramp, 0.5 * (1 + np.cos(np.pi * after)))
    else:  # nanotron: linear warmup, constant, linear decay to min_decay_lr over the last share
        decay = round(p.decay * total)
        lr = p.lr * np.where(s < warmup, ramp, np.minimum(1.0, (total - s) / decay))
    return np.maximum(lr, p.final_lr)


def check_recipe(path: str, p: Published) -> None:
    """Asserts that the recipe at `path` resolves to the published numbers of row `p`."""
    cfg = load_config(path)
    o, t = cfg.optimizer, cfg.trainer
    rl = cfg.task == "rl"  # rows are prompts x samples, prompt + response tokens long
    got = dict(task=cfg.task, lr=o.lr, betas=(o.b1, o.b2), eps=o.eps, weight_decay=o.weight_decay,
               grad_clip=o.grad_clip, batch=cfg.rl.rows_per_step if rl else t.batch_size,
               seq_len=cfg.rl.max_prompt_len + cfg.rl.response_len if rl else cfg.data.seq_len, seed=t.seed,
               data_seed=cfg.data.seed, epochs=t.epochs, min_lr=cfg.schedule.min_lr,
               params_m=round(cfg.model.num_params() / 1e6, 1))
    want = dict(task=p.task, lr=p.lr, betas=p.betas, eps=p.eps, weight_decay=p.weight_decay,
                grad_clip=p.grad_clip, batch=p.batch, seq_len=p.seq_len, seed=p.seed,
                data_seed=p.seed if p.data_seed is None else p.data_seed, epochs=p.epochs,
                min_lr=p.final_lr, params_m=p.params_m)
    assert got == want, {k: (got[k], want[k]) for k in got if got[k] != want[k]}
    for key, value in p.extra:
        node = cfg
        for part in key.split("."):
            node = getattr(node, part)
        assert node == value, f"{key}: {node!r}, published {value!r}"
    if p.init_from:
        assert cfg.model.init_from == load_config(os.path.join(os.path.dirname(path), p.init_from)).trainer.run_dir

    if p.epochs:  # the curve's shape does not depend on the run's length: check a 1000-step run
        total = 1000
        cfg = load_config(path, [f"trainer.total_steps={total}"])
    elif rl:
        total = t.total_steps
        assert total == p.total_steps
    else:
        total = t.total_steps
        assert total == p.total_steps
        tokens_per_step = {s.batch_size * s.seq_len for s in stage_plan(cfg)}
        assert tokens_per_step == {p.batch * p.seq_len}
        assert total * p.batch * p.seq_len == pytest.approx(p.tokens, rel=0.05)  # the paper rounds
    steps = np.unique(np.concatenate([np.linspace(0, total, 401).astype(np.int64), np.arange(0, 3),
                                      np.arange(total - 2, total + 1)]))
    ours = np.asarray(make_schedule(cfg.optimizer, cfg.schedule, total)(jnp.asarray(steps)), np.float64)
    np.testing.assert_allclose(ours, published_lr(p, steps, total), rtol=2e-5, atol=p.lr * 1e-6)
    assert ours.max() == pytest.approx(p.lr) and ours[-1] == pytest.approx(p.final_lr, abs=p.lr * 1e-6)


@pytest.mark.parametrize("p", TABLE, ids=[p.file for p in TABLE])
def test_recipe_matches_published(p):
    check_recipe(os.path.join(RECIPES, p.file), p)


def test_every_recipe_has_a_row():
    files = {os.path.basename(f) for f in glob.glob(os.path.join(RECIPES, "*.yaml"))}
    assert files - {p.file for p in TABLE} - NOT_PUBLISHED == set()


def test_the_check_catches_a_rising_decay(tmp_path):
    """The Tulu 3 SFT recipe once inherited llama3-8b.yaml's cosine min_lr 3e-5: a "decay" from 5e-6
    up to 3e-5. The config check refuses it; with min_lr <= lr but not 0, the table check does."""
    path = os.path.join(RECIPES, "tulu3-8b-sft.yaml")
    (tmp_path / "drift.yaml").write_text(f"base: {path}\nschedule: {{min_lr: 1.0e-6}}\n")
    with pytest.raises(AssertionError, match="min_lr"):
        check_recipe(str(tmp_path / "drift.yaml"), TABLE[0])


# ----------------------------------------------------------------------------- SmolLM2's stages

# Fig. 2 and Sec. 4.2-4.5: each stage's start (tokens) and shares (%) of web, code, math and
# textbooks, and FineWeb-Edu's share of the web data (60/40, then 40/60 FineWeb-Edu / DCLM).
SMOL_STAGES = [(0, 90, 10, 0, 0, 0.6), (6e12, 75, 20, 5, 0, 0.6), (8e12, 74, 16, 10, 0, 0.4),
               (10e12, 58, 24, 14, 4, 0.4)]
CATEGORY = {"fineweb-edu": "web", "dclm": "web", "starcoderdata": "code", "stack-edu-3": "code",
            "stack-edu-4": "code", "owm": "math", "math-3": "math", "math-4": "math", "auggsm8k": "math",
            "cosmopedia-v2": "textbooks", "dclm-long": "long", "fineweb-edu-long": "long", "dolma-books": "long"}


def _shares(cfg, stage):
    names = [s.name for s in cfg.data.sources]
    return {n: 100 * w for n, w in zip(names, stage.weights)}


@pytest.mark.parametrize("file, published_starts", [
    ("smollm2-1.7b-pretrain.yaml", True),
    ("smollm2-135m-4stage.yaml", False),  # the same shares at switch points of its own
])
def test_smollm2_stage_mixtures(file, published_starts):
    cfg = load_config(os.path.join(RECIPES, file))
    plan, tokens_per_step = stage_plan(cfg), cfg.trainer.batch_size * cfg.data.seq_len
    assert len(plan) == 5
    for stage, (start, web, code, math_, books, fwe) in zip(plan, SMOL_STAGES):
        shares = _shares(cfg, stage)
        by_kind = {k: sum(v for n, v in shares.items() if CATEGORY[n] == k) for k in set(CATEGORY.values())}
        assert by_kind == pytest.approx({"web": web, "code": code, "math": math_, "textbooks": books, "long": 0})
        assert shares["fineweb-edu"] / web == pytest.approx(fwe)
        if published_starts:
            assert (stage.start_step - 1) * tokens_per_step < start <= stage.start_step * tokens_per_step
    assert _shares(cfg, plan[3])["owm"] == pytest.approx(0.08)  # Sec. 4.5: 0.08% OWM, 0.02% AugGSM8K
    assert _shares(cfg, plan[3])["auggsm8k"] == pytest.approx(0.02)
    # Sec. 4.6: the final 75B tokens at 8k with RoPE 130k (the 135M: its release's 100k), 40% long
    # documents (DCLM 10, FineWeb-Edu 10, Dolma books 20), 60% the stage-4 mixture.
    last, stage4 = _shares(cfg, plan[4]), _shares(cfg, plan[3])
    assert {n: last[n] for n in ("dclm-long", "fineweb-edu-long", "dolma-books")} == pytest.approx(
        {"dclm-long": 10, "fineweb-edu-long": 10, "dolma-books": 20})
    assert {n: v for n, v in last.items() if CATEGORY[n] != "long"} == pytest.approx(
        {n: 0.6 * v for n, v in stage4.items() if CATEGORY[n] != "long"})
    assert (plan[4].seq_len, plan[4].rope_theta) == (8192, 130000.0 if published_starts else 100000.0)
    assert plan[4].batch_size * plan[4].seq_len == tokens_per_step
    tail = (cfg.trainer.total_steps - plan[4].start_step) * tokens_per_step
    assert 75e9 - tokens_per_step < tail <= 75e9  # its start rounds up to a whole step
    assert cfg.model.rope_theta == 10000.0  # Table 6 / the configs: before the extension
    assert math.isclose(sum(last.values()), 100)
