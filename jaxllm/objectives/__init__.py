"""Training objectives, one per task (see `base.Objective`).

`loss(params, batch)` returns `(loss_sum, aux)`: a summed loss and summed statistics with
`aux["weight"]`, the denominator (tokens, pairs, ...) the train step divides by after summing
over microbatches, so gradient accumulation equals one big batch exactly; `finalize(sums)` turns
summed statistics into metrics.

    pretrain  base.LMObjective     next-token loss per token (lm.py: chunked cross-entropy)
    sft       sft.SFTObjective     loss on assistant tokens, mean or sum; optional unlikelihood
    dpo       dpo.DPOObjective     pairwise preference losses (preference.py), per pair;
              dpo.KTOObjective     preference.loss_type kto, per example
    reward    reward.RewardObjective  Bradley-Terry on a scalar head, per pair

The DPO-family objectives also have `reference_fields(params, batch)` (the reference-cache
pass) and `needs_reference`. `jaxllm.tasks` picks the objective of a run.
"""

from jaxllm.objectives.base import LMObjective, Objective
from jaxllm.objectives.dpo import DPOObjective, KTOObjective
from jaxllm.objectives.lm import sequence_logps
from jaxllm.objectives.reward import RewardObjective, reward_scores
from jaxllm.objectives.sft import SFTObjective

__all__ = ["Objective", "LMObjective", "SFTObjective", "DPOObjective", "KTOObjective", "RewardObjective",
           "reward_scores", "sequence_logps"]
