"""Restores a run's checkpoint onto a given mesh and takes one train step on a fixed batch:
`restore_and_step` (in the test process), or as each process of a multi-process JAX job
(tests/test_multiprocess.py), process 0 writing the restored params and the loss to an .npz:

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


def restore_and_step(run_dir: str, step: int, mesh, devices=None) -> tuple[dict, float]:
    """(restored params as host arrays by path, loss of the next step on a fixed batch)."""
    from jax.experimental import multihost_utils

    cfg = read_config(run_dir)
    trainer = Trainer(cfg, make_mesh(*mesh, devices=devices))
    ckpt = Checkpointer(run_dir, async_save=False)
    state, _ = ckpt.restore(step, trainer.abstract_state, data=False)
    ckpt.close()
    B, T = cfg.trainer.batch_size, cfg.data.seq_len
    toks = np.random.default_rng(0).integers(0, cfg.model.vocab_size, (B, T + 1)).astype(np.int32)
    host = {"tokens": toks[:, :-1], "targets": toks[:, 1:], "positions": np.tile(np.arange(T, dtype=np.int32), (B, 1)),
            "segment_ids": np.ones((B, T), np.int32), "loss_mask": np.ones((B, T), np.float32)}
    # Every process holds the whole fixed batch and gives the rows of its own devices.
    batch = {k: jax.make_array_from_callback(v.shape, batch_sharding(trainer.mesh, v.ndim), lambda i, v=v: v[i])
             for k, v in host.items()}
    params = {jax.tree_util.keystr(k): np.asarray(multihost_utils.process_allgather(v, tiled=True))
              for k, v in jax.tree_util.tree_flatten_with_path(state.params)[0]}
    _, metrics = trainer.train_step(state, batch)
    return params, float(metrics["loss"].addressable_data(0))  # replicated: every process holds it


def main(run_dir: str, step: str, out: str, *mesh) -> None:
    distributed.initialize()
    params, loss = restore_and_step(run_dir, int(step), tuple(map(int, mesh)))
    if jax.process_index() == 0:
        np.savez(out, loss=loss, processes=jax.process_count(), **params)


if __name__ == "__main__":
    main(*sys.argv[1:])
