"""The curation run as datatrove stages: which steps run, in which pass, with how many tasks.

A pass reads documents and runs steps over them, one task per input share; the passes are
chained through work files (`WorkReader` gives task r exactly what task r wrote before, so a
dedup filter sees the documents its signatures were computed on, in the same order):

  [decontam_index]   one task: the evaluation n-gram index
  pass1              readers -> filters -> [decontamination] -> [quality scorer] -> ...
  exact_find         (exact dedup) one task per hash range; the next pass starts with ExactDedupFilter
  minhash_buckets, minhash_cluster   (MinHash) the next pass starts with ClusterKeepers + MinhashDedupFilter
  quality_cutoff     (tau sampling) one task; the next pass starts with SampleFilter
  passN              ... -> [quality threshold] -> output writer
  report             one task: jaxllm.curate.report.ReportStep

A pass that a dedup (or sampling) stage follows ends by writing its documents and computing the
signatures (sampling keys) of exactly those documents. Each report-worthy step is listed in
`Stage.report` (pipeline index -> report stage name), removed documents go to one RemovalLog
folder per report stage.
"""

from __future__ import annotations

import dataclasses
import os

from datatrove.pipeline.decont import NGramsDecontConfig, NGramsDecontFilter

from jaxllm.curate import dedup, scoring
from jaxllm.curate.config import CurateConfig
from jaxllm.curate.decontaminate import EvalNGramIndexer
from jaxllm.curate.filters import build_filter
from jaxllm.curate.quality import QualityModel
from jaxllm.curate.readers import InputSet, WorkReader, make_reader, resolve_inputs
from jaxllm.curate.writers import RemovalLog, output_writer, work_writer
from jaxllm.errors import ConfigError

SINGLE_FILE_SUFFIXES = {".jsonl": "jsonl", ".jsonl.gz": "jsonl.gz", ".parquet": "parquet"}


@dataclasses.dataclass
class Stage:
    name: str
    pipeline: list
    tasks: int
    report: dict = dataclasses.field(default_factory=dict)  # pipeline index -> (report stage, counts?)
    in_driver: bool = False  # local and Ray runs do this one-task bookkeeping stage in this process


@dataclasses.dataclass
class Plan:
    stages: list
    work: str
    tasks: int
    input_files: int
    out_folder: str          # where the output writer writes one file per task
    output: str              # the user's output: out_folder itself, or one file merged from it
    output_format: str
    single_file: bool
    report_stages: list      # report stage names in pipeline order
    shares: list             # the inputs (readers.InputSet)


def output_layout(cfg: CurateConfig, work: str) -> tuple[str, str, bool]:
    """(format, folder the writer fills, whether the output is one merged file)."""
    for suffix, fmt in SINGLE_FILE_SUFFIXES.items():
        if cfg.output.endswith(suffix):
            return cfg.output_format or fmt, os.path.join(work, "output"), True
    return cfg.output_format or "jsonl", cfg.output, False


class _Builder:
    """Accumulates the steps of the current pass and the stages finished so far."""

    def __init__(self, cfg: CurateConfig, work: str, tasks: int):
        self.cfg, self.work, self.tasks = cfg, work, tasks
        self.stages, self.steps, self.report, self.names = [], [], {}, []
        self.passes = 0

    def add(self, step, report_name: str | None = None, counts: bool = True) -> None:
        """Appends `step`; its time goes to report stage `report_name`, and its document counts
        too when `counts` (the step that decides, not the ones that prepare the decision)."""
        if report_name is not None:
            self.report[len(self.steps)] = (report_name, counts)
            if counts and report_name not in self.names:
                self.names.append(report_name)
        self.steps.append(step)

    def log(self, stage: str, rule: str, detail_keys=()) -> RemovalLog:
        return RemovalLog(os.path.join(self.work, "removed", stage), stage, rule, detail_keys)

    def end_pass(self, tail, report_name: str) -> None:
        """Closes the current pass: it writes its documents, then runs `tail` (a signature or
        key step) over them; the next pass reads what it wrote."""
        self.passes += 1
        folder = os.path.join(self.work, f"pass{self.passes}")
        self.add(work_writer(folder))
        self.add(tail, report_name, counts=False)
        self.stages.append(Stage(f"pass{self.passes}", self.steps, self.tasks, self.report))
        self.steps, self.report = [], {}
        self.add(WorkReader(folder))

    def single(self, name: str, step, tasks: int = 1, report_name: str | None = None) -> None:
        self.stages.append(Stage(name, [step], tasks, {0: (report_name, False)} if report_name else {}))


def _first_pass(b: _Builder, cfg: CurateConfig, shares: list[InputSet]) -> None:
    os.makedirs(os.path.join(b.work, "inputs"), exist_ok=True)
    for i, share in enumerate(shares):
        paths_file = None
        if share.glob is None:
            paths_file = os.path.join(b.work, "inputs", f"{i}-{share.kind}.paths")
            with open(paths_file, "w", encoding="utf-8") as f:
                f.write("".join(p + "\n" for p in share.files))
        b.add(make_reader(share, paths_file, cfg.text_field, cfg.id_field, cfg.strict), "input")
    for name in cfg.filters:
        b.add(build_filter(name, cfg, b.log(name, name, ("language", "language_score"))), name)
    if cfg.decontaminate:
        index = os.path.join(b.work, "decontam_index")
        b.single("decontam_index", EvalNGramIndexer(
            cfg.decontaminate, index, n_grams=cfg.decontam_n_grams, language=cfg.language, strict=cfg.strict,
            text_field=cfg.decontam_text_field or cfg.text_field), report_name="decontaminate")
        log = b.log("decontaminate", "contaminated", ("contaminated_ngram", "contaminated_task"))
        b.add(NGramsDecontFilter(index, config=NGramsDecontConfig(n_grams=cfg.decontam_n_grams),
                                 exclusion_writer=log, language=cfg.language), "decontaminate")
    if cfg.quality_model:
        b.add(quality_scorer(cfg)[0], "quality", counts=False)


def _dedup_passes(b: _Builder, cfg: CurateConfig) -> None:
    for method in cfg.dedup:
        if method == "exact":
            signature, find, exact_filter = dedup.exact_steps(cfg, b.work, b.log("exact_dedup", "duplicate"))
            b.end_pass(signature, "exact_dedup")
            b.single("exact_find", find, cfg.exact_finder_workers, "exact_dedup")
            b.add(exact_filter, "exact_dedup")
        else:
            steps = dedup.minhash_steps(cfg, b.work, b.log("minhash_dedup", "near_duplicate", (dedup.CLUSTER_KEY,)))
            b.end_pass(steps["signature"], "minhash_dedup")
            b.single("minhash_buckets", steps["buckets"], cfg.minhash_num_buckets * cfg.minhash_workers_per_bucket,
                     "minhash_dedup")
            b.single("minhash_cluster", steps["cluster"], 1, "minhash_dedup")
            b.add(steps["keepers"], "minhash_dedup", counts=False)
            b.add(steps["filter"], "minhash_dedup")


def quality_scorer(cfg: CurateConfig):
    """(scorer step, its score key, quality_threshold as a score) of cfg.quality_model: a jaxllm
    rating run (QuRater / educational value: the threshold is a raw score, e.g. 2.5 keeps edu
    scores >= 3) or the hashed-bigram model file (the threshold is a probability)."""
    from jaxllm.select.scorers import rating_model_info

    path = cfg.quality_model
    info = rating_model_info(path) if os.path.isdir(os.path.expanduser(path)) else None
    if info is not None:
        return scoring.RatingModelScorer(path, info["score_key"]), info["score_key"], cfg.quality_threshold
    if os.path.isdir(os.path.expanduser(path)):
        raise ConfigError(f"quality_model: {path} is a folder but not a jaxllm rating run (task rater or edu); "
                          "give one, or a hashed-bigram model file from train-quality")
    QualityModel.load(path)  # a missing or foreign file fails here, not in every task
    threshold = None if cfg.quality_threshold is None else scoring.logit_of(cfg.quality_threshold)
    return scoring.HashedBigramScorer(path), scoring.QUALITY_KEY, threshold


def _quality_selection(b: _Builder, cfg: CurateConfig) -> None:
    if not cfg.quality_model:
        return
    _, key, threshold = quality_scorer(cfg)
    log = b.log("quality", "below_threshold", (key,))
    if threshold is not None:
        b.add(scoring.ScoreThreshold(threshold, score_key=key, exclusion_writer=log), "quality")
    elif cfg.quality_tau is not None:
        keys = os.path.join(b.work, "quality_keys")
        b.end_pass(scoring.SampleKeys(keys, cfg.quality_tau, cfg.quality_seed, score_key=key), "quality")
        b.single("quality_cutoff", scoring.SampleCutoff(keys, cfg.quality_keep_fraction), 1, "quality")
        b.add(scoring.SampleFilter(keys, cfg.quality_tau, cfg.quality_seed, score_key=key, exclusion_writer=log),
              "quality")


def make_plan(cfg: CurateConfig, work: str, report_step_factory) -> Plan:
    """The stages of `cfg`'s run in `work`; the last one is `report_step_factory(plan)`."""
    shares = resolve_inputs(cfg.input)
    n_files = sum(share.count() for share in shares)
    tasks = cfg.tasks or max(1, n_files)
    fmt, out_folder, single_file = output_layout(cfg, work)
    b = _Builder(cfg, work, tasks)
    _first_pass(b, cfg, shares)
    _dedup_passes(b, cfg)
    _quality_selection(b, cfg)
    b.add(output_writer(out_folder, fmt, cfg.text_field, cfg.id_field), "output")
    b.stages.append(Stage(f"pass{b.passes + 1}", b.steps, tasks, b.report))
    plan = Plan(b.stages, work, tasks, n_files, out_folder, cfg.output, fmt, single_file, b.names, shares)
    plan.stages.append(Stage("report", [report_step_factory(plan)], 1, in_driver=True))
    return plan
