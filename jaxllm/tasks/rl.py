"""`task: rl`: on-policy RL with verifiable rewards (the `rl:` config section, `jaxllm.rl`).

Each step's batch comes from `rl.rollout.RolloutSource`: prompts_per_step prompts x rollout_n
responses sampled from the current policy, scored, with old / reference log-probs, values and
advantages. The step then makes ppo_epochs passes over the mini-batches of mini_batch_prompts
prompts, one optimizer update each (twice with Lopti: low-probability tokens, then the rest);
the LR schedule counts those updates. The frozen reference (the initial policy, or the LoRA
base) is kept only when the KL to it is used. With estimator gae the critic is the extra param
tree "critic" (a decoder with a value head), initialised from `rl.value_init` (a reward-model
run, as Tülu 3 does) or from the policy's initial weights, with its own AdamW state.

Evaluation: greedy responses to the held-out prompts (data.eval), scored like training:
eval_reward, eval_accuracy (the verifiable reward's success rate), eval_accuracy/<verifier>,
eval_response_length.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import optax

from jaxllm.data.rows import sequence_row
from jaxllm.errors import ConfigError
from jaxllm.models import decode, param_shapes
from jaxllm.objectives.reward import reward_scores
from jaxllm.objectives.rl import RLObjective
from jaxllm.optim import make_optimizer, make_schedule
from jaxllm.rl.prompts import eval_prompts, prompt_width, train_prompts
from jaxllm.rl.rewards import Rewards, check_rewards
from jaxllm.rl.rollout import RolloutSource
from jaxllm.tasks import params as params_lib
from jaxllm.tasks.base import RunContext, Task


class RLTask(Task):
    name = "rl"
    section = "rl"
    edits_initial_params = True

    def __init__(self, cfg):
        super().__init__(cfg)
        rl = cfg.rl
        self.update_epochs, self.mini_batches = rl.ppo_epochs, rl.mini_batches
        self.update_passes = ("loss_mask_low", "loss_mask_high") if rl.lopti_eta > 0 else ("",)
        self.rewards: Rewards | None = None
        self.rollouts: RolloutSource | None = None

    @classmethod
    def updates_per_step(cls, cfg) -> int:
        rl = cfg.rl
        return rl.ppo_epochs * rl.mini_batches * (2 if rl.lopti_eta > 0 else 1)

    @classmethod
    def check_config(cls, cfg) -> None:
        rl, t = cfg.rl, cfg.trainer
        check_rewards(rl)
        rows = rl.rows_per_step // rl.mini_batches
        if rows % t.grad_accum_steps:
            raise ConfigError(f"trainer.grad_accum_steps ({t.grad_accum_steps}) must divide the rows of a mini-batch "
                              f"(rl.mini_batch_prompts x rl.rollout_n = {rows})")
        if rl.value_init and rl.estimator != "gae":
            raise ConfigError(f"rl.value_init is the critic's init: the critic is for estimator gae, not {rl.estimator}")
        if prompt_width(rl) + rl.response_len > cfg.model.max_seq_len:
            raise ConfigError(f"rl.max_prompt_len (bucketed to {prompt_width(rl)}) + rl.response_len "
                              f"({rl.response_len}) exceeds model.max_seq_len ({cfg.model.max_seq_len})")

    def make_objective(self):
        return RLObjective(self.cfg)

    # ------------------------------------------------------------------ params

    @property
    def live_reference(self) -> bool:
        return self.cfg.rl.kl_coef > 0

    def frozen_params(self, model_params: dict) -> dict:
        decoder, _ = params_lib.split_model_params(self.cfg.model, model_params)
        if self.cfg.lora.enabled:
            return {"base": decoder}
        return {"reference": decoder} if self.live_reference else {}

    def reference_params(self, frozen, trainable):
        return None  # the rollout gives the loss the reference's log-probs (batch["ref_logp"])

    def reference_model(self, state) -> dict | None:
        """The reference's decoder params (for the rollout's ref_logp), or None without KL."""
        if not self.live_reference:
            return None
        return state.frozen["base"] if self.cfg.lora.enabled else state.frozen["reference"]

    def batch_sizes(self) -> dict[str, int]:
        rl = self.cfg.rl
        return {"rl.prompts_per_step x rl.rollout_n": rl.rows_per_step,
                "rl.mini_batch_prompts x rl.rollout_n": rl.rows_per_step // rl.mini_batches,
                "rl.prompts_per_step x rl.eval_samples": rl.prompts_per_step * rl.eval_samples}

    def make_optimizer(self, schedule, total_updates: int):
        """AdamW for the policy; with a critic, a separate AdamW (lr rl.value_lr) for its tree."""
        policy = super().make_optimizer(schedule, total_updates)
        if not self.objective.has_critic:
            return policy
        opt = dataclasses.replace(self.cfg.optimizer, lr=self.cfg.rl.value_lr or self.cfg.optimizer.lr)
        critic = make_optimizer(opt, make_schedule(opt, self.cfg.schedule, total_updates))
        # Labels as a tree (not a function of the params), so optax.tree_map_params can map the
        # optimizer state's shardings.
        key = jax.random.PRNGKey(0)
        shapes = jax.eval_shape(lambda: self.init_trainable(self.init_model_params(key), key))
        labels = {k: jax.tree.map(lambda _, k=k: "critic" if k == "critic" else "policy", v) for k, v in shapes.items()}
        return optax.multi_transform({"policy": policy, "critic": critic}, labels)

    def edit_initial_params(self, host_params: dict, load_run) -> dict:
        """The critic from rl.value_init (a reward-model run: its decoder and reward head) or
        from the policy's initial decoder (value head zero)."""
        if not self.objective.has_critic:
            return host_params
        decoder, _ = params_lib.split_model_params(self.cfg.model, host_params)
        critic = dict(decoder) | {"value_head": host_params["critic"]["value_head"]}
        if self.cfg.rl.value_init:
            rm_cfg, rm = load_run(self.cfg.rl.value_init)
            if "reward_head" not in rm:
                raise ConfigError(f"rl.value_init {self.cfg.rl.value_init}: not a reward-model run (no reward_head)")
            if param_shapes(rm_cfg.model) != param_shapes(self.cfg.model):
                raise ConfigError(f"rl.value_init {self.cfg.rl.value_init}: its decoder's shapes differ from model.*")
            critic = {k: v for k, v in rm.items() if k != "reward_head"} | {"value_head": rm["reward_head"]}
        return host_params | {"critic": jax.tree.map(lambda x: np.asarray(x, np.float32), critic)}

    # ------------------------------------------------------------------ data

    def prepare(self, ctx: RunContext) -> None:
        self.rewards = Rewards(self.cfg.rl, self._reward_model(ctx) if "reward_model" in self.cfg.rl.rewards else None)

    def _reward_model(self, ctx: RunContext):
        """Scores of a reward-model run on prompt + response, in batches (its params on device)."""
        rm_cfg, params = ctx.load_run(self.cfg.rl.reward_model)
        if "reward_head" not in params:
            raise ConfigError(f"rl.reward_model {self.cfg.rl.reward_model}: not a reward-model run (no reward_head)")
        if rm_cfg.model.vocab_size != self.cfg.model.vocab_size:
            raise ConfigError(f"rl.reward_model {self.cfg.rl.reward_model}: vocab_size {rm_cfg.model.vocab_size} "
                              f"differs from the policy's {self.cfg.model.vocab_size} (one tokenizer is assumed)")
        width = prompt_width(self.cfg.rl) + self.cfg.rl.response_len
        score = jax.jit(lambda p, t, pos, seg: reward_scores(rm_cfg.model, p, t, pos, seg))

        def scorer(responses):
            rows = [sequence_row(r.prompt_tokens, r.response_tokens, width - 1, 0) for r in responses]
            batch = {k: np.stack([row[k] for row in rows]) for k in ("tokens", "positions", "segment_ids")}
            return np.asarray(score(params, batch["tokens"], batch["positions"], batch["segment_ids"]))

        return scorer

    def train_source(self, ctx: RunContext) -> RolloutSource:
        prompts = train_prompts(self.cfg, ctx.tokenizer, self.rewards.verifier_for)
        self.rollouts = RolloutSource(self, ctx.trainer, ctx.tokenizer, prompts, self.rewards)
        return self.rollouts

    def eval_sets(self, ctx: RunContext) -> dict[str, list[dict]]:
        n = self.cfg.trainer.eval_batches * self.cfg.rl.prompts_per_step
        return {"": eval_prompts(self.cfg, ctx.tokenizer, self.rewards.verifier_for, n)}

    def evaluate(self, trainer, state, batches) -> dict[str, float]:
        """Responses to the held-out prompts (greedy, or rl.eval_samples each at
        rl.eval_temperature), scored like training; means over all processes' responses (padding
        prompts, index -1, left out)."""
        rollouts, sums, rl = self.rollouts, {}, self.cfg.rl
        params = trainer.effective(state.params, state.frozen)
        key = jax.random.PRNGKey(self.cfg.trainer.seed)
        for i, prompts in enumerate(batches):
            batch = {k: np.repeat(v, rl.eval_samples, axis=0) for k, v in prompts.items()}
            gen = rollouts.sample(params, batch, jax.random.fold_in(key, i), greedy=not rl.eval_temperature,
                                  temperature=rl.eval_temperature)
            scores, parts, responses = rollouts.score_responses(batch, gen)
            real = (batch["index"] >= 0).astype(np.float32)
            local = {"n": real, "reward": scores * real, "response_length": real * np.array(
                [len(r.response_tokens) for r in responses], np.float32)}
            local |= {f"reward/{k}": v * real for k, v in parts.items()}
            for name in self.rewards.verifier_names() if "verifiable" in parts else ():
                hit = np.array([r.verifier == name for r in responses], np.float32) * real
                local[f"n/{name}"], local[f"accuracy/{name}"] = hit, hit * parts["verifiable"]
            for k, v in decode.host_values(trainer.to_global(local)).items():
                sums[k] = sums.get(k, 0.0) + float(np.sum(v))
        out = {}
        for k, v in sums.items():
            if k.startswith("accuracy/"):
                if sums[f"n/{k[9:]}"]:
                    out[f"eval_{k}"] = v / sums[f"n/{k[9:]}"]
            elif not k.startswith("n"):
                out[f"eval_{k}"] = v / max(sums["n"], 1.0)
        if "eval_reward/verifiable" in out:
            out["eval_accuracy"] = out["eval_reward/verifiable"]
        return out
