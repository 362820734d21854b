"""Elastic resume: a checkpoint written by 2 workers resumes on 1, and one written by 1 on 2,
with the fp32 weights and the Adam state (exp_avg, exp_avg_sq, step) carried over exactly.

The ranks are real processes (torch.distributed over gloo, DeepSpeed on CPU, raydiff's TrainStep
and checkpoint code; tests/elastic_ranks.py) without Ray: the re-sharding is DeepSpeed's, and
Ray only decides how many workers there are. The end-to-end resume through Ray Train at another
worker count is in tests/test_exact_resume.py (image folder, 2 workers then 1).

The state before and after is compared through DeepSpeed's own consolidated view: the
universal-checkpoint conversion of each checkpoint (one file per parameter and state), or, for
checkpoints without optimizer shards, the model-states file itself.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from orchestrator.train.checkpoint.layout import DS_TAG
from orchestrator.train.checkpoint.elastic import convert_to_universal, needs_conversion, optimizer_shards

ROOT = Path(__file__).resolve().parents[1]
# The CPU defaults (ZeRO-2 with bf16 where the CPU has it, fp32 otherwise) and unsharded fp32.
SETUPS = ("bf16-zero2", "fp32-zero2", "fp32-zero0")


def _ranks(world: int, out: Path, *, resume: Path | None = None) -> None:
    cmd = [sys.executable, str(ROOT / "tests" / "elastic_ranks.py"), str(world), str(out), "--steps", "2", *SETUPS]
    if resume is not None:
        cmd += ["--resume", str(resume)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]


def _consolidated(ckpt: Path, scratch: Path) -> dict[str, torch.Tensor]:
    """Every parameter's fp32 value and optimizer state, keyed "name/state", independent of how
    many ranks wrote the checkpoint."""
    ds = ckpt / DS_TAG
    out: dict[str, torch.Tensor] = {}
    if optimizer_shards(ds):
        uc = convert_to_universal(ds, scratch / ckpt.name / DS_TAG)
        for pdir in sorted(p for p in (uc / "zero").iterdir() if p.is_dir()):
            for f in pdir.glob("*.pt"):
                v = torch.load(f, weights_only=False)
                out[f"{pdir.name}/{f.stem}"] = torch.as_tensor(v["param"] if isinstance(v, dict) else v)
        return out
    sd = torch.load(ds / "mp_rank_00_model_states.pt", weights_only=False)
    for k, v in sd["module"].items():
        out[f"{k}/fp32"] = v.float()
    # A torch optimizer's state, by its parameter index (the same engine layout on both sides).
    for idx, state in sd["optimizer"]["state"].items():
        for key, val in state.items():
            out[f"param{idx}/{key}"] = torch.as_tensor(val)
    return out


def _compare(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor], what: str) -> None:
    assert before.keys() == after.keys(), f"{what}: states differ: {sorted(before.keys() ^ after.keys())[:5]}"
    assert any(k.endswith("/exp_avg") for k in before), f"{what}: no Adam moments in the checkpoint"
    moved = [k for k in before if k.endswith("/exp_avg") and before[k].abs().sum() > 0]
    assert moved, f"{what}: every exp_avg is zero: the optimizer never stepped"
    for k in before:
        assert torch.equal(before[k], after[k]), f"{what}: {k} changed by resuming ({(before[k] - after[k]).abs().max()})"


@pytest.mark.slow
def test_resume_two_workers_on_one_and_one_on_two(tmp_path):
    two, one, two_again = tmp_path / "w2", tmp_path / "w1", tmp_path / "w2b"
    _ranks(2, two)
    for s in SETUPS:
        # What decides the conversion: shards from another world size.
        assert needs_conversion(two / s, DS_TAG, 1) == s.endswith(("zero1", "zero2")), s
        assert not needs_conversion(two / s, DS_TAG, 2)
    _ranks(1, one, resume=two)  # 2 -> 1: loads, writes the loaded state back, trains on
    _ranks(2, two_again, resume=one)  # 1 -> 2
    for s in SETUPS:
        assert len(optimizer_shards(one / s / DS_TAG)) == (1 if "zero2" in s else 0)
        assert len(optimizer_shards(two_again / s / DS_TAG)) == (2 if "zero2" in s else 0)
        _compare(_consolidated(two / s, tmp_path / "uc2"), _consolidated(one / s, tmp_path / "uc1"), f"{s} 2->1")
        _compare(_consolidated(one / s, tmp_path / "uc1b"), _consolidated(two_again / s, tmp_path / "uc2b"),
                 f"{s} 1->2")
        for d in (one, two_again):
            losses = json.loads((d / s / "losses.json").read_text())
            assert len(losses) == 2 and all(0 < x < 10 for x in losses), (s, losses)
