"""Golden runs: the tiny pretraining config (40 steps) and the tiny recipe's SFT and DPO stages
reproduce the recorded metrics (`tests/golden/runs.py` made the files): counts exactly, floats to
float rounding. XLA's CPU code depends on the instruction set, so another CPU moves the last
digits (measured between two Xeons: 2e-7 relative on losses, 8e-6 on grad norms, 1e-6 absolute
on DPO rewards near zero); a changed computation moves them by far more."""

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "golden"))

import runs  # noqa: E402

RTOL, ATOL = 5e-5, 1e-5


def _same(got, want) -> bool:
    if isinstance(want, float) and isinstance(got, float):
        return abs(got - want) <= ATOL + RTOL * abs(want)
    return got == want


def test_golden_runs_reproduce_exactly(tmp_path):
    got = runs.run_all(str(tmp_path))
    for name, rows in got.items():
        with open(os.path.join(runs.HERE, f"{name}.jsonl")) as f:
            want = [json.loads(line) for line in f if line.strip()]
        assert len(rows) == len(want), name
        for g, w in zip(rows, want):
            assert set(g) == set(w), (name, sorted(set(g) ^ set(w)))
            bad = {k: (g[k], w[k]) for k in w if not _same(g[k], w[k])}
            assert not bad, (name, w.get("step"), bad)
