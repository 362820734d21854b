"""Checkpoints that can be trusted (the fault-tolerance issue's table, row by row): a damaged,
half-written or deleted newest checkpoint never stops a run and is never trained from."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from orchestrator.config import load_config
from orchestrator.storage import RunDir
from orchestrator.train.checkpoint.layout import EMA_FILE, MODEL_FILE, STATE_FILE, list_checkpoints
from orchestrator.train.driver import run_training
from orchestrator.train.checkpoint.persist import write_manifest
from orchestrator.train.checkpoint.verify import CheckpointProblem, verify_checkpoint

from test_train_e2e import TINY, builtin_cache  # noqa: F401 - fixture


def _fake_checkpoint(run, name, *, ema_value: float, world: int = 1, manifests: bool = True):
    d = run / name
    (d / "ds").mkdir(parents=True)
    torch.save({"module": {"w": torch.ones(3)}}, d / "ds" / "mp_rank_00_model_states.pt")
    torch.save({"decay": 0.9, "shadow": {"w": torch.full((3,), ema_value)}}, d / EMA_FILE)
    (d / MODEL_FILE).write_text(json.dumps({"num_classes": 2, "world_size": world}))
    (d / STATE_FILE).write_text(json.dumps({"step": 1}))
    if manifests:
        write_manifest(d, rank=0, world=world, step=1)
    return d


def test_verify_names_the_file_and_the_problem(tmp_path):
    run = RunDir(str(tmp_path))
    _fake_checkpoint(tmp_path, "checkpoint_00000001", ema_value=1.0)
    verify_checkpoint(run, "checkpoint_00000001")  # good
    # NaN weights with a manifest that matches them (a run that diverged): still refused.
    _fake_checkpoint(tmp_path, "checkpoint_00000002", ema_value=float("nan"))
    with pytest.raises(CheckpointProblem, match=r"ema\.pt: 3 NaN/inf values in w"):
        verify_checkpoint(run, "checkpoint_00000002")
    # A rank that never finished persisting.
    _fake_checkpoint(tmp_path, "checkpoint_00000003", ema_value=1.0, world=2)
    with pytest.raises(CheckpointProblem, match=r"manifest\.rank1\.json is missing"):
        verify_checkpoint(run, "checkpoint_00000003")
    # 4 KiB of random bytes inside a file whose archive stays loadable: the hash catches it.
    d = _fake_checkpoint(tmp_path, "checkpoint_00000004", ema_value=1.0)
    data = bytearray((d / EMA_FILE).read_bytes())
    data[-64:-32] = os.urandom(32)
    (d / EMA_FILE).write_bytes(bytes(data))
    with pytest.raises(CheckpointProblem, match=r"ema\.pt: contents changed"):
        verify_checkpoint(run, "checkpoint_00000004")
    # Truncated: the size no longer matches.
    d = _fake_checkpoint(tmp_path, "checkpoint_00000005", ema_value=1.0)
    with open(d / "ds" / "mp_rank_00_model_states.pt", "r+b") as f:
        f.truncate(10)
    with pytest.raises(CheckpointProblem, match=r"mp_rank_00_model_states\.pt: size 10 bytes"):
        verify_checkpoint(run, "checkpoint_00000005")
    with pytest.raises(CheckpointProblem, match="train_state.json is missing"):
        (tmp_path / "checkpoint_00000006").mkdir()
        verify_checkpoint(run, "checkpoint_00000006")


@pytest.mark.slow
def test_damaged_or_deleted_checkpoints_fall_back_to_the_newest_good_one(ray_local, builtin_cache, tmp_path):
    """Three kinds of damage at once, on the three newest checkpoints: one resume passes over all
    three, each for its own reason, and continues from the newest good one (two training runs
    instead of one per kind: each run is 15 s of start-up on the 2-core test machine)."""
    common = [f"run.storage={tmp_path}", "run.name=trust", "scaling.num_workers=1", "optim.batch_size=4",
              "checkpoint.every_steps=2", "checkpoint.keep=4", "run.evaluate=false", "sampling.every_steps=1000",
              *[t for t in TINY if not t.startswith("optim.batch_size")]]
    run = RunDir(str(tmp_path / "trust"))
    trust = tmp_path / "trust"

    def train(steps: int) -> int:
        return run_training(load_config(None, [*common, f"optim.steps={steps}"])).final_step

    assert train(8) == 8
    assert [r.step for r in list_checkpoints(run)] == [2, 4, 6, 8]
    # Row: the newest checkpoint folder deleted by hand (Ray's snapshot still names it).
    shutil.rmtree(trust / "checkpoint_00000008")
    # Row: random bytes in ema.pt.
    (trust / "checkpoint_00000006" / EMA_FILE).write_bytes(os.urandom(4096))
    # Row: the DeepSpeed model-states file truncated.
    model_states = trust / "checkpoint_00000004" / "ds" / "mp_rank_00_model_states.pt"
    with open(model_states, "r+b") as f:
        f.truncate(model_states.stat().st_size // 2)
    assert train(10) == 10
    resumed = [e for e in run.events() if e["event"] == "resumed"]
    assert len(resumed) == 1 and resumed[0]["checkpoint"].endswith("checkpoint_00000002")
    skipped = {e["checkpoint"]: e["problem"] for e in run.events() if e["event"] == "checkpoint_skipped"}
    assert set(skipped) == {"checkpoint_00000004", "checkpoint_00000006"}, skipped
    assert "mp_rank_00_model_states.pt" in skipped["checkpoint_00000004"]
    assert EMA_FILE in skipped["checkpoint_00000006"]
    for name in skipped:  # kept for inspection
        assert (trust / "corrupt" / name).is_dir()
    # Steps 3-8 were redone: metrics.jsonl holds each step once, the redone values.
    raw = [json.loads(line)["step"] for line in (trust / "metrics.jsonl").read_text().splitlines()]
    assert raw == list(range(1, 11))
    assert [r.step for r in list_checkpoints(run)] == [4, 6, 8, 10]  # keep=4, the redone ones
    # Nothing non-finite was trained into the last checkpoint.
    verify_checkpoint(run, "checkpoint_00000010")


@pytest.mark.slow
def test_nan_at_a_step_rolls_back_and_training_completes(ray_local, builtin_cache, tmp_path, monkeypatch):
    from orchestrator.train.faults import NAN_ENV

    monkeypatch.setenv(NAN_ENV, "5")  # the batch of step 5 is NaN
    cfg = load_config(None, [f"run.storage={tmp_path}", "run.name=nan", "scaling.num_workers=1", "optim.batch_size=4",
                             "checkpoint.every_steps=2", "run.evaluate=false", "sampling.every_steps=1000",
                             "optim.steps=8", *[t for t in TINY if not t.startswith("optim.batch_size")]])
    assert run_training(cfg).final_step == 8
    run = RunDir(str(tmp_path / "nan"))
    rollbacks = [e for e in run.events() if e["event"] == "rollback"]
    assert [(e["from_step"], e["to_step"]) for e in rollbacks] == [(5, 4)]
    assert "NaN" in rollbacks[0]["reason"]
    m = run.metrics()
    assert [r["step"] for r in m] == list(range(1, 9))  # step 5 redone, each step once
    assert all(r["nonfinite"] == 0 for r in m) and all(r["loss"] == r["loss"] for r in m)  # no NaN kept
    for ref in list_checkpoints(run):
        verify_checkpoint(run, ref.name)  # no checkpoint holds NaN weights
