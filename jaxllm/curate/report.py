"""The report of a curation run, made by its last stage (`ReportStep`, one task).

It reads what the other stages left in the work folder: every task's datatrove stats
(`logs/<stage>/stats/<rank>.json`), the removal records (`removed/<stage>/<rank>.jsonl`), the
near-duplicate cluster keepers and the decontamination index's file names. Per report stage it
gives documents seen, removed and modified, removals per rule (datatrove's reasons; for C4 also
the lines each line rule removed), CPU seconds summed over tasks, and the first removed document
of each rule as an example; removed near duplicates name the id of the copy that stayed. With
`removed` set it writes every removal record there; when the output is one file it merges the
tasks' files into it. A run on the local or Ray executor adds the wall time of each stage.
"""

from __future__ import annotations

import collections
import json
import os
import shutil

from datatrove.pipeline.base import PipelineStep

from jaxllm.curate.decontaminate import INDEX_INFO

WALL_TIMES = "wall_seconds.json"


def _total(value) -> float:
    return value["total"] if isinstance(value, dict) else value


def step_totals(log_dir: str, n_steps: int) -> list[dict]:
    """Per pipeline step: {"seconds": summed time, stat name: summed total} over all task stats."""
    out = [collections.Counter() for _ in range(n_steps)]
    folder = os.path.join(log_dir, "stats")
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        with open(os.path.join(folder, name)) as f:
            steps = json.load(f)
        for acc, step in zip(out, steps):
            acc["seconds"] += _total(step["time_stats"])
            for key, value in step["stats"].items():
                acc[key] += _total(value)
    return out


def _stage_counts(stats: collections.Counter) -> dict:
    rules = {}
    for key, value in stats.items():
        if key.startswith("dropped_"):
            rules[key[len("dropped_"):]] = {"removed": int(value)}
        elif key.startswith("line-filter-"):
            rules.setdefault(key[len("line-filter-"):], {})["lines_removed"] = int(value)
    return {"seen": int(stats["total"]), "removed": int(stats["dropped"]), "modified": int(stats["modified"]),
            "rules": rules}


def _read_removals(work: str, stage: str):
    folder = os.path.join(work, "removed", stage)
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        with open(os.path.join(folder, name), encoding="utf-8") as f:
            for line in f:
                yield json.loads(line)


def _keepers(work: str) -> dict:
    out, folder = {}, os.path.join(work, "minhash", "keepers")
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        with open(os.path.join(folder, name)) as f:
            out.update(json.load(f))
    return out


def merge_output(folder: str, path: str, fmt: str) -> None:
    """The tasks' output files, in task order, as the one file `path` (atomically)."""
    names = sorted(n for n in os.listdir(folder) if not n.startswith(".")) if os.path.isdir(folder) else []
    tmp = f"{path}.tmp-{os.getpid()}"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        tables = [pq.read_table(os.path.join(folder, n)) for n in names]
        table = pa.concat_tables(tables, promote_options="default") if tables else pa.table({})
        pq.write_table(table, tmp)
    else:  # jsonl lines, or gzip members: both concatenate byte for byte
        with open(tmp, "wb") as out:
            for n in names:
                with open(os.path.join(folder, n), "rb") as f:
                    shutil.copyfileobj(f, out, 1 << 22)
    os.replace(tmp, path)


class ReportStep(PipelineStep):
    """Builds the report from a plan's description (`describe(plan, cfg)`)."""

    type = "📊 - REPORT"
    name = "curation report"

    def __init__(self, info: dict):
        super().__init__()
        self.info = info
        self.index_info: dict = {}   # the decontamination index's index.json, when there is one
        self.examples: dict = {}     # report stage -> rule -> first removal record

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        info, work = self.info, self.info["work"]
        stages = self._stage_stats()
        self._read_index_info()
        self._removals()
        if info["single_file"]:
            merge_output(info["out_folder"], info["output"], info["output_format"])
        report = self._assemble(stages)
        path = info["config"]["report"] or os.path.join(work, "report.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2, ensure_ascii=False, default=str)

    def _stage_stats(self) -> dict:
        stages = {name: collections.Counter() for name in self.info["report_stages"]}
        for stage in self.info["stages"]:
            totals = step_totals(os.path.join(self.info["work"], "logs", stage["name"]), stage["steps"])
            for index, (name, counts) in stage["report"].items():
                stats = totals[int(index)]
                acc = stages.setdefault(name, collections.Counter())
                acc["seconds"] += stats.pop("seconds", 0.0)
                if counts:
                    acc.update(stats)
        return stages

    def _removals(self) -> None:
        """Examples per rule, duplicate_of / eval_file resolved, and the --removed file."""
        work, removed_path = self.info["work"], self.info["config"]["removed"]
        keepers, index_files = _keepers(work), self.index_info.get("files", {})
        self.examples = collections.defaultdict(dict)
        out = open(removed_path, "w", encoding="utf-8") if removed_path else None
        try:
            for stage in self.info["report_stages"]:
                for record in _read_removals(work, stage):
                    detail = record.get("detail", {})
                    if "cluster" in detail and str(detail["cluster"]) in keepers:
                        detail["duplicate_of"] = keepers[str(detail["cluster"])]
                    if "eval_file" in detail:
                        detail["eval_file"] = index_files.get(detail["eval_file"], detail["eval_file"])
                    self.examples[stage].setdefault(record["rule"], record)
                    if out:
                        out.write(json.dumps(record, ensure_ascii=False) + "\n")
        finally:
            if out:
                out.close()

    def _read_index_info(self) -> None:
        path = os.path.join(self.info["work"], "decontam_index", INDEX_INFO)
        if os.path.isfile(path):
            with open(path) as f:
                self.index_info = json.load(f)

    def _stage_entry(self, name: str, stats: collections.Counter) -> dict:
        entry = {**_stage_counts(stats), "seconds": round(stats["seconds"], 3)}
        if name == "decontaminate" and self.index_info:
            files = self.index_info["files"]
            entry["by_eval_file"] = {files.get(k[len("contaminated_"):], k): int(v) for k, v in stats.items()
                                     if k.startswith("contaminated_")}
            entry.update({k: v for k, v in self.index_info.items() if k != "files"})
        entry["examples"] = self.examples.get(name, {})
        return entry

    def _assemble(self, stages: dict) -> dict:
        info = self.info
        read, written = stages.pop("input"), stages.pop("output")
        wall = {}
        wall_path = os.path.join(info["work"], WALL_TIMES)
        if os.path.isfile(wall_path):
            with open(wall_path) as f:
                wall = json.load(f)
        n_in, n_out = int(read["documents"]), int(written["total"])
        seconds = sum(wall.values()) if wall else None
        return {
            "input": {"specs": info["config"]["input"], "files": info["input_files"], "documents": n_in,
                      "skipped": {k[len("skipped_"):]: int(v) for k, v in read.items() if k.startswith("skipped_")}},
            "output": {"path": info["output"], "format": info["output_format"], "documents": n_out,
                       "chars": int(written["doc_len"])},
            "stages": {name: self._stage_entry(name, stats) for name, stats in stages.items()},
            "totals": {"documents_in": n_in, "documents_out": n_out, "removed": n_in - n_out,
                       "seconds": None if seconds is None else round(seconds, 3),
                       "documents_per_second": None if not seconds else round(n_in / seconds, 1)},
            "executor": {"name": info["config"]["executor"], "tasks": info["tasks"],
                         "stages": {s["name"]: {"tasks": s["tasks"], **({"wall_seconds": round(wall[s["name"]], 3)}
                                                                     if s["name"] in wall else {})}
                                    for s in info["stages"]}},
            "config": info["config"],
        }


def describe(plan, config: dict) -> dict:
    """What ReportStep needs from a plan, as plain data (the plan's steps are not pickled twice)."""
    return {"work": plan.work, "tasks": plan.tasks, "input_files": plan.input_files,
            "out_folder": plan.out_folder, "output": plan.output, "output_format": plan.output_format,
            "single_file": plan.single_file, "report_stages": plan.report_stages,
            "stages": [{"name": s.name, "tasks": s.tasks, "steps": len(s.pipeline),
                        "report": {str(i): list(v) for i, v in s.report.items()}} for s in plan.stages],
            "config": config}
