"""benchmarks.gpu_suite's dry run lists exactly what it would run on a GPU machine."""

import subprocess
import sys

from conftest import ROOT


def test_gpu_suite_dry_run_lists_exactly_its_commands():
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_suite", "--dry-run"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = [line.split("  # ") for line in proc.stdout.strip().splitlines()]
    step = "python -m benchmarks.step --config configs/{}.yaml --steps 5 --warmup 1 --out benchmarks/results " \
           "model.attention={} {}"
    want = ["python -m pytest -q -m gpu tests -p no:cacheprovider"] + [
        step.format(config, impl, batch) for config, batch in (
            ("smollm2-360m", "trainer.batch_size=16"),
            ("smollm2-1.7b", "trainer.batch_size=8 trainer.grad_accum_steps=1")) for impl in ("xla", "cudnn", "pallas")
    ] + ["python -m benchmarks.attention --seqs 1024,2048,4096,8192 --head-dims 64,128 --iters 5 "
         "--out benchmarks/results"]
    assert [cmd for cmd, _ in lines] == want
    timeouts = [float(note.rsplit("timeout ", 1)[1].removesuffix(" s")) for _, note in lines]
    assert sum(timeouts) <= 480 + len(timeouts)  # the whole suite within 8 minutes
