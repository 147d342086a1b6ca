"""`curate(cfg)`: plan the run (jaxllm.curate.plan), run it on the configured executor
(jaxllm.curate.executors) and return its report (jaxllm.curate.report).

The work folder (`work_dir`, default `<output>.work`) holds the intermediate passes, dedup
signatures, removal records and the executors' logs. `run.json` there pins the settings and
input files the work belongs to: rerunning with the same ones resumes (finished tasks are
skipped), different ones are refused rather than mixed with stale results. A local or Ray run
that succeeds removes the default work folder (keep it with `keep_work`, or name one with
`work_dir`); a SLURM run leaves it, since its jobs are still to run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

from jaxllm.curate.config import CurateConfig
from jaxllm.curate.executors import DRY_RUN_FOLDER, run_here, submit_slurm
from jaxllm.curate.plan import make_plan
from jaxllm.curate.report import ReportStep, describe
from jaxllm.errors import UserError

RUN_FILE = "run.json"
# settings that may change between a run and its resumption: where and how it runs, what it reports
_NOT_PINNED = {"executor", "workers", "keep_work", "report", "removed", "work_dir"}


def work_folder(cfg: CurateConfig) -> str:
    return cfg.work_dir or os.path.abspath(cfg.output).rstrip("/\\") + ".work"


def _fingerprint(cfg: CurateConfig, plan) -> dict:
    settings = {k: v for k, v in dataclasses.asdict(cfg).items()
                if k not in _NOT_PINNED and not k.startswith(("slurm_", "ray_"))}
    files = []
    for share in plan.shares:
        for rel in share.files:
            st = os.stat(os.path.join(share.folder, rel))
            files.append([os.path.join(share.folder, rel), st.st_size, st.st_mtime_ns])
    return json.loads(json.dumps({"settings": settings, "input_files": files}, default=str))


def _pin_work(cfg: CurateConfig, plan) -> None:
    """Writes run.json, or checks that the one there describes this same run."""
    path, mine = os.path.join(plan.work, RUN_FILE), _fingerprint(cfg, plan)
    if os.path.isfile(path):
        with open(path) as f:
            theirs = json.load(f)
        if theirs != mine:
            changed = sorted(k for k in set(mine["settings"]) | set(theirs.get("settings", {}))
                             if mine["settings"].get(k) != theirs.get("settings", {}).get(k))
            what = f"settings {', '.join(changed)}" if changed else "input files"
            raise UserError(f"work_dir {plan.work} holds a run with other {what}; remove it or choose another "
                            f"work_dir")
        return
    if not plan.single_file and os.path.isdir(plan.output) and os.listdir(plan.output):
        raise UserError(f"output: folder {plan.output} is not empty; choose an empty or new folder")
    with open(path, "w") as f:
        json.dump(mine, f, indent=1)


def curate(cfg: CurateConfig) -> dict:
    """Runs the pipeline `cfg` describes; returns the report (on SLURM: where things will be)."""
    work = work_folder(cfg)
    os.makedirs(work, exist_ok=True)
    config = dataclasses.asdict(cfg)
    plan = make_plan(cfg, work, lambda p: ReportStep(describe(p, config)))
    _pin_work(cfg, plan)
    report_path = cfg.report or os.path.join(work, "report.json")
    if cfg.executor == "slurm":
        submit_slurm(cfg, plan)
        return {"submitted": not cfg.slurm_dry_run, "stages": [s.name for s in plan.stages], "work": work,
                "report": report_path, "output": cfg.output,
                **({"job_scripts": os.path.join(work, DRY_RUN_FOLDER)} if cfg.slurm_dry_run else {})}
    run_here(cfg, plan)
    with open(report_path, encoding="utf-8") as f:
        report = json.load(f)
    if not cfg.work_dir and not cfg.keep_work:
        shutil.rmtree(work, ignore_errors=True)
    return report
