"""`task: rater` (QuRater, Wettig et al. 2024) and `task: edu` (a FineWeb-Edu style
educational-value regressor): a scalar head on the decoder (the reward model's `reward_head`,
read at each text's last real token), trained on judged pairs or annotated texts.

data.train / data.eval are .jsonl files. rater: `text_a`, `text_b`, `p_b_over_a` (the judged
probability that B is better than A, in [0, 1]) and optionally `criterion` (a run trains one;
`python -m jaxllm.select train-rater --criterion` picks it); the loss is the soft-label
Bradley-Terry loss. edu: data.text_field and `score` (0-5); the loss is the squared error.
Texts become BOS + tokens + EOS cut to data.seq_len (`jaxllm.select.records.TextRows`); batches
and their exact resume are `jaxllm.select.rating_data`'s. A trained run is read back with
`jaxllm.run.load_run` and scores texts through `jaxllm.select.scorers.ModelScorer`.
"""

from __future__ import annotations

from jaxllm.errors import ConfigError
from jaxllm.select.objectives import EduObjective, SoftBTObjective
from jaxllm.select.rating_data import RatingBatches, RatingExamples, eval_batches
from jaxllm.select.records import TextRows
from jaxllm.tasks.base import IteratorSource, RunContext, Task


class RatingTask(Task):
    length_keys = ("epochs",)
    samples_text = False
    data_kind: str  # "pairs" | "texts"

    @classmethod
    def check_config(cls, cfg) -> None:
        for split in ("train", "eval"):
            built_in = [s for s in getattr(cfg.data, split) if s.startswith("stdlib:")]
            if built_in:
                raise ConfigError(f"data.{split}: task {cls.name} reads jsonl files of "
                                  f"{'judged pairs' if cls.data_kind == 'pairs' else 'annotated texts'}, "
                                  f"not {built_in[0]}")

    def examples(self, split: str, tokenizer) -> RatingExamples:
        d = self.cfg.data
        rows = TextRows(tokenizer, d.seq_len, d.add_bos, d.add_eos)
        return RatingExamples(self.data_kind, d.train if split == "train" else d.eval, f"data.{split}", rows,
                              d.text_field)

    def train_source(self, ctx: RunContext) -> IteratorSource:
        d, t = self.cfg.data, self.cfg.trainer
        examples = self.examples("train", ctx.tokenizer)
        settings = {"task": self.name, "train": list(d.train), "examples": examples.size, "seq_len": d.seq_len,
                    "batch": t.batch_size, "seed": d.seed, "add_bos": d.add_bos, "add_eos": d.add_eos,
                    "vocab_size": ctx.tokenizer.vocab_size}
        return IteratorSource(RatingBatches(examples, t.batch_size, d.seed, settings), ctx.to_global,
                              lambda it: it.stats())

    def eval_sets(self, ctx: RunContext) -> dict[str, list[dict]]:
        t = self.cfg.trainer
        return {"": eval_batches(self.examples("eval", ctx.tokenizer), t.batch_size, t.eval_batches)}

    def batches_per_epoch(self, tokenizer) -> dict[str, int]:
        n = self.examples("train", tokenizer).size
        return {"batches": n // self.cfg.trainer.batch_size, "rows": n, "skipped": 0}


class RaterTask(RatingTask):
    name = "rater"
    data_kind = "pairs"

    def make_objective(self):
        return SoftBTObjective(self.cfg)


class EduTask(RatingTask):
    name = "edu"
    data_kind = "texts"

    def make_objective(self):
        return EduObjective(self.cfg)
