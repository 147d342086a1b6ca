"""Rewards of RL responses: a registry of reward functions, combined by the weights in `rl.rewards`.

    verifiable      1 when the record's verifier (chosen by its `dataset`, see `jaxllm.rl.verifiers`)
                    accepts the response against the record's ground truth, else 0 (Tülu 3's
                    correct_reward is the weight: `rl.rewards: {verifiable: 10}`)
    math, exact, ifeval, knights_knaves
                    that verifier on every response, whatever the record's dataset
    format          1 when `rl.format_pattern` matches the response (re.search)
    reward_model    the score of a jaxllm reward-model run (`rl.reward_model`) on prompt + response

A ground truth the verifier cannot read gives 0 and is counted (`errors`) rather than stopping
the run. `rl.non_stop_penalty` is added to the total of a response that reached `rl.response_len`
without a stop token (Tülu 3: -10). Besides the totals, `Rewards` reports each reward's mean and
the verifiable accuracy per verifier.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable

import numpy as np

from jaxllm.errors import ConfigError
from jaxllm.rl import verifiers

REWARDS = tuple(dict.fromkeys(("verifiable", "format", "reward_model") + tuple(verifiers.VERIFIERS)))


@dataclasses.dataclass(frozen=True)
class Response:
    """One sampled response and what its reward needs."""

    text: str  # decoded, without the stop token
    stopped: bool  # ended with a stop token (else it reached rl.response_len)
    verifier: str  # the verifier the record's dataset names
    ground_truth: Any  # the record's ground truth (a JSON value), None when it has none
    prompt_tokens: np.ndarray  # the prompt's ids (no padding)
    response_tokens: np.ndarray  # the response's ids, the stop token included


def decode_ground_truth(text: str) -> Any:
    return json.loads(str(text))


def check_rewards(rl) -> None:
    """ConfigError for unknown reward or verifier names and a missing reward model."""
    unknown = sorted(set(rl.rewards) - set(REWARDS))
    if unknown:
        raise ConfigError(f"rl.rewards: {', '.join(unknown)} not among {', '.join(REWARDS)}")
    if not rl.rewards:
        raise ConfigError("rl.rewards: give at least one reward (e.g. {verifiable: 1.0})")
    bad = sorted(v for v in rl.verifiers.values() if v not in verifiers.VERIFIERS)
    if bad:
        raise ConfigError(f"rl.verifiers: {', '.join(bad)} not among {', '.join(verifiers.VERIFIERS)}")
    if "reward_model" in rl.rewards and not rl.reward_model:
        raise ConfigError("rl.rewards has reward_model: set rl.reward_model to a reward-model run directory")
    if "format" in rl.rewards and not rl.format_pattern:
        raise ConfigError("rl.rewards has format: set rl.format_pattern (a regular expression)")


class Rewards:
    """Scores responses: `(totals [n], stats)`. `reward_model` is a callable on responses
    returning their scores (built by the task from rl.reward_model), needed only when the
    reward_model reward is weighted."""

    def __init__(self, rl, reward_model: Callable[[list[Response]], np.ndarray] | None = None):
        check_rewards(rl)
        self.rl, self.weights = rl, dict(rl.rewards)
        self.reward_model = reward_model
        self.errors = 0  # responses whose record's ground truth the verifier could not read

    def verifier_for(self, dataset: str) -> tuple[str, bool]:
        """(verifier name, whether it needs a ground truth) for a record's dataset; KeyError if
        none checks it (the prompt pipeline counts such records as skipped)."""
        name = self.rl.verifiers.get(dataset, dataset)
        if name not in verifiers.VERIFIERS:
            if "verifiable" not in self.weights:  # no reward looks at the record's verifier
                return "", False
            raise KeyError(f"dataset {dataset!r}: no verifier of that name (rl.verifiers maps datasets to "
                           f"{', '.join(verifiers.VERIFIERS)})")
        return name, verifiers.VERIFIERS[name].needs_ground_truth

    def verifier_names(self) -> list[str]:
        """The verifiers the verifiable reward can pick (for per-verifier accuracies)."""
        return sorted(verifiers.VERIFIERS)

    def _check(self, verifier: str, r: Response, **params) -> float:
        """The verifier's reward; 0 (counted in `errors`) for a ground truth it cannot read."""
        try:
            return verifiers.score(verifier, r.text, r.ground_truth, **params)
        except (verifiers.MissingGroundTruthError, verifiers.BadGroundTruthError):
            self.errors += 1
            return 0.0

    def _one(self, name: str, responses: list[Response]) -> np.ndarray:
        if name == "verifiable":
            return np.array([self._check(r.verifier, r) for r in responses], np.float32)
        if name == "format":
            return np.array([self._check("format", r, pattern=self.rl.format_pattern) for r in responses], np.float32)
        if name == "reward_model":
            return np.asarray(self.reward_model(responses), np.float32)
        return np.array([self._check(name, r) for r in responses], np.float32)

    def __call__(self, responses: list[Response]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """(total reward per response, per-response components by name)."""
        parts = {name: self._one(name, responses) for name in self.weights}
        total = sum(self.weights[name] * part for name, part in parts.items())
        stopped = np.array([r.stopped for r in responses], bool)
        total = total + self.rl.non_stop_penalty * (~stopped)
        return np.asarray(total, np.float32), parts
