"""`raydiff bench step` on CPU with a tiny model: every variant runs and the table reports it."""

from __future__ import annotations

import io

import pytest

from orchestrator.bench.step import run_bench


@pytest.mark.slow
def test_bench_step_runs_plain_raydiff_and_ray_train_variants(ray_local):
    out = io.StringIO()
    report = run_bench("unet-tiny", 4, steps=2, warmup=1, ray=True, out=out)
    rows = {r["variant"]: r for r in report["results"]}
    assert set(rows) == {"plain", "raydiff", "raydiff-ray"}
    assert all(r["images_per_s"] > 0 and r["steps"] == 2 and r["batch"] == 4 for r in rows.values())
    assert "ZeRO 2" in rows["raydiff"]["note"]  # the plan's choice on CPU, reported with the rate
    assert report["train_gflop_per_image"] > 0 and report["matmul_tflops"] > 0
    text = out.getvalue()
    for variant in rows:
        assert f"\n{variant} " in text
    assert "x eager" in text and "MFU" in text
