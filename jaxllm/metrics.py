"""Run logging: a progress bar on stdout, `metrics.jsonl`, TensorBoard events. Process 0 only.

A run directory at a URL (`gs://bucket/run`): an object store cannot append, so metrics.jsonl
is kept in memory and the whole object rewritten at each logged line (a line every
logging.every_steps steps; a killed run loses none of the lines it had logged). TensorBoard
events go to gs:// or s3:// through tensorboardX's own writers (gs:// needs
google-cloud-storage, in the `gcs` extra).
"""

from __future__ import annotations

import json
import math
import os
import sys

import jax

from jaxllm import paths
from jaxllm.errors import UserError

# Dense bf16 peak TFLOP/s per device, by the prefix of `device.device_kind`.
PEAK_TFLOPS = {
    "NVIDIA H200": 989.0, "NVIDIA H100": 989.0, "NVIDIA GH200": 989.0, "NVIDIA A100": 312.0,
    "NVIDIA L4": 121.0, "NVIDIA A10": 125.0, "NVIDIA B200": 2250.0,
    "TPU v4": 275.0, "TPU v5 lite": 197.0, "TPU v5e": 197.0, "TPU v5p": 459.0, "TPU v5": 459.0,
    "TPU v6 lite": 918.0, "TPU v6e": 918.0,
}


def peak_tflops_per_device(override: float = 0.0) -> float | None:
    """The configured peak, else the table's entry for this device kind, else None (no MFU)."""
    if override > 0:
        return override
    kind = jax.devices()[0].device_kind
    for prefix, tflops in PEAK_TFLOPS.items():
        if kind.startswith(prefix):
            return tflops
    return None


def _tensorboardx_writer():
    """tensorboardX's SummaryWriter, imported without PyTorch: tensorboardX imports torch, when
    installed, only to accept its tensors (we log floats), and that import costs a run about 2.5 s
    of start-up."""
    block = "torch" not in sys.modules
    if block:
        sys.modules["torch"] = None  # `import torch` raises ImportError, which tensorboardX expects
    try:
        from tensorboardX import SummaryWriter
    finally:
        if block:
            del sys.modules["torch"]
    return SummaryWriter


class MetricsLogger:
    def __init__(self, run_dir: str, total_steps: int, *, progress_bar: bool = True,
                 tensorboard: bool = True, initial_step: int = 0):
        self.enabled = jax.process_index() == 0
        self._bar = self._tb = self._jsonl = self._remote = None
        if not self.enabled:
            return
        run_dir = paths.expand(run_dir)
        path = paths.join(run_dir, "metrics.jsonl")
        if paths.is_url(run_dir):
            self._remote = (path, [paths.read_text(path)] if paths.exists(path) else [])
        else:
            os.makedirs(run_dir, exist_ok=True)
            self._jsonl = open(path, "a")
        if tensorboard:
            if paths.is_url(run_dir) and not run_dir.startswith(("gs://", "s3://")):
                raise UserError(f"logging.tensorboard: TensorBoard events go to local folders, gs:// or s3://, "
                                f"not {run_dir}; set logging.tensorboard=false")
            self._tb = _tensorboardx_writer()(paths.join(run_dir, "tensorboard"))
        if progress_bar:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=initial_step, dynamic_ncols=True,
                             file=sys.stdout, unit="step", mininterval=1.0)

    def log(self, step: int, metrics: dict, *, advance: int = 0) -> None:
        if not self.enabled:
            return
        clean = {k: (float(v) if not isinstance(v, (int, str)) else v) for k, v in metrics.items()}
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in clean.items()}
        line = json.dumps({"step": step, **clean}) + "\n"
        if self._remote is not None:
            path, lines = self._remote
            lines.append(line)
            paths.write_text(path, "".join(lines))
        else:
            self._jsonl.write(line)
            self._jsonl.flush()
        if self._tb is not None:
            for k, v in clean.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None:
                    self._tb.add_scalar(k, v, step)
        if self._bar is not None:
            if advance:
                self._bar.update(advance)
            if any(k.startswith("eval_") for k in clean):
                names = {"eval_loss": "loss", "eval_ppl": "perplexity", "eval_accuracy": "accuracy",
                         "eval_rewards/accuracies": "reward accuracy", "eval_rewards/margins": "reward margin",
                         "eval_reward": "reward"}
                shown = ", ".join(f"{name} {clean[k]:.4g}" for k, name in names.items() if clean.get(k) is not None)
                self._bar.write(f"step {step}: eval {shown}")
                return
            shown = {k: clean[k] for k in ("loss", "lr", "tokens_per_s", "mfu") if clean.get(k) is not None}
            self._bar.set_postfix({k: (f"{v:.3g}" if isinstance(v, float) else v) for k, v in shown.items()},
                                  refresh=True)
        elif "loss" in clean or any(k.startswith("eval_") for k in clean):
            print(json.dumps({"step": step, **clean}), flush=True)

    def advance(self, n: int) -> None:
        if self._bar is not None and n:
            self._bar.update(n)

    def write(self, text: str) -> None:
        """Prints a line without breaking the progress bar."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if self._jsonl is not None:
            self._jsonl.close()
