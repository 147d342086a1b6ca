"""Post-training tasks on fixed records (sft, dpo, reward): their batches come from
`jaxllm.data.posttrain` in the task's data format ("sft", "pairs" or "kto"), one pass over
data.train is countable (trainer.epochs), and a cached reference (DPO) joins in by index."""

from __future__ import annotations

from jaxllm.data import posttrain
from jaxllm.tasks.base import IteratorSource, RunContext, Task


class OfflineTask(Task):
    length_keys = ("epochs",)
    data_format: str  # "sft" | "pairs" | "kto"
    reference: dict | None = None  # cached reference log-probs by split, if the task has them

    def train_source(self, ctx: RunContext) -> IteratorSource:
        it = posttrain.train_iterator(self.cfg, ctx.tokenizer, self.data_format, reference=self.reference)
        return IteratorSource(it, ctx.to_global)

    def eval_sets(self, ctx: RunContext) -> dict[str, list[dict]]:
        return {"": posttrain.eval_batches(self.cfg, ctx.tokenizer, self.data_format,
                                           self.cfg.trainer.eval_batches, reference=self.reference)}

    def batches_per_epoch(self, tokenizer) -> dict[str, int]:
        return posttrain.batches_per_epoch(self.cfg, tokenizer, self.data_format)
