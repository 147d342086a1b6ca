"""`task: pretrain`: next-token loss on packed documents from a mixture of sources and stages.

The batches come from `jaxllm.data.pipeline.make_train_iterator` (named sources mixed by the
weights of the current curriculum stage); a stage that sets rope_theta changes the model from
its start on (`model_at`). Eval: data.eval, plus each source of data.sources that lists eval
files of its own (logged as eval_loss/<source> and eval_ppl/<source>).
"""

from __future__ import annotations

from jaxllm.data import curriculum, pipeline
from jaxllm.data.packing import packing_stats
from jaxllm.objectives import LMObjective
from jaxllm.tasks.base import IteratorSource, RunContext, Task


def _mixture_stats(iterator) -> dict:
    return dict(iterator.stats()) | {"padding_fraction": packing_stats(iterator)["padding_fraction"]}


class PretrainTask(Task):
    name = "pretrain"
    length_keys = ("total_tokens",)
    uses_mixtures = True
    reports_ppl = True

    def make_objective(self):
        return LMObjective(self.cfg.model, self.cfg.trainer.loss_chunk_size)

    def model_at(self, step: int):
        if not self.cfg.data.stages:
            return self.cfg.model
        return curriculum.model_config_at(self.cfg, step)

    def batch_sizes(self) -> dict[str, int]:
        stages = {f"data.stages[{s.index}].batch_size": s.batch_size for s in curriculum.stage_plan(self.cfg)}
        return super().batch_sizes() | stages

    def train_source(self, ctx: RunContext) -> IteratorSource:
        iterator = pipeline.make_train_iterator(self.cfg, ctx.tokenizer)
        return IteratorSource(iterator, ctx.to_global, _mixture_stats)

    def eval_sets(self, ctx: RunContext) -> dict[str, list[dict]]:
        n = self.cfg.trainer.eval_batches
        sets = {"": pipeline.make_eval_batches(self.cfg, ctx.tokenizer, n)}
        for name in pipeline.eval_source_names(self.cfg):
            sets[name] = pipeline.make_eval_batches(self.cfg, ctx.tokenizer, n, source_name=name)
        return sets
