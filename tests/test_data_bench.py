"""`raydiff bench data` runs both sides on the same files and reports a ratio."""

from __future__ import annotations

import io

from test_data_helpers import write_imagefolder

from orchestrator.bench.data import run_bench


def test_bench_data_smoke(ray_local, tmp_path):
    write_imagefolder(tmp_path / "ds", {"a": 10, "b": 10}, size=24)
    out = io.StringIO()
    r = run_bench(str(tmp_path / "ds"), limit=16, resolution=16, batch_size=8, cores=2, repeats=1, out=out)
    assert r["images"] == 16 and r["format"] == "imagefolder"
    assert r["pipeline_img_s"] > 0 and r["plain_img_s"] > 0
    assert abs(r["ratio_per_core"] - r["pipeline_img_s"] / 2 / r["plain_img_s"]) < 1e-9
    assert "ratio per core" in out.getvalue()
