"""`raydiff bench scale` at tiny sizes: every phase runs through training's code, the resume is
checked exact, the compacted log reads back in a few requests, and bad options exit 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from orchestrator.bench.scale import synthetic_counts
from orchestrator.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_synthetic_counts_add_up_and_are_uneven():
    c = synthetic_counts(1_000_003, 1000, seed=1)
    assert c.sum() == 1_000_003 and len(c) == 1000
    assert 900 <= c.min() < c.max() <= 1101
    with pytest.raises(ValueError, match="--samples"):
        synthetic_counts(5, 10)


def test_bench_scale_tiny(tmp_path):
    # In its own process, as a user runs it: the peak resident memory it checks is the process's,
    # and pytest's (the models of the tests that ran before in it) is not the benchmark's.
    out = tmp_path / "scale.json"
    proc = subprocess.run([sys.executable, "-m", "orchestrator", "bench", "scale", "--samples", "20000", "--units", "37",
                           "--workers", "4", "--batch", "16", "--window", "64", "--resume-workers", "8", "--parts", "12",
                           "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    text = proc.stdout
    res = json.loads(out.read_text())
    assert proc.returncode == 0 and res["ok"], text + proc.stderr[-2000:]
    phases = {p["name"].split(":")[0]: p for p in res["phases"]}
    assert phases["listing + planning"]["detail"] == {"units": 37, "samples": 20000}
    assert phases["per rank"]["detail"]["ranks"] == 4
    resume = next(p for p in res["phases"] if p["name"].startswith("resume"))
    assert resume["detail"]["exact"] is True and "4 -> 8 ranks" in resume["name"]
    reads = [p for p in res["phases"] if p["name"].startswith("log read-back")]
    assert [p["detail"]["requests"] for p in reads][0] >= 12  # a GET per part before compaction
    assert reads[1]["detail"]["requests"] <= 3  # list, segment, local-file probe
    assert "whole benchmark" in text and "OVER" not in text
    assert np.isfinite(res["total_s"]) and res["peak_rss_mb"] > 0


def test_bench_scale_refuses_a_batch_the_workers_cannot_split(capsys):
    assert main(["bench", "scale", "--samples", "1000", "--units", "10", "--workers", "3", "--batch", "16",
                 "--parts", "0"]) == 2
    assert "not divisible" in capsys.readouterr().err


def test_peak_rss_is_the_benchmarks_own_not_its_parents():
    # Linux keeps a parent's resident memory at the fork in a child's ru_maxrss: a benchmark started
    # from a big process (pytest after the end-to-end tests: 1.2 GB) read as over its 1 GB limit.
    big = bytearray(768 * 2**20)
    big[::4096] = b"\x01" * len(range(0, len(big), 4096))  # every page resident
    code = "from orchestrator.bench.scale import peak_rss_mb; print(peak_rss_mb())"
    child = float(subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                                 timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)}).stdout)
    del big
    assert 0 < child < 512
