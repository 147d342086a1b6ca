"""Reproducible speed measurements: each prints JSON and writes a dated file under results/."""
