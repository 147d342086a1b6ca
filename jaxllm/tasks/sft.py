"""`task: sft`: supervised fine-tuning on conversations (the `sft:` config section).

Conversations go through the chat template into rows with a loss mask on assistant tokens,
packed whole or one per row (`jaxllm.data.posttrain`, format "sft"); the objective is
`objectives.SFTObjective` (mean or summed loss, optional unlikelihood).
"""

from __future__ import annotations

from jaxllm.objectives import SFTObjective
from jaxllm.tasks.offline import OfflineTask


class SFTTask(OfflineTask):
    name = "sft"
    section = "sft"
    reports_ppl = True
    data_format = "sft"

    def make_objective(self):
        return SFTObjective(self.cfg)
