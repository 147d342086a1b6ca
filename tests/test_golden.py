"""Golden runs: the tiny pretraining config (40 steps) and the tiny recipe's SFT and DPO stages
reproduce the recorded metrics bit for bit (`tests/golden/runs.py` made the files)."""

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "golden"))

import runs  # noqa: E402


def test_golden_runs_reproduce_exactly(tmp_path):
    got = runs.run_all(str(tmp_path))
    for name, rows in got.items():
        with open(os.path.join(runs.HERE, f"{name}.jsonl")) as f:
            want = [json.loads(line) for line in f if line.strip()]
        assert len(rows) == len(want), name
        for g, w in zip(rows, want):
            assert g == w, (name, g, w)
