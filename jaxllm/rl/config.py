"""The `rl:` config section (`task: rl`): on-policy RL in veRL's batch structure.

Each step takes `prompts_per_step` prompts, samples `rollout_n` responses for each from the
current policy, scores them, computes advantages and then makes `ppo_epochs` passes over
mini-batches of `mini_batch_prompts` prompts (x rollout_n responses), one optimizer update each.
Names follow veRL where it has the knob (clip_ratio_low/high -> clip_low/high, clip_ratio_c ->
dual_clip, loss_agg_mode -> loss_agg, kl_loss_type -> kl_kind).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from jaxllm.frozendict import FrozenDict

ESTIMATORS = ("grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline", "gae")
LOSS_AGG = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
KL_KINDS = ("k1", "abs", "k2", "k3")


@dataclasses.dataclass(frozen=True)
class RLConfig:
    prompts_per_step: int = 8
    rollout_n: int = 4  # responses per prompt (a group, for grpo / rloo / reinforce_pp_baseline)
    mini_batch_prompts: int = 0  # prompts per optimizer update; 0: all of the step's prompts
    ppo_epochs: int = 1
    # Advantages (jaxllm.rl.advantages): grpo (norm_by_std false: Dr. GRPO), rloo, reinforce_pp,
    # reinforce_pp_baseline, gae (PPO with the critic).
    estimator: Literal["grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline", "gae"] = "grpo"
    norm_by_std: bool = True
    gamma: float = 1.0
    lam: float = 1.0
    # Policy loss (jaxllm.objectives.rl): PPO clip with DAPO's asymmetric bounds and dual clip.
    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: float = 3.0
    loss_agg: Literal["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"] = \
        "token-mean"
    entropy_coef: float = 0.0  # > 0: an entropy bonus in the loss (the entropy is always logged)
    # KL to the frozen reference (the initial policy): kl_coef 0 turns it off. kl_in_reward: in the
    # per-token reward (PPO, Tülu 3); else a loss term (GRPO).
    kl_coef: float = 0.0
    kl_kind: Literal["k1", "abs", "k2", "k3"] = "k1"
    kl_in_reward: bool = False
    # Low-probability tokens (Yang et al. 2025): advantage reweighting and Lopti; 0 turns each off.
    adv_reweight_alpha: float = 0.0
    lopti_eta: float = 0.0
    # Critic (estimator gae): a decoder with a scalar head, from a reward-model run (as Tülu 3) or,
    # with value_init "", from the policy's init; its own AdamW state (value_lr 0: optimizer.lr).
    value_init: str = ""
    value_lr: float = 0.0
    value_clip: float = 0.2
    # Rollouts (jaxllm.models.decode): prompts longer than max_prompt_len keep their end.
    max_prompt_len: int = 128
    response_len: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    # Evaluation on data.eval: greedy (eval_temperature 0), or the mean reward / accuracy of
    # eval_samples responses per prompt sampled at eval_temperature (pass@1 estimated by sampling).
    eval_temperature: float = 0.0
    eval_samples: int = 1
    # Rewards (jaxllm.rl.rewards): reward name -> weight, summed. "verifiable" checks each record's
    # ground truth with the verifier its `dataset` field names (verifiers maps dataset -> verifier).
    rewards: dict[str, float] = dataclasses.field(default_factory=lambda: FrozenDict({"verifiable": 1.0}))
    verifiers: dict[str, str] = dataclasses.field(default_factory=FrozenDict)
    non_stop_penalty: float = 0.0  # added when a response reaches response_len without stopping
    format_pattern: str = ""  # the "format" reward's regex (re.search on the response)
    reward_model: str = ""  # a jaxllm reward-model run, for the "reward_model" reward
    # Prompt records (Tülu 3 RLVR format): messages (or prompt), ground_truth, dataset.
    messages_field: str = "messages"
    prompt_field: str = "prompt"
    ground_truth_field: str = "ground_truth"
    dataset_field: str = "dataset"

    def __post_init__(self):
        for key in ("prompts_per_step", "rollout_n", "ppo_epochs", "response_len", "max_prompt_len"):
            if getattr(self, key) <= 0:
                raise ValueError(f"{key} must be > 0, got {getattr(self, key)}")
        if self.mini_batch_prompts < 0 or (self.mini_batch_prompts and self.prompts_per_step % self.mini_batch_prompts):
            raise ValueError(f"mini_batch_prompts ({self.mini_batch_prompts}) must divide prompts_per_step "
                             f"({self.prompts_per_step})")
        if self.estimator in ("grpo", "rloo") and self.rollout_n < 2:
            raise ValueError(f"estimator {self.estimator} compares responses to the same prompt: rollout_n must "
                             f"be >= 2, got {self.rollout_n}")
        if not (0 <= self.clip_low < 1 and self.clip_high >= 0):
            raise ValueError(f"clip_low must be in [0, 1) and clip_high >= 0, got {self.clip_low}, {self.clip_high}")
        if not self.dual_clip > 1:
            raise ValueError(f"dual_clip must be > 1 (veRL's clip_ratio_c), got {self.dual_clip}")
        if not 0 <= self.adv_reweight_alpha <= 1:
            raise ValueError(f"adv_reweight_alpha must be in [0, 1], got {self.adv_reweight_alpha}")
        if not 0 <= self.lopti_eta < 1:
            raise ValueError(f"lopti_eta must be in [0, 1), got {self.lopti_eta}")
        if not (0 <= self.gamma <= 1 and 0 <= self.lam <= 1):
            raise ValueError(f"gamma and lam must be in [0, 1], got {self.gamma}, {self.lam}")
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ValueError("temperature and top_k must be >= 0 and top_p in (0, 1]")
        if self.eval_samples < 1 or self.eval_temperature < 0 or (self.eval_samples > 1 and not self.eval_temperature):
            raise ValueError("eval_samples must be >= 1 and eval_temperature >= 0 (> 0 with several samples)")
        if self.kl_coef < 0 or self.entropy_coef < 0 or self.value_clip < 0 or self.value_lr < 0:
            raise ValueError("kl_coef, entropy_coef, value_clip and value_lr must be >= 0")

    @property
    def mini_batches(self) -> int:
        return self.prompts_per_step // (self.mini_batch_prompts or self.prompts_per_step)

    @property
    def rows_per_step(self) -> int:
        return self.prompts_per_step * self.rollout_n
