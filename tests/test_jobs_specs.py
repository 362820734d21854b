"""jobs/: every job spec referenced anywhere in the project passes its dry run, and each cluster
spec carries its submit command and declares the resources the autoscaler provisions for."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest
import yaml

from orchestrator.cli import main

ROOT = Path(__file__).resolve().parents[1]
# Where specs are referenced: docs, cluster configs and manifests, the specs themselves, the code
# (help texts). Tests are left out: they name missing specs on purpose.
_REFERENCING = ["README.md", "BENCHMARKS.md", "Makefile", "cluster", "jobs", "orchestrator"]


def _referenced_specs() -> set[str]:
    names: set[str] = set()
    for entry in _REFERENCING:
        p = ROOT / entry
        files = [p] if p.is_file() else [f for f in p.rglob("*") if f.is_file() and f.suffix in (".md", ".yaml", ".py", "")]
        for f in files:
            try:
                names |= set(re.findall(r"jobs/([A-Za-z0-9_.-]+\.yaml)", f.read_text()))
            except (UnicodeDecodeError, OSError):
                continue
    return names


def _all_specs() -> list[str]:
    return sorted({p.name for p in (ROOT / "jobs").glob("*.yaml")} | _referenced_specs())


def _dry_run(spec: str) -> str:
    tree = yaml.safe_load((ROOT / "jobs" / spec).read_text())
    command = "tune" if "tune" in tree else "train"  # a sweep's spec has a tune: section
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main([command, "--config", str(ROOT / "jobs" / spec), "--dry-run"])
    assert rc == 0, out.getvalue()
    return out.getvalue()


def test_the_cluster_job_specs_exist_and_are_referenced():
    specs = _all_specs()
    assert {"local-smoke.yaml", "cifar-unet.yaml", "imagenet256-dit-xl2.yaml"} <= set(specs)
    missing = [s for s in specs if not (ROOT / "jobs" / s).is_file()]
    assert not missing, f"referenced but missing: {missing}"


@pytest.mark.parametrize("spec", _all_specs())
def test_spec_passes_dry_run(spec):
    text = _dry_run(spec)
    assert "# plan" in text or "tune" in text


@pytest.mark.parametrize("spec", ["local-smoke.yaml", "cifar-unet.yaml", "imagenet256-dit-xl2.yaml", "dit-b2-latent.yaml"])
def test_cluster_spec_starts_with_its_submit_command_and_declares_resources(spec):
    text = (ROOT / "jobs" / spec).read_text()
    header = text.split("\n\n")[0] + text.split("run:")[0]
    assert f"raydiff submit jobs/{spec}" in header or f"--config jobs/{spec}" in header
    assert re.search(rf"(ray job submit|raydiff submit) .*jobs/{re.escape(spec)}", header)
    cfg = yaml.safe_load(text)
    s = cfg["scaling"]
    assert s["ray_address"] == "auto" and s["num_workers"] >= 1 and s["cpus_per_worker"] > 0
    if spec != "local-smoke.yaml":
        # GPU runs: one GPU per worker, CPUs for data next to it, object storage for data and runs.
        assert s["device"] == "gpu" and s["gpus_per_worker"] == 1
        assert cfg["run"]["storage"].startswith("s3://") and cfg["data"]["source"].startswith("s3://")
        assert cfg["optim"]["batch_size"] % s["num_workers"] == 0
