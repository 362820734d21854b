"""The checkpoint owner's decisions without a cluster (train/checkpoint/manager.py, training.py):
which checkpoint is chosen, what is set aside and pruned, and that the inference commands get
training's verification: a damaged checkpoint given directly is refused in one line naming the
file, a run directory falls back to its newest good checkpoint with a warning."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from checkpoint_factory import perturbed_model, tiny_config, write_checkpoint_dir
from orchestrator.cli import main
from orchestrator.config import ConfigError
from orchestrator.eval.loading import load_checkpoint
from orchestrator.storage import RunDir
from orchestrator.train.checkpoint import training
from orchestrator.train.checkpoint.layout import EMA_FILE, MODEL_FILE, STATE_FILE, list_checkpoints
from orchestrator.train.checkpoint.manager import Checkpointer
from orchestrator.train.checkpoint.persist import write_manifest
from orchestrator.train.checkpoint.verify import CheckpointProblem, verify_checkpoint
from orchestrator.train.divergence import DivergenceGuard
from orchestrator.train.faults import EXIT_ENV, NAN_ENV, RECORD_ENV, FaultHooks
from orchestrator.train.state import TrainState


def _ckpt(run, step: int, *, ema_value: float = 1.0):
    """A tiny checkpoint with a manifest, in the layout training writes."""
    d = run / f"checkpoint_{step:08d}"
    (d / "ds").mkdir(parents=True)
    torch.save({"module": {"w": torch.ones(3)}}, d / "ds" / "mp_rank_00_model_states.pt")
    torch.save({"decay": 0.9, "shadow": {"w": torch.full((3,), ema_value)}}, d / EMA_FILE)
    (d / MODEL_FILE).write_text(json.dumps({"num_classes": 2, "world_size": 1}))
    (d / STATE_FILE).write_text(json.dumps(TrainState(step=step, samples_seen=4 * step).as_dict()))
    write_manifest(d, rank=0, world=1, step=step)
    return d


def test_resume_choice_skips_bad_newer_checkpoints_and_sets_them_aside(tmp_path):
    for step in (2, 4):
        _ckpt(tmp_path, step)
    _ckpt(tmp_path, 6, ema_value=float("nan"))
    (tmp_path / "checkpoint_00000008").mkdir()
    (tmp_path / "checkpoint_00000008" / STATE_FILE).write_text('{"step": 8,')  # torn write
    ck = Checkpointer(RunDir(str(tmp_path)))
    warnings: list[str] = []
    verdict = ck.newest_good(warn=warnings.append)
    assert verdict.ref.name == "checkpoint_00000004"
    assert [name for name, _ in verdict.skipped] == ["checkpoint_00000006", "checkpoint_00000008"]
    assert any("ema.pt: 3 NaN/inf values" in w for w in warnings)
    assert any("checkpoint_00000008/train_state.json: unreadable" in w for w in warnings)

    assert ck.prepare_resume() == f"{tmp_path}/checkpoint_00000004"
    assert sorted(p.name for p in (tmp_path / "corrupt").iterdir()) == ["checkpoint_00000006", "checkpoint_00000008"]
    skipped = [e for e in ck.rundir.events() if e["event"] == "checkpoint_skipped"]
    assert [e["checkpoint"] for e in skipped] == ["checkpoint_00000006", "checkpoint_00000008"]
    assert [r.step for r in ck.checkpoints()] == [2, 4]


def test_corrupt_train_state_is_skipped_by_listing_naming_the_file(tmp_path, caplog):
    _ckpt(tmp_path, 2)
    bad = _ckpt(tmp_path, 4)
    (bad / STATE_FILE).write_text("not json")
    with caplog.at_level(logging.WARNING, logger="raydiff"):
        assert [r.step for r in list_checkpoints(RunDir(str(tmp_path)))] == [2]
    assert "checkpoint_00000004/train_state.json: unreadable (JSONDecodeError" in caplog.text
    with pytest.raises(CheckpointProblem, match=r"checkpoint_00000004/train_state\.json: unreadable"):
        verify_checkpoint(RunDir(str(tmp_path)), "checkpoint_00000004")


def test_prune_keeps_the_newest_and_the_protected_one(tmp_path):
    for step in (1, 2, 3, 4, 5):
        _ckpt(tmp_path, step)
    ck = Checkpointer(RunDir(str(tmp_path)))
    assert ck.prune(2, protect="checkpoint_00000001") == ["checkpoint_00000002", "checkpoint_00000003"]
    assert [r.step for r in ck.checkpoints()] == [1, 4, 5]


@pytest.fixture()
def sample_run(tmp_path):
    cfg = tiny_config()
    run = tmp_path / "run"
    write_checkpoint_dir(run, cfg, perturbed_model(cfg, 10, seed=0), step=3, num_classes=10)
    nan_model = perturbed_model(cfg, 10, seed=1)
    with torch.no_grad():
        next(nan_model.parameters()).fill_(float("nan"))
    write_checkpoint_dir(run, cfg, nan_model, step=9, num_classes=10, raw_model=perturbed_model(cfg, 10, seed=2))
    return run


def test_sample_path_refuses_nan_ema_weights_and_falls_back_for_a_run(sample_run, caplog):
    with pytest.raises(ConfigError, match=r"checkpoint_00000009 cannot be used: .*ema\.pt: \d+ NaN/inf values"):
        load_checkpoint(str(sample_run / "checkpoint_00000009"))
    with caplog.at_level(logging.WARNING, logger="raydiff"):
        ck = load_checkpoint(str(sample_run))
    assert ck.ref.step == 3
    assert "skipping checkpoint checkpoint_00000009" in caplog.text and "ema.pt" in caplog.text


def test_truncated_raw_weights_are_refused_in_one_line(tmp_path, capsys):
    cfg = tiny_config()
    ckpt = write_checkpoint_dir(tmp_path / "run", cfg, perturbed_model(cfg, 10, seed=0), step=5, num_classes=10,
                                raw_model=perturbed_model(cfg, 10, seed=1))
    assert load_checkpoint(str(ckpt), raw=True).ref.step == 5  # intact, it opens
    model_states = ckpt / "ds" / "mp_rank_00_model_states.pt"
    with open(model_states, "r+b") as f:
        f.truncate(model_states.stat().st_size // 2)
    assert main(["sample", "--raw", "--checkpoint", str(ckpt), "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "mp_rank_00_model_states.pt: unreadable" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.png").exists()


class _FakeRayCheckpoint:
    def __init__(self, path):
        self.path = str(path)


@pytest.mark.parametrize("case, expected", [
    ("newer", "checkpoint_00000006"),  # persisted after the one Ray registered: it wins
    ("ray", "checkpoint_00000004"),
    ("driver", "checkpoint_00000004"),
    ("init", "donor"),
    ("fresh", None),
])
def test_restore_precedence(tmp_path, monkeypatch, case, expected):
    run_root = tmp_path / "runs"
    cfg = tiny_config(f"run.storage={run_root}", "run.name=r")
    run = run_root / "r"
    run.mkdir(parents=True)
    if case not in ("init", "fresh"):  # a warm start or a fresh start: the run has no checkpoint yet
        for step in (2, 4):
            _ckpt(run, step)
    if case == "newer":
        _ckpt(run, 6)
    registered = _FakeRayCheckpoint(run / "checkpoint_00000004") if case in ("newer", "ray") else None
    monkeypatch.setattr(training.ray.train, "get_checkpoint", lambda: registered)
    loaded: list[str] = []
    applied: list[bool] = []

    def read_uri(self, uri):
        loaded.append(uri)
        return TrainState(step=7)

    monkeypatch.setattr(training.TrainCheckpointer, "_read_uri", read_uri)
    monkeypatch.setattr(training.TrainCheckpointer, "_read", lambda self, c: read_uri(self, c.path))
    monkeypatch.setattr(training, "apply_hyperparameters", lambda *a: applied.append(True))
    tc = training.TrainCheckpointer(
        cfg, engine=None, ema=None, rank=0, world=1, num_classes=2,
        resume_from=str(run / "checkpoint_00000004") if case == "driver" else None,
        init_checkpoint=str(tmp_path / "donor") if case == "init" else None)
    restored = tc.restore()
    if expected is None:
        assert loaded == [] and restored.source is None and restored.state.step == 0
        return
    assert [u.rsplit("/", 1)[-1] for u in loaded] == [expected]
    assert restored.source == loaded[0] and restored.state.step == 7
    assert restored.how == ("initialized" if case == "init" else "resumed")
    assert applied == ([True] if case == "init" else [])
    assert [e["event"] for e in RunDir(str(run)).events()] == [restored.how]


def test_rollback_keeps_the_data_position(tmp_path, monkeypatch):
    cfg = tiny_config(f"run.storage={tmp_path}", "run.name=r")
    monkeypatch.setattr(training.ray.train, "get_checkpoint", lambda: None)
    tc = training.TrainCheckpointer(cfg, engine=None, ema=None, rank=0, world=1, num_classes=2)
    now = TrainState(step=5, samples_seen=20, epoch=1, batch_in_epoch=3, samples_in_epoch=12)
    assert tc.rollback(now) is None  # nothing to roll back to: the worker stops with the reason
    monkeypatch.setattr(training.ray.train, "get_checkpoint", lambda: _FakeRayCheckpoint(tmp_path / "c4"))
    monkeypatch.setattr(training.TrainCheckpointer, "_read",
                        lambda self, c: TrainState(step=4, samples_seen=16, epoch=1, batch_in_epoch=2, samples_in_epoch=8))
    back = tc.rollback(now)
    assert back.source.endswith("c4")
    assert back.state == TrainState(step=4, samples_seen=16, epoch=1, batch_in_epoch=3, samples_in_epoch=12)


def test_fault_hooks_come_from_the_drivers_environment():
    hooks = FaultHooks.from_env({EXIT_ENV: "7", NAN_ENV: " 5 ", RECORD_ENV: "/tmp/ids"})
    assert hooks == FaultHooks(exit_at_step=7, nan_at_step=5, record_sample_ids_dir="/tmp/ids")
    assert FaultHooks.from_env({EXIT_ENV: "soon"}) == FaultHooks()
    guard = DivergenceGuard(1, 1.0, engine_fp16=False, nan_at_step=hooks.nan_at_step)
    batch = {"image": torch.ones(2, 3)}
    assert guard.poison(batch, 4) is batch
    assert torch.isnan(guard.poison(batch, 5)["image"]).all()
    assert guard.poison(batch, 5) is batch  # once per process: the rollback gets past it


def test_worker_reads_no_environment():
    from pathlib import Path

    src = Path(training.__file__).parents[1].joinpath("worker.py").read_text()
    assert "os.environ" not in src and "getenv" not in src
    assert src.count("import ray.train") == 1


def test_tracker_writes_metrics_jsonl_and_rewinds_it(tmp_path):
    from orchestrator.tracking import build_tracker

    cfg = tiny_config("logging.tensorboard=false")
    t = build_tracker(cfg, str(tmp_path), resume_step=0, params={})
    for step in (1, 2, 3):
        t.log({"step": step, "loss": 0.5})
    t.rewind(2)
    t.log({"step": 3, "loss": 0.25})
    t.close()
    assert [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [
        {"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.5}, {"step": 3, "loss": 0.25}]
    # A resumed worker group's tracker drops what comes after its checkpoint.
    build_tracker(cfg, str(tmp_path), resume_step=1, params={}).close()
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1]


def test_train_refuses_a_run_already_past_optim_steps_before_ray_starts(tmp_path, monkeypatch):
    """A rerun with optim.steps below the run's step: one clear error, no Ray start (issue 19)."""
    from orchestrator.config import ConfigError
    from orchestrator.train import driver

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started for a run with nothing to train")

    monkeypatch.setattr(driver, "init_ray", no_ray)
    cfg = tiny_config(f"run.storage={tmp_path}", "run.name=r", "optim.steps=5")
    write_checkpoint_dir(tmp_path / "r", cfg, perturbed_model(cfg, 10, 0), step=10, num_classes=10)
    with pytest.raises(ConfigError, match=r"already at step 10, past optim.steps=5.*optim.steps=10 or more"):
        driver.run_training(cfg)
