"""Two real JAX processes on CPU (gloo) read one epoch of their data shards into global batches.

Every document of the crafted corpus names its id and is longer than a row, and
`data.split_policy: truncate` makes each one exactly one row, so an epoch of a process's shard is
a known number of rows. The global batches (jax.make_array_from_process_local_data, gathered on
every host) must hold every document exactly once, the same set as a 1-process epoch. Run as a
script, this file is one of the two processes.
"""

import gzip
import json
import os
import re
import socket
import subprocess
import sys

import numpy as np
import pytest

SEQ_LEN = 16
BATCH = 8  # global rows; 4 per process
DOCS = 32  # 16 per process: an epoch is 4 batches
_ID = re.compile(r"doc(\d{4})")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(corpus: str, packing: str):
    from jaxllm.config import Config, DataConfig, TrainerConfig

    return Config(data=DataConfig(train=(corpus,), eval=(corpus,), tokenizer="unused", seq_len=SEQ_LEN, seed=3,
                                  packing=packing, split_policy="truncate", pack_buffer=8),
                  trainer=TrainerConfig(batch_size=BATCH))


def _row_ids(tok, tokens) -> list[int]:
    """The id of the document in each row (one document per row)."""
    out = []
    for row in np.asarray(tokens):
        found = _ID.findall(tok.decode(row.tolist()))
        assert len(found) == 1, tok.decode(row.tolist())
        out.append(int(found[0]))
    return out


def _epoch_rows(mixture_module, rows_per_process: int):
    # Row-shuffle windows of one process batch, so an epoch of the shard ends with a window.
    mixture_module.ROW_SHUFFLE_TOKENS = rows_per_process * SEQ_LEN


def _worker(args: dict) -> None:
    from jaxllm.parallel import distributed

    distributed.initialize()
    import jax
    from jax.experimental import multihost_utils
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from jaxllm.data import mixture, pipeline
    from jaxllm.data.tokenizer import Tokenizer

    assert jax.process_count() == 2 and jax.device_count() == 2
    _epoch_rows(mixture, BATCH // 2)
    tok = Tokenizer(args["model"])
    it = pipeline.make_train_iterator(_config(args["corpus"], args["packing"]), tok)
    sharding = NamedSharding(Mesh(np.array(jax.devices()), ("data",)), PartitionSpec("data"))
    local_ids, global_ids = [], []
    for _ in range(DOCS // BATCH):
        batch = next(it)
        local_ids.append(_row_ids(tok, batch["tokens"]))
        arr = jax.make_array_from_process_local_data(sharding, batch["tokens"])
        assert arr.shape == (BATCH, SEQ_LEN)
        global_ids.append(_row_ids(tok, multihost_utils.process_allgather(arr, tiled=True)))
    with open(os.path.join(args["out"], f"process-{jax.process_index()}.json"), "w") as f:
        json.dump({"local": local_ids, "global": global_ids}, f)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from jaxllm.data.tokenizer import train_sentencepiece

    root = tmp_path_factory.mktemp("mp-data")
    words = ["alpha", "beta", "gamma", "delta", "omega", "sigma"]
    texts = [f"doc{i:04d} " + " ".join(words[(i + j) % 6] for j in range(20)) for i in range(DOCS)]
    lines = b"".join(json.dumps({"text": t}).encode() + b"\n" for t in texts)
    (root / "docs.jsonl.gz").write_bytes(gzip.compress(lines))  # both processes share one decompressed copy
    model = train_sentencepiece(texts, 300, str(root / "sp"))
    return root, str(root / "docs.jsonl.gz"), model


@pytest.mark.parametrize("packing", ["greedy", "best_fit"])
def test_two_processes_read_disjoint_shards_covering_one_epoch(corpus, tmp_path, monkeypatch, packing):
    from jaxllm.data import mixture, pipeline
    from jaxllm.data.tokenizer import Tokenizer

    root, path, model = corpus
    cache = tmp_path / "cache"
    args = json.dumps({"model": model, "corpus": path, "packing": packing, "out": str(tmp_path)})
    port = _free_port()
    procs = []
    try:
        for i in range(2):
            env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
                   "JAXLLM_COORDINATOR": f"127.0.0.1:{port}", "JAXLLM_NUM_PROCESSES": "2",
                   "JAXLLM_PROCESS_ID": str(i), "JAX_PLATFORMS": "cpu", "JAXLLM_DATA_CACHE": str(cache),
                   "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
            procs.append(subprocess.Popen([sys.executable, __file__, args], env=env, cwd=ROOT,
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        outputs = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]
    results = [json.loads((tmp_path / f"process-{i}.json").read_text()) for i in range(2)]
    assert results[0]["global"] == results[1]["global"]  # the same global arrays on both hosts
    glob = results[0]["global"]
    for b, rows in enumerate(glob):  # process p's rows are its slice of every global batch
        assert rows == results[0]["local"][b] + results[1]["local"][b]
    seen = [i for rows in glob for i in rows]
    assert len(seen) == len(set(seen)) == DOCS  # no document twice across processes in the epoch
    shards = [{i for rows in r["local"] for i in rows} for r in results]
    assert shards[0] == set(range(0, DOCS, 2)) and shards[1] == set(range(1, DOCS, 2))
    # The same epoch read by one process.
    monkeypatch.setattr(mixture, "ROW_SHUFFLE_TOKENS", BATCH * SEQ_LEN)
    monkeypatch.setenv("JAXLLM_DATA_CACHE", str(cache))
    tok = Tokenizer(model)
    one = pipeline.make_train_iterator(_config(path, packing), tok, process_index=0, process_count=1)
    single = [i for _ in range(DOCS // BATCH) for i in _row_ids(tok, next(one)["tokens"])]
    assert sorted(single) == sorted(seen) == list(range(DOCS))
    assert len(os.listdir(cache / "decompressed")) == 3  # one copy + info + lock: made once, shared


if __name__ == "__main__":
    _worker(json.loads(sys.argv[1]))
