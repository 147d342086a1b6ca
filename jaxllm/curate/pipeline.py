"""The curation pass: filters -> decontamination -> exact dedup -> near dedup -> quality.

Pass 1 streams the input once: filters, decontamination and exact dedup decide per document;
survivors go to a temporary jsonl in the work folder while their MinHash signatures go to
on-disk shards and their quality logits to an array (8 bytes per document). Near dedup and
quality sampling need every survivor before deciding, so pass 2 reads the temporary file back
and writes the kept documents. Memory stays O(documents) in small arrays, never O(text).
"""

from __future__ import annotations

import array
import dataclasses
import json
import logging
import os
import shutil
import tempfile
import time

import numpy as np

from jaxllm.curate.config import CurateConfig
from jaxllm.curate.decontaminate import Decontaminator
from jaxllm.curate.dedup import ExactDedup, MinHashDedup
from jaxllm.curate.filters import build_filters
from jaxllm.curate.origin import doc_files
from jaxllm.curate.quality import QualityModel, select
from jaxllm.curate.report import Report
from jaxllm.data.documents import open_source

log = logging.getLogger(__name__)


def curate(cfg: CurateConfig) -> dict:
    """Runs the pipeline `cfg` describes, writes cfg.output (and cfg.report); returns the report."""
    start = time.perf_counter()
    source = open_source(cfg.input, text_field=cfg.text_field, strict=cfg.strict)
    files, file_of = doc_files(source)
    out_dir = os.path.dirname(os.path.abspath(cfg.output))
    os.makedirs(out_dir, exist_ok=True)
    work = tempfile.mkdtemp(prefix="curate-", dir=cfg.work_dir or out_dir)
    report = Report(cfg.removed)
    try:
        out = _run(cfg, source, files, file_of, work, report)
    finally:
        report.close()
        shutil.rmtree(work, ignore_errors=True)
    seconds = time.perf_counter() - start
    result = {
        "input": {"specs": list(cfg.input), "files": len(files), "documents": len(source),
                  "skipped": dict(source.skipped)},
        "output": {"path": cfg.output, **out},
        "stages": {name: s.to_dict() for name, s in report.stages.items()},
        "totals": {"documents_in": len(source), "documents_out": out["documents"],
                   "removed": len(source) - out["documents"], "seconds": round(seconds, 3),
                   "documents_per_second": round(len(source) / max(seconds, 1e-9), 1)},
        "config": dataclasses.asdict(cfg),
    }
    if cfg.report:
        with open(cfg.report, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2, ensure_ascii=False, default=str)
    return result


def _run(cfg: CurateConfig, source, files, file_of, work: str, report: Report) -> dict:
    filters = build_filters(cfg)
    filter_stats = [report.stage(f.name, f.rules) for f in filters]
    decon = decon_stats = exact = exact_stats = minhash = minhash_stats = model = quality_stats = None
    if cfg.decontaminate:
        t = time.perf_counter()
        decon = Decontaminator(cfg.decontaminate, text_field=cfg.decontam_text_field or cfg.text_field,
                               ngram=cfg.decontam_ngram, min_matches=cfg.decontam_min_matches, strict=cfg.strict)
        decon_stats = report.stage(decon.name, ["ngram_overlap"])
        decon_stats.seconds += time.perf_counter() - t
        decon_stats.extra = {**decon.stats, "ngram": cfg.decontam_ngram, "by_eval_file": {}}
    if "exact" in cfg.dedup:
        exact, exact_stats = ExactDedup(), report.stage(ExactDedup.name, ["duplicate"])
    if "minhash" in cfg.dedup:
        minhash = MinHashDedup(work, num_perm=cfg.minhash_num_perm, ngram=cfg.minhash_ngram,
                               shingle=cfg.minhash_shingle, threshold=cfg.minhash_threshold,
                               bands=cfg.minhash_bands, rows=cfg.minhash_rows,
                               shard_docs=cfg.minhash_shard_docs, seed=cfg.minhash_seed)
        minhash_stats = report.stage(minhash.name, ["near_duplicate"])
    if cfg.quality_model:
        model = QualityModel.load(cfg.quality_model)
        quality_rule = "below_threshold" if cfg.quality_tau is None else "not_sampled"
        quality_stats = report.stage("quality", [quality_rule])

    survivors = os.path.join(work, "survivors.jsonl")
    logits = array.array("d")
    n_survivors = 0
    with open(survivors, "w", encoding="utf-8") as tmp:
        for i in range(len(source)):
            if i and i % 10_000 == 0:
                log.info("curate: %d / %d documents read, %d pass so far", i, len(source), n_survivors)
            text, src = source[i], files[file_of[i]]
            for f, stats in zip(filters, filter_stats):
                stats.seen += 1
                t = time.perf_counter()
                verdict = f(text)
                stats.seconds += time.perf_counter() - t
                if verdict.text is None:
                    report.drop(stats, verdict.rule, i, src, text, verdict.detail)
                    break
                if verdict.lines_removed or verdict.edited:
                    stats.modified += 1
                    for rule, lines in verdict.lines_removed.items():
                        stats.rule(rule)["modified"] += 1
                        stats.rule(rule)["lines_removed"] += lines
                    for rule in verdict.edited:
                        stats.rule(rule)["modified"] += 1
                text = verdict.text
            else:
                if decon is not None:
                    decon_stats.seen += 1
                    t = time.perf_counter()
                    hit = decon(text)
                    decon_stats.seconds += time.perf_counter() - t
                    if hit is not None:
                        by_file = decon_stats.extra["by_eval_file"]
                        by_file[hit["eval_file"]] = by_file.get(hit["eval_file"], 0) + 1
                        report.drop(decon_stats, "ngram_overlap", i, src, text, hit)
                        continue
                if exact is not None:
                    exact_stats.seen += 1
                    t = time.perf_counter()
                    first = exact(text, i)
                    exact_stats.seconds += time.perf_counter() - t
                    if first is not None:
                        report.drop(exact_stats, "duplicate", i, src, text, {"duplicate_of": first})
                        continue
                if minhash is not None:
                    t = time.perf_counter()
                    minhash.add(text)
                    minhash_stats.seconds += time.perf_counter() - t
                if model is not None:
                    t = time.perf_counter()
                    logits.append(model.logit(text))
                    quality_stats.seconds += time.perf_counter() - t
                tmp.write(json.dumps({"id": i, "text": text}, ensure_ascii=False) + "\n")
                n_survivors += 1

    duplicate_of = np.full(n_survivors, -1, np.int64)  # survivor position of the kept copy, or -1
    if minhash is not None:
        minhash_stats.seen = n_survivors
        t = time.perf_counter()
        duplicate_of = minhash.duplicates()
        minhash.close()
        minhash_stats.seconds += time.perf_counter() - t
        minhash_stats.extra = dict(minhash.stats)
    keep_quality = np.ones(n_survivors, bool)
    if model is not None:
        unique = np.flatnonzero(duplicate_of < 0)
        quality_stats.seen = len(unique)
        scores = np.frombuffer(logits, np.float64) if len(logits) else np.zeros(0)
        keep_quality[unique] = select(scores[unique], threshold=cfg.quality_threshold, tau=cfg.quality_tau,
                                      keep_fraction=cfg.quality_keep_fraction, seed=cfg.quality_seed)
        quality_stats.extra = {"mode": "threshold" if cfg.quality_tau is None else "tau_sampling",
                               "mean_logit_in": float(scores[unique].mean()) if len(unique) else None,
                               "mean_logit_kept": float(scores[keep_quality & (duplicate_of < 0)].mean())
                               if (keep_quality & (duplicate_of < 0)).any() else None}

    ids = array.array("q")
    kept = chars = 0
    with open(survivors, encoding="utf-8") as tmp, open(cfg.output, "w", encoding="utf-8") as out:
        for j, line in enumerate(tmp):
            doc = json.loads(line)
            i, text = doc["id"], doc["text"]
            ids.append(i)
            src = files[file_of[i]]
            if duplicate_of[j] >= 0:
                report.drop(minhash_stats, "near_duplicate", i, src, text, {"duplicate_of": ids[duplicate_of[j]]})
            elif not keep_quality[j]:
                p = 1 / (1 + np.exp(-logits[j]))
                report.drop(quality_stats, quality_rule, i, src, text,
                            {"logit": round(logits[j], 4), "prob": round(float(p), 4)})
            else:
                out.write(json.dumps({"text": text, "id": i, "source": src}, ensure_ascii=False) + "\n")
                kept += 1
                chars += len(text)
    return {"documents": kept, "chars": chars}
