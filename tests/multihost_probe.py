"""Run as a process of a (possibly multi-process) JAX job by tests/test_multiprocess.py:
restores a run's checkpoint onto a mesh given on the command line, takes one train step on a
fixed batch and (process 0) writes the restored params and that step's loss to an .npz.

    python tests/multihost_probe.py RUN_DIR STEP OUT.npz data fsdp tensor
"""

import sys

import jax
import numpy as np

from jaxllm.checkpoint import Checkpointer
from jaxllm.parallel import distributed
from jaxllm.parallel.mesh import batch_sharding, make_mesh
from jaxllm.run import read_config
from jaxllm.train.step import Trainer


def main(run_dir: str, step: str, out: str, *mesh) -> None:
    distributed.initialize()
    cfg = read_config(run_dir)
    trainer = Trainer(cfg, make_mesh(*map(int, mesh)))
    ckpt = Checkpointer(run_dir, async_save=False)
    state, _ = ckpt.restore(int(step), trainer.abstract_state, data=False)
    ckpt.close()
    B, T = cfg.trainer.batch_size, cfg.data.seq_len
    toks = np.random.default_rng(0).integers(0, cfg.model.vocab_size, (B, T + 1)).astype(np.int32)
    host = {"tokens": toks[:, :-1], "targets": toks[:, 1:], "positions": np.tile(np.arange(T, dtype=np.int32), (B, 1)),
            "segment_ids": np.ones((B, T), np.int32), "loss_mask": np.ones((B, T), np.float32)}
    # Every process holds the whole fixed batch and gives the rows of its own devices.
    batch = {k: jax.make_array_from_callback(v.shape, batch_sharding(trainer.mesh, v.ndim), lambda i, v=v: v[i])
             for k, v in host.items()}
    from jax.experimental import multihost_utils

    params = {jax.tree_util.keystr(k): np.asarray(multihost_utils.process_allgather(v, tiled=True))
              for k, v in jax.tree_util.tree_flatten_with_path(state.params)[0]}
    _, metrics = trainer.train_step(state, batch)
    loss = float(metrics["loss"].addressable_data(0))  # replicated: every process holds it
    if jax.process_index() == 0:
        np.savez(out, loss=loss, processes=jax.process_count(), mesh=np.array(mesh, dtype=np.int32), **params)


if __name__ == "__main__":
    main(*sys.argv[1:])
