"""`task: dpo`: the DPO family on preference pairs, and KTO on unpaired examples (the
`preference:` config section; prompts use `sft.template`).

`preference.loss_type` picks the objective (`objectives.DPOObjective`, or `KTOObjective` for kto)
and the data format ("pairs" or "kto", `jaxllm.data.posttrain`). Losses that need a reference
take its log-probs from a cache computed once before step 1 (`reference: cached`,
`reference_cache.py`) or from a frozen reference model evaluated every step (`reference: live`:
a copy of the initial params, or the LoRA base).
"""

from __future__ import annotations

from jaxllm.objectives import DPOObjective, KTOObjective
from jaxllm.tasks import reference_cache
from jaxllm.tasks.base import RunContext
from jaxllm.tasks.offline import OfflineTask


class DPOTask(OfflineTask):
    name = "dpo"
    section = "preference"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.data_format = "kto" if cfg.preference.loss_type == "kto" else "pairs"

    def make_objective(self):
        kto = self.cfg.preference.loss_type == "kto"
        return KTOObjective(self.cfg) if kto else DPOObjective(self.cfg)

    @property
    def live_reference(self) -> bool:
        return self.objective.needs_reference and self.cfg.preference.reference == "live"

    @property
    def cached_reference(self) -> bool:
        return self.objective.needs_reference and self.cfg.preference.reference == "cached"

    def prepare(self, ctx: RunContext) -> None:
        if self.cached_reference:
            self.reference = reference_cache.load_or_compute(self.cfg, self.objective, self.data_format, ctx)
