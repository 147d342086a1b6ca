"""`task: reward`: a Bradley-Terry reward model on preference pairs (`objectives.RewardObjective`:
a scalar head on the final hidden state, with an optional per-pair margin). The pairs are read
as for DPO (format "pairs", the `preference:` section's fields). A reward model does not
generate, so a run ends without a text sample.
"""

from __future__ import annotations

from jaxllm.errors import ConfigError
from jaxllm.objectives import RewardObjective
from jaxllm.tasks.offline import OfflineTask


class RewardTask(OfflineTask):
    name = "reward"
    section = "preference"
    samples_text = False
    data_format = "pairs"

    @classmethod
    def check_config(cls, cfg) -> None:
        if cfg.preference.loss_type == "kto":
            raise ConfigError("preference.loss_type kto needs task dpo (a reward model trains on pairs)")

    def make_objective(self):
        return RewardObjective(self.cfg)
