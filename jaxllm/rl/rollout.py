"""The batch source of `task: rl`: each step's batch is sampled from the current policy.

For step s (veRL's order): take rl.prompts_per_step prompts, sample rl.rollout_n responses for
each (`models.decode.generate`, the policy's params sharded as in training, the key folded with
s so a resumed run samples the same), score them (`rewards.Rewards`, on each process's own
responses), recompute the old log-probs with the training forward, the reference's log-probs
and the critic's values, and compute the advantages. The rows are prompt + response, left-padded
prompts of one width: tokens / targets / positions / segment_ids [B, T] (T = prompt width +
response_len - 1), loss_mask 1 on the response's targets (the stop token included).

The largest gap between the sampling log-probs and the recomputed old log-probs is logged as
`rollout/logp_gap_max`: on the same params it is numerical noise; anything larger is a bug in
decoding.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from jaxllm.data import chat
from jaxllm.data.hf_export import stop_tokens
from jaxllm.models import decode
from jaxllm.objectives.rl import kl_penalty
from jaxllm.parallel.mesh import activation_sharding, logical_to_spec
from jaxllm.rl import advantages as adv_lib
from jaxllm.rl.lopti import lopti_masks, reweight_advantages
from jaxllm.rl.rewards import Response, decode_ground_truth


def rows_from_rollout(prompt_BP, prompt_len_B, tokens_BN, logps_BN, lengths_B):
    """The training rows of prompt + response, and the sampling log-probs at the response
    targets. Target t predicts token t + 1 of the joined sequence; response token j sits at
    joined position P + j, so its target index is P - 1 + j."""
    B, P = prompt_BP.shape
    N = tokens_BN.shape[1]
    seq = jnp.concatenate([prompt_BP, tokens_BN], axis=1)
    T = P + N - 1
    idx = jnp.arange(T)[None, :]
    start = (P - prompt_len_B)[:, None]
    real = (idx >= start) & (idx < P + lengths_B[:, None])
    response = (idx >= P - 1) & (idx < P - 1 + lengths_B[:, None])
    rollout_logp = jnp.pad(logps_BN, ((0, 0), (P - 1, 0)))[:, :T]
    rows = {"tokens": seq[:, :-1], "targets": seq[:, 1:], "positions": jnp.maximum(idx - start, 0).astype(jnp.int32),
            "segment_ids": real.astype(jnp.int32), "loss_mask": response.astype(jnp.float32)}
    return rows, rollout_logp * rows["loss_mask"]


def last_token_rewards(scores_B, mask_BT):
    """[B, T]: each response's score on its last response token (outcome reward)."""
    T = mask_BT.shape[1]
    last = T - 1 - jnp.argmax(mask_BT[:, ::-1] > 0, axis=1)
    return jax.nn.one_hot(last, T, dtype=jnp.float32) * scores_B[:, None] * (jnp.sum(mask_BT, 1) > 0)[:, None]


class RolloutSource:
    """A BatchSource (tasks.base): `next(state)` makes the step's batch from the current policy.

    `task` is the RLTask (objective, reference and rewards); `trainer` the compiled Trainer
    (effective params, mesh, batch sharding); `prompts` the prompt iterator of
    `prompts.train_prompts`."""

    def __init__(self, task, trainer, tokenizer, prompts, rewards):
        self.task, self.trainer, self.tokenizer, self.prompts, self.rewards = task, trainer, tokenizer, prompts, rewards
        self.cfg, self.rl, self.mesh = task.cfg, task.cfg.rl, trainer.mesh
        self.step = 0
        self.key = jax.random.fold_in(jax.random.PRNGKey(task.cfg.trainer.seed), 0x5A3C)  # "rollout"
        # EOS, and the template's turn-end marker when it is one token (e.g. <|im_end|>).
        template = chat.load_template(task.cfg.sft.template, tokenizer)
        self.stop_ids = tuple(stop_tokens(tokenizer, template)[0])
        self.pad_id = max(tokenizer.pad_id, 0)
        self._stats: dict[int, dict] = {}
        self._score = jax.jit(self._score_fn)
        self._finish = jax.jit(self._finish_fn)

    # ------------------------------------------------------------------ BatchSource

    def get_state(self) -> dict:
        return {"prompts": self.prompts.get_state(), "step": self.step}

    def set_state(self, saved: dict) -> None:
        self.prompts.set_state(saved["prompts"])
        self.step = int(saved["step"])

    def stats(self, step: int) -> dict:
        return self._stats.pop(step, {})

    def next(self, state) -> dict:
        prompts = next(self.prompts)
        self.step += 1
        n = self.rl.rollout_n
        local = {k: np.repeat(v, n, axis=0) for k, v in prompts.items()}
        groups = jax.process_index() * len(prompts["index"]) + np.repeat(np.arange(len(prompts["index"])), n)
        t0 = time.perf_counter()
        params = self.trainer.effective(state.params, state.frozen)
        gen = self.sample(params, local, jax.random.fold_in(self.key, self.step), greedy=False)
        rows, rollout_logp = self._rows(local, gen)
        jax.block_until_ready(rows)
        t1 = time.perf_counter()
        scores, parts, responses = self.score_responses(local, gen)
        old_logp, entropy, ref_logp, values = self._score(params, self.task.reference_model(state), rows)
        batch, metrics = self._finish(rows, rollout_logp, old_logp, entropy, ref_logp, values,
                                      self.trainer.to_global({"scores": scores, "groups": groups.astype(np.int32)}))
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        t2 = time.perf_counter()
        self._stats[self.step] = metrics | self._reward_stats(scores, parts, responses) | {
            "time/rollout_s": t1 - t0, "time/score_s": t2 - t1,
            "rollout/tokens_per_s": metrics["rollout/response_tokens"] / max(t1 - t0, 1e-9)}
        return batch

    # ------------------------------------------------------------------ pieces

    def sample(self, params, local: dict, key, *, greedy: bool, temperature: float | None = None) -> decode.Generation:
        """Responses to this process's prompt rows (greedy, or at `temperature`, default rl.temperature)."""
        rl = self.rl
        g = self.trainer.to_global({"t": local["prompt_tokens"], "l": local["prompt_length"]})
        temperature = rl.temperature if temperature is None else temperature
        return decode.generate(self.cfg.model, params, g["t"], g["l"], max_new_tokens=rl.response_len, rng=key,
                               temperature=0.0 if greedy else temperature, top_k=rl.top_k, top_p=rl.top_p,
                               stop_ids=self.stop_ids, pad_id=self.pad_id, mesh=self.mesh)

    def _rows(self, local, gen):
        g = self.trainer.to_global({"t": local["prompt_tokens"], "l": local["prompt_length"]})
        return _rows_jit(g["t"], g["l"], gen.tokens, gen.logps, gen.lengths, mesh=self.mesh)

    def local_rows(self, x) -> np.ndarray:
        """This process's rows of a global array sharded over the batch."""
        if jax.process_count() == 1:
            return np.asarray(jax.device_get(x))
        from jax.experimental import multihost_utils

        spec = PartitionSpec(logical_to_spec(("batch",))[0])
        return np.asarray(multihost_utils.global_array_to_host_local_array(x, self.mesh, spec))

    def score_responses(self, local: dict, gen):
        """(global scores [B], per-reward parts, this process's Responses)."""
        tokens, lengths = self.local_rows(gen.tokens), self.local_rows(gen.lengths)
        responses = []
        for i in range(len(lengths)):
            resp = tokens[i, :lengths[i]]
            stopped = bool(lengths[i] and resp[-1] in self.stop_ids)
            text_ids = resp[:-1] if stopped else resp
            p = local["prompt_tokens"][i, len(local["prompt_tokens"][i]) - local["prompt_length"][i]:]
            responses.append(Response(self.tokenizer.decode([int(t) for t in text_ids]), stopped,
                                      str(local["verifier"][i]), decode_ground_truth(local["ground_truth"][i]),
                                      p, resp))
        scores, parts = self.rewards(responses)
        return scores, parts, responses

    def _reward_stats(self, scores, parts, responses) -> dict:
        """Reward mean / std, each reward's mean and the accuracy per verifier, over all
        processes' responses (every process builds the same keys)."""
        local = {"reward": scores, **{f"reward/{k}": v for k, v in parts.items()}}
        names = self.rewards.verifier_names() if "verifiable" in parts else []
        for name in names:
            hit = np.array([r.verifier == name for r in responses], np.float32)
            local[f"n/{name}"], local[f"correct/{name}"] = hit, hit * parts["verifiable"]
        g = decode.host_values(self.trainer.to_global(local))
        out = {"reward/mean": float(np.mean(g["reward"])), "reward/std": float(np.std(g["reward"]))}
        out |= {f"{k}/mean": float(np.mean(v)) for k, v in g.items() if k.startswith("reward/")}
        if "verifiable" in parts:
            out["accuracy"] = float(np.mean(g["reward/verifiable"]))
            out |= {f"accuracy/{name}": float(np.sum(g[f"correct/{name}"]) / np.sum(g[f"n/{name}"]))
                    for name in names if np.sum(g[f"n/{name}"])}
        return out

    def _score_fn(self, params, ref_params, rows):
        """(old log-probs, entropy, reference log-probs, values) [B, T] under the step's params."""
        objective = self.task.objective
        with activation_sharding(self.mesh):
            old_logp, entropy = objective.token_stats(params, rows)
            ref_logp = old_logp if ref_params is None else objective.token_stats(ref_params, rows)[0]
            values = objective.values(params, rows) if objective.has_critic else jnp.zeros_like(old_logp)
        return old_logp, entropy, ref_logp, values

    def _finish_fn(self, rows, rollout_logp, old_logp, entropy, ref_logp, values, host):
        """The training batch (rows + old_logp, ref_logp, advantages, ...) and rollout metrics."""
        rl, mask = self.rl, rows["loss_mask"]
        token_rewards = last_token_rewards(host["scores"], mask)
        kl = kl_penalty(old_logp, ref_logp, rl.kl_kind) * mask
        if rl.kl_coef > 0 and rl.kl_in_reward:
            token_rewards = token_rewards - rl.kl_coef * kl
        returns = jnp.zeros_like(mask)
        if rl.estimator == "gae":
            advantages, returns = adv_lib.gae(token_rewards, values, mask, gamma=rl.gamma, lam=rl.lam)
        elif rl.estimator == "reinforce_pp":
            advantages, returns = adv_lib.reinforce_pp(token_rewards, mask, gamma=rl.gamma)
        else:
            advantages = adv_lib.group_advantages(jnp.sum(token_rewards, 1), host["groups"], mask,
                                                  estimator=rl.estimator, norm_by_std=rl.norm_by_std)
        advantages = reweight_advantages(advantages, old_logp, alpha=rl.adv_reweight_alpha) * mask
        batch = rows | {"old_logp": old_logp, "ref_logp": ref_logp, "advantages": advantages}
        if rl.estimator == "gae":
            batch |= {"returns": returns, "old_values": values}
        if rl.lopti_eta > 0:
            batch["loss_mask_low"], batch["loss_mask_high"] = lopti_masks(old_logp, mask, eta=rl.lopti_eta)
        n = jnp.maximum(jnp.sum(mask), 1.0)
        lengths = jnp.sum(mask, 1)
        metrics = {"rollout/logp_gap_max": jnp.max(jnp.abs(rollout_logp - old_logp * mask)),
                   "rollout/response_tokens": jnp.sum(mask), "response_length/mean": jnp.mean(lengths),
                   "response_length/max": jnp.max(lengths),
                   "response_length/clip_ratio": jnp.mean((lengths >= rl.response_len).astype(jnp.float32)),
                   "rollout/entropy": jnp.sum(entropy * mask) / n, "rollout/kl_ref": jnp.sum(kl) / n,
                   "advantages/mean": jnp.sum(advantages) / n}
        if rl.estimator == "gae":
            residual = jnp.sum(((returns - values) * mask) ** 2) / n
            var = jnp.sum(((returns - jnp.sum(returns * mask) / n) * mask) ** 2) / n
            metrics["critic/explained_variance"] = 1.0 - residual / jnp.maximum(var, 1e-8)
        return batch, metrics


@functools.partial(jax.jit, static_argnames=("mesh",))
def _rows_jit(prompt_BP, prompt_len_B, tokens_BN, logps_BN, lengths_B, *, mesh):
    del mesh  # part of the cache key: one compilation per mesh
    return rows_from_rollout(prompt_BP, prompt_len_B, tokens_BN, logps_BN, lengths_B)
