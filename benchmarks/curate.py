"""Curation throughput: `python -m benchmarks.curate [--workers 2] [--executors local,ray] [--tasks 8]`

Runs the full default curation pipeline (C4 and Gopher filters, exact and MinHash dedup; the
datatrove steps with their default settings) over a corpus built here from real text: every
module, class and function docstring of this Python's standard library over 300 characters,
and the language reference topics of `pydoc_data` cut at paragraphs. Each executor runs it with
`--workers` tasks at a time (Ray: a local Ray with that many CPUs on 127.0.0.1), the corpus
`--repeat` times over (the copies are exact duplicates, as crawls have). Reported per run:
documents and bytes of text in, wall seconds (end to end, including process start-up and
spaCy loading in every task, and per stage), documents and bytes per second per core (wall time
x workers; also for the first pass alone, which reads every byte and runs the filters), and the
1-minute load average before and after (other work on the machine slows a run down). Prints
JSON and writes `benchmarks/results/curate-<device>-<date>.json`.
"""

from __future__ import annotations

import argparse
import ast
import importlib.metadata
import json
import os
import sysconfig
import tempfile
import time

from benchmarks.common import environment, write_results
from jaxllm.curate.config import CurateConfig
from jaxllm.curate.pipeline import curate


def corpus_texts(min_chars: int = 300) -> list[str]:
    root, texts = sysconfig.get_paths()["stdlib"], []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in ("site-packages", "__pycache__"))
        for name in sorted(f for f in files if f.endswith(".py")):
            try:
                tree = ast.parse(open(os.path.join(folder, name), encoding="utf-8").read())
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node)
                    if doc and len(doc) >= min_chars:
                        texts.append(doc)
    import pydoc_data.topics

    for topic in sorted(pydoc_data.topics.topics):
        chunk = []
        for para in pydoc_data.topics.topics[topic].split("\n\n"):
            chunk.append(para)
            if sum(map(len, chunk)) > 1500:
                texts.append("\n\n".join(chunk))
                chunk = []
    return texts


def write_corpus(folder: str, texts: list[str], files: int, repeat: int) -> tuple[int, int]:
    """The texts `repeat` times over (later copies are exact duplicates), dealt into `files` files;
    returns (documents, bytes)."""
    docs = [(f"doc-{r}-{i}", t) for r in range(repeat) for i, t in enumerate(texts)]
    for f in range(files):
        with open(os.path.join(folder, f"part-{f:03d}.jsonl"), "w", encoding="utf-8") as out:
            for doc_id, text in docs[f::files]:
                out.write(json.dumps({"id": doc_id, "text": text}) + "\n")
    return len(docs), sum(len(t.encode()) for _, t in docs)


def run_case(executor: str, folder: str, n_bytes: int, workers: int, tasks: int) -> dict:
    out = os.path.join(folder, f"out-{executor}")
    start, load0 = time.perf_counter(), os.getloadavg()[0]
    report = curate(CurateConfig(input=[os.path.join(folder, "in")], output=out, executor=executor,
                                 workers=workers, tasks=tasks, ray_mem_per_cpu_gb=0.5))
    wall = time.perf_counter() - start
    docs = report["totals"]["documents_in"]
    stage_wall = {k: v.get("wall_seconds") for k, v in report["executor"]["stages"].items()}
    return {"executor": executor, "workers": workers, "tasks": tasks, "documents_in": docs, "bytes_in": n_bytes,
            "documents_out": report["totals"]["documents_out"], "wall_s": round(wall, 2),
            "stage_wall_s": stage_wall,
            "documents_per_s_per_core": round(docs / (wall * workers), 1),
            "bytes_per_s_per_core": round(n_bytes / (wall * workers)),
            # the filter pass reads every byte and does most of the work: its rate, start-up included
            "filter_pass_bytes_per_s_per_core": round(n_bytes / (stage_wall["pass1"] * workers)),
            "removed": {k: v["removed"] for k, v in report["stages"].items()},
            "load_average_1min": [round(load0, 2), round(os.getloadavg()[0], 2)]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.curate", description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--tasks", type=int, default=8, help="tasks per pass (the corpus is cut into this many files)")
    ap.add_argument("--executors", default="local,ray")
    ap.add_argument("--repeat", type=int, default=3, help="copies of the corpus (all but the first: exact duplicates)")
    ap.add_argument("--out", default="benchmarks/results", help="folder for the dated results file ('' = none)")
    args = ap.parse_args(argv)
    env = environment()
    texts = corpus_texts()
    results = []
    with tempfile.TemporaryDirectory() as folder:
        os.makedirs(os.path.join(folder, "in"))
        n_docs, n_bytes = write_corpus(os.path.join(folder, "in"), texts, args.tasks, args.repeat)
        for executor in args.executors.split(","):
            if executor == "ray":
                import ray

                ray.init(num_cpus=args.workers, _node_ip_address="127.0.0.1", include_dashboard=False,
                         log_to_driver=False)
            try:
                results.append(run_case(executor, folder, n_bytes, args.workers, args.tasks))
            finally:
                if executor == "ray":
                    ray.shutdown()
    versions = {p: importlib.metadata.version(p) for p in ("datatrove", "spacy", "ray")}
    payload = {"environment": {**env, "versions": versions}, "pipeline": "filters c4,gopher; dedup exact,minhash "
               "(datatrove defaults)", "corpus": {"documents": n_docs, "bytes": n_bytes,
                                                               "distinct_documents": len(texts)}, "results": results}
    print(json.dumps(payload, indent=2))
    if args.out:
        print("wrote", write_results("curate", None, payload, args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
