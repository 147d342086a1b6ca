"""Curation and token-shard preparation on datatrove's executors: a Ray run on this machine (2
CPUs on 127.0.0.1, started once for the module) gives the local executor's output byte for byte;
a SLURM dry run writes the expected chain of job scripts, and running the pickled jobs as SLURM
would (array task by array task) gives the local output too; prepare's tokenization as executor
tasks gives the documents and tokens of `jaxllm.data.prepare`."""

import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import ray

from jaxllm.curate.config import CurateConfig
from jaxllm.curate.pipeline import curate
from jaxllm.curate.prepare_step import PrepareSettings, ordered_files, prepare_on_executor
from jaxllm.data import prepare
from jaxllm.data.documents import open_source
from jaxllm.data.shards import PreparedSource
from jaxllm.data.tokenizer import Tokenizer, train_sentencepiece

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STOP = ["the", "be", "to", "of", "and", "that", "have", "with"]


def _prose(rng, n_words, per_line=10):
    tokens = [rng.choice(STOP) if rng.random() < 0.2 else "".join(rng.choice("abcdefghiklmnoprstuvwy")
              for _ in range(rng.randint(3, 8))) for _ in range(n_words)]
    return "\n".join(" ".join(tokens[i:i + per_line]).capitalize() + "." for i in range(0, n_words, per_line))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """4 files of prose records, with near copies across files and documents C4 drops or edits."""
    root, rng = tmp_path_factory.mktemp("exec"), random.Random(0)
    docs = [{"id": f"d{i}", "text": _prose(rng, 80), "src": "web"} for i in range(24)]
    docs += [{"id": f"c{i}", "text": docs[i]["text"].replace(".", "!", 1)} for i in range(4)]  # near copies
    docs += [{"id": "short", "text": "Too short."}, {"id": "nav", "text": docs[5]["text"] + "\nHome | Contact"},
             {"id": "x0", "text": docs[1]["text"].upper()}, {"id": "x1", "text": "  " + docs[2]["text"]},  # exact copies
             {"id": "bad", "text": docs[3]["text"] + " An anus."}]  # a word of the shipped bad-words list
    files = []
    for f in range(4):
        path = root / f"part{f}.jsonl"
        path.write_text("".join(json.dumps(d) + "\n" for d in docs[f::4]))
        files.append(str(path))
    return root, files


# SLURM: C4 and MinHash (signatures, buckets, clusters, filter); Ray: stages that need no spaCy,
# since every Ray task starts a fresh process (bad words and exact dedup: signatures, find, filter).
MINHASH = {"filters": ["c4", "gopher_repetition"], "dedup": ["minhash"], "minhash_num_buckets": 2, "tasks": 2}
EXACT = {"filters": ["c4_badwords"], "dedup": ["exact"], "tasks": 2}


def _outputs(folder):
    return {name: open(os.path.join(folder, name), "rb").read() for name in sorted(os.listdir(folder))}


def _local_run(corpus, name, settings):
    root, files = corpus
    report = curate(CurateConfig(input=files, output=str(root / name), workers=1, **settings))
    return _outputs(root / name), report


@pytest.fixture(scope="module")
def local_minhash(corpus):
    return _local_run(corpus, "local-minhash", MINHASH)


@pytest.fixture(scope="module")
def local_exact(corpus):
    return _local_run(corpus, "local-exact", EXACT)


@pytest.fixture(scope="module")
def ray_local():
    ray.init(num_cpus=2, _node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _counts(report):
    return {name: (s["seen"], s["removed"]) for name, s in report["stages"].items()}


def test_ray_gives_the_local_output(corpus, local_exact, ray_local):
    root, files = corpus
    local_files, local_report = local_exact
    report = curate(CurateConfig(input=files, output=str(root / "ray"), executor="ray", workers=2,
                                 ray_mem_per_cpu_gb=0.25, **EXACT))
    assert _outputs(root / "ray") == local_files and len(local_files) == 2
    assert _counts(report) == _counts(local_report) == {"c4_badwords": (33, 1), "exact_dedup": (32, 2)}
    assert report["executor"]["name"] == "ray" and list(report["executor"]["stages"]) == ["pass1", "exact_find", "pass2"]


_FAKE_SCONTROL = "#!/bin/sh\necho localhost\n"
_RUN_JOBS = """
import dill, json, os, sys
for pik, tasks in json.loads(sys.argv[1]):
    for i in range(tasks):  # what each array task of the job does: launch_pickled_pipeline executor.pik
        os.environ.update(SLURM_ARRAY_TASK_ID=str(i), SLURM_NODELIST="localhost", SLURM_JOB_ID="1")
        with open(pik, "rb") as f:
            dill.load(f).run()
"""


def test_slurm_dry_run_writes_the_job_chain_that_gives_the_local_output(corpus, local_minhash, tmp_path):
    root, files = corpus
    work = tmp_path / "work"
    result = curate(CurateConfig(
        input=files, output=str(tmp_path / "slurm"), executor="slurm", slurm_partition="cpu", slurm_time="2:00:00",
        slurm_dry_run=True, slurm_env_command="source /opt/venv/bin/activate", slurm_sbatch_args={"account": "proj"},
        work_dir=str(work), report=str(tmp_path / "report.json"), **MINHASH))
    stages = {"pass1": 2, "minhash_buckets": 2, "minhash_cluster": 1, "pass2": 2, "report": 1}
    assert result["submitted"] is False and result["stages"] == list(stages)
    jobs = sorted(n for n in os.listdir(work / "slurm_dry_run") if n.endswith(".slurm"))
    assert len(jobs) == 2 * len(stages)  # each stage's array job, then datatrove's merge_stats job for it
    previous = None
    for k, (stage, tasks) in enumerate(stages.items()):
        script = (work / "slurm_dry_run" / jobs[2 * k]).read_text()
        args = (work / "slurm_dry_run" / jobs[2 * k].replace(".slurm", ".args")).read_text().split()
        for line in (f"#SBATCH --array=0-{tasks - 1}", "#SBATCH --partition=cpu", "#SBATCH --time=2:00:00",
                     f"#SBATCH --job-name=curate-{stage}", "#SBATCH --account=proj", "source /opt/venv/bin/activate",
                     f"launch_pickled_pipeline {work}/logs/{stage}/executor.pik"):
            assert line in script, (stage, line)
        assert (f"--dependency=afterok:{previous}" in args) == (previous is not None), (stage, args)
        previous = 2 * k + 1  # the fake sbatch numbers jobs 1, 2, ... in submission order
    assert not os.path.exists(tmp_path / "slurm")  # nothing ran
    # Run the pickled jobs in order, each array task as SLURM would start it.
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "scontrol").write_text(_FAKE_SCONTROL)
    os.chmod(tmp_path / "bin" / "scontrol", 0o755)
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}", "JAX_PLATFORMS": "cpu"}
    jobs = json.dumps([[str(work / "logs" / s / "executor.pik"), t] for s, t in stages.items()])
    proc = subprocess.run([sys.executable, "-c", _RUN_JOBS, jobs], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    local_files, local_report = local_minhash
    assert _outputs(tmp_path / "slurm") == local_files
    # 4 near copies, the 2 exact ones, nav once C4 cleaned it, bad (a sentence more than d3)
    assert local_report["stages"]["minhash_dedup"]["removed"] == 8
    with open(tmp_path / "report.json") as f:
        assert _counts(json.load(f)) == _counts(local_report)


@pytest.fixture(scope="module")
def shards_setup(tmp_path_factory):
    root, rng = tmp_path_factory.mktemp("shards"), np.random.default_rng(0)
    texts = []
    (root / "in").mkdir()
    for k in range(3):
        with open(root / "in" / f"f{k}.jsonl", "w") as f:
            for i in range(15):
                t = f"def doc{k}_{i}():\n" + "".join(f"    x{j} = {int(rng.integers(0, 99))}\n"
                                                      for j in range(int(rng.integers(1, 9))))
                texts.append(t)
                f.write(json.dumps({"text": t}) + "\n")
            f.write('{"text": broken\n')
    (root / "in" / "notes.txt").write_text("a text file is one document\n")
    model = train_sentencepiece(texts, 300, str(root / "sp"))
    specs = [str(root / "in")]
    prepare.prepare(open_source(specs), Tokenizer(model), str(root / "ref"), shard_tokens=200,
                    source_info={"specs": specs, "text_field": "text", "split": "train", "strict": False})
    return root, specs, model


@pytest.mark.parametrize("executor", ["local", "ray"])
def test_prepare_on_executors_matches_prepare(shards_setup, executor, request):
    root, specs, model = shards_setup
    if executor == "ray":
        request.getfixturevalue("ray_local")
    out, work = root / f"out-{executor}", root / f"work-{executor}"
    settings = PrepareSettings(ordered_files(specs, 0.05), model, str(work / "shards"), str(out),
                               shard_tokens=200, specs=specs)
    cfg = CurateConfig(input=specs, output=str(out), executor=executor, tasks=2, workers=2 if executor == "ray" else 1,
                       ray_mem_per_cpu_gb=0.25)
    manifest = prepare_on_executor(settings, cfg, str(work))
    ours, ref = PreparedSource(str(out)), PreparedSource(str(root / "ref"))
    assert len(ours) == len(ref) == 46  # 45 records and the text file; the broken lines skipped
    assert all(np.array_equal(ours[i], ref[i]) for i in range(len(ref)))
    with open(root / "ref" / "manifest.json") as f:
        expected = json.load(f)
    assert {k for k in manifest if manifest[k] != expected[k]} == {"shards"}  # shards never span two files here
    assert manifest["sources"]["skipped"] == {"malformed JSON": 3}
