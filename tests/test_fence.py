"""Fencing (orchestrator/storage/fence.py): two lease holders of one run in one process, on local
disk and on the local S3 server. After the second takes the lease over (``--force``), every
writer of the first (events, metrics, grids, TensorBoard segments, a checkpoint commit, pruning)
is refused with ``LeaseLost`` and the run's files are exactly what they were; the second writes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchestrator.config import load_config
from orchestrator.storage import LEASE_LOST_EXIT, Fence, LeaseLost, RunDir, acquire_lease, list_files, read_lease
from orchestrator.tracking.tensorboard import TensorBoardSink
from orchestrator.train.checkpoint.manager import Checkpointer
from orchestrator.train.checkpoint.persist import PersistCheckpoint, manifest_name

ROOT = Path(__file__).resolve().parents[1]


class _Staged:
    """What ``ray.train.report`` hands PersistCheckpoint: a local directory with the rank's files."""

    def __init__(self, path: Path):
        self.path = str(path)


def _stage(tmp: Path, step: int) -> _Staged:
    d = tmp / f"staged-{step}"
    (d / "ds").mkdir(parents=True)
    (d / "ds" / "shard.pt").write_bytes(b"x" * 1000)
    (d / "train_state.json").write_text(json.dumps({"step": step}))
    return _Staged(d)


def _files(uri: str, s3) -> dict[str, int]:
    """Every file of the run but the lease's own, with its size."""
    return {p: n for p, n in list_files(uri, s3) if not p.endswith(("lease.json", ".lease.lock"))}


def _writers(run: RunDir, tmp: Path, step: int):
    """One write of each kind, as a lease holder's driver and rank 0 make them."""
    tb = TensorBoardSink(f"{run.uri}/tensorboard", run.s3, fence=run.fence)
    tb.scalars(step, {"train/loss": 1.0})
    return [
        lambda: run.event({"event": "probe", "step": step}),
        lambda: run.write_bytes(f"samples/step_{step:07d}.png", b"png"),
        lambda: _metrics(run, step),
        lambda: PersistCheckpoint(run.uri, run.s3, rank=0, world=1, step=step, fence=run.fence, lost_wait_s=0)(
            _stage(tmp, step), f"checkpoint_{step:08d}"),
        lambda: Checkpointer(run).prune(keep=1),
        tb.close,
    ]


def _metrics(run: RunDir, step: int) -> None:
    log = run.log("metrics.jsonl", flush_every_s=0)
    log.write({"step": step, "loss": 1.0})
    log.close()


def _two_holders(uri: str, s3, tmp: Path) -> None:
    first = acquire_lease(uri, s3, renew=False)
    old = RunDir(uri, s3, Fence(uri, s3, first.holder_id))
    for write in _writers(old, tmp, 2):
        write()
    assert f"checkpoint_{2:08d}/{manifest_name(0)}" in _files(uri, s3)
    pending = _writers(old, tmp, 4)  # opened while the lease was still the first holder's

    second = acquire_lease(uri, s3, force=True, renew=False)
    assert second.generation == 1 and read_lease(uri, s3)["generation"] == 1
    before = _files(uri, s3)
    for write in pending:
        with pytest.raises(LeaseLost, match="was taken over by"):
            write()
    assert _files(uri, s3) == before  # not one byte by the old holder after the takeover
    assert [e["event"] for e in RunDir(uri, s3).events()][-1] == "lease_taken_over"

    new = RunDir(uri, s3, Fence(uri, s3, second.holder_id))
    for write in _writers(new, tmp, 6):
        write()
    assert f"checkpoint_{6:08d}/{manifest_name(0)}" in _files(uri, s3)
    assert [c.name for c in Checkpointer(new).checkpoints()] == ["checkpoint_00000006"]  # pruned by the new holder
    second.release()
    first.release()  # not its lease any more: left alone
    assert read_lease(uri, s3) is None


def test_old_holder_writes_nothing_after_a_takeover_local(tmp_path):
    _two_holders(str(tmp_path / "run"), None, tmp_path)


def test_old_holder_writes_nothing_after_a_takeover_s3(s3_server, tmp_path):
    bucket = s3_server.create_bucket("fence-s3")
    s3 = load_config(None, [f"storage.s3.endpoint_url={s3_server.endpoint_url}",
                            f"storage.s3.region={s3_server.region}"]).storage.s3
    _two_holders(f"s3://{bucket}/runs/r1", s3, tmp_path)


def test_s3_checkpoint_whose_lease_is_lost_during_the_manifest_upload_is_uncommitted(s3_server, tmp_path,
                                                                                        monkeypatch):
    bucket = s3_server.create_bucket("fence-s3-late")
    s3 = load_config(None, [f"storage.s3.endpoint_url={s3_server.endpoint_url}",
                            f"storage.s3.region={s3_server.region}"]).storage.s3
    uri = f"s3://{bucket}/runs/r2"
    first = acquire_lease(uri, s3, renew=False)
    fence = Fence(uri, s3, first.holder_id)
    checks = []
    real_check = Fence.check

    def check_then_lose(self):
        # The third read of the lease is the one after the manifest went up: taken over by then.
        checks.append(1)
        if len(checks) == 3:
            acquire_lease(uri, s3, force=True, renew=False)
        real_check(self)

    monkeypatch.setattr(Fence, "check", check_then_lose)
    with pytest.raises(LeaseLost):
        PersistCheckpoint(uri, s3, rank=0, world=1, step=2, fence=fence, lost_wait_s=0)(_stage(tmp_path, 2), "checkpoint_00000002")
    names = _files(uri, s3)
    assert "checkpoint_00000002/ds/shard.pt" in names and f"checkpoint_00000002/{manifest_name(0)}" not in names
    assert Checkpointer(RunDir(uri, s3)).newest_good().ref is None  # no manifest: never trusted


_LOSER = """
import sys, threading
from orchestrator.storage import acquire_lease
lease = acquire_lease(sys.argv[1], ttl_s=2)
print("held", flush=True)
threading.Event().wait(120)  # the renewal thread ends the process once the lease is taken
"""


def test_losing_process_exits_75_with_one_line(tmp_path):
    """A real process whose lease is taken: the renewal thread ends it with LEASE_LOST_EXIT and
    one line on stderr (not SIGTERM's abort, not a doubled log prefix)."""
    uri = str(tmp_path / "run")
    p = subprocess.Popen([sys.executable, "-c", _LOSER, uri], cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    thief = acquire_lease(uri, force=True, renew=False)
    _, err = p.communicate(timeout=60)
    assert p.returncode == LEASE_LOST_EXIT == 75
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("raydiff: the lease of run ") and "raydiff: raydiff" not in err, err
    assert "exits with status 75" in lines[0]
    thief.release()


def _checkpoint_events(run: RunDir) -> list[dict]:
    return [e for e in run.events() if e["event"] == "checkpoint"] if Path(run.uri, "events.jsonl").exists() else []


@pytest.mark.slow
def test_takeover_of_a_training_run_under_write_delays(tmp_path):
    """End to end, real processes: `raydiff train` whose checkpoint commits are each delayed by
    RAYDIFF_FAULT_WRITE_DELAY_S (an upload slowed by load) loses its lease to `--force` (taken here,
    by this process) while commits are pending. It writes nothing to the run after the takeover
    (checkpoints, metrics, events, grids, TensorBoard; its own scratch in .staging aside) and
    exits 75 with one line."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(PYTHONPATH=str(ROOT), RAY_AUTH_MODE="disabled", RAYDIFF_CACHE_DIR=str(tmp_path / "cache"),
               RAYDIFF_FAULT_WRITE_DELAY_S="4", RAYDIFF_LEASE_TTL_S="4")
    args = [f"run.storage={tmp_path}", "run.name=fenced", "scaling.num_workers=2", "optim.batch_size=8",
            "optim.steps=2000", "checkpoint.every_steps=2", "checkpoint.keep=2", "run.evaluate=false",
            "sampling.every_steps=3", "sampling.num_steps=2", "sampling.per_class=1", "sampling.max_rows=2",
            "data.resolution=16", "model.name=unet-tiny", "data.builtin_images_per_class=4",
            "optim.warmup_steps=2", "logging.every_steps=1", "logging.progress=false"]
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator", "train", *args], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    run = RunDir(str(tmp_path / "fenced"))
    try:
        deadline = time.monotonic() + 600  # the shared 2-core machine is often overloaded
        while not _checkpoint_events(run):  # one commit done; the next ones are pending (4 s each)
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.5)
        thief = acquire_lease(run.uri, force=True, renew=False)
        before = {p: n for p, n in _files(run.uri, None).items() if not p.startswith(".staging/")}
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    after = {p: n for p, n in _files(run.uri, None).items() if not p.startswith(".staging/")}
    assert after == before, sorted(set(after.items()) ^ set(before.items()))
    assert run.events()[-1]["event"] == "lease_taken_over"
    assert proc.returncode == LEASE_LOST_EXIT, err[-3000:]
    lines = [line for line in err.splitlines() if "was taken over" in line]
    assert len(lines) == 1 and lines[0].startswith("raydiff: the lease of run ") and "raydiff: raydiff" not in err, err
    assert "Traceback" not in err, err[-3000:]
    thief.release()
