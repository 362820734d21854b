"""Kill a training worker mid-run (SIGKILL of the real process): Ray Train restarts the worker
group, raydiff resumes from the newest persisted checkpoint, the run ends at the same final
step, redoes at most one checkpoint interval, metrics.jsonl holds each step once and the optimizer
state comes along. (The elastic resume of a 2-worker run on 1 worker, train/checkpoint/elastic.py,
is test_exact_resume's image-folder case.)

The process to kill is the one that wrote rank 1's part of the first checkpoint: its pid is in
``manifest.rank1.json`` (train/checkpoint/persist.py), so the test never guesses among Ray's processes.
``raydiff train`` runs in a subprocess with its own local Ray (RAY_ADDRESS removed: with it the
subprocess would join the test session's Ray). A fast test covers the choice of checkpoint on
a restart (train/checkpoint/verify.py: newer_good_checkpoint), which the kill first exposed: a worker killed
after persisting a checkpoint but before Ray registered it restarted the run from step 0.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from checkpoint_factory import adam_steps
from orchestrator.storage import RunDir, join
from orchestrator.train.checkpoint.layout import EMA_FILE, MODEL_FILE, STATE_FILE, checkpoint_dir_name, \
    checkpoint_step
from orchestrator.train.checkpoint.persist import write_manifest
from orchestrator.train.checkpoint.verify import newer_good_checkpoint

ROOT = Path(__file__).resolve().parents[1]

STEPS, EVERY = 24, 4
ARGS = ["run.name=kill", "scaling.num_workers=2", "optim.batch_size=8", f"checkpoint.every_steps={EVERY}",
        "checkpoint.keep=3", "run.max_failures=2", "run.evaluate=false", "sampling.every_steps=1000",
        "sampling.num_steps=2", "sampling.per_class=1", "sampling.max_rows=2", "data.resolution=16", "model.name=unet-tiny",
        "data.builtin_images_per_class=6", "optim.warmup_steps=2", "logging.every_steps=1"]


def _wait_for(predicate, proc: subprocess.Popen, deadline: float, what: str):
    while True:
        value = predicate()
        if value:
            return value
        if proc.poll() is not None:
            raise AssertionError(f"raydiff train exited ({proc.returncode}) before {what}:\n{proc.stdout.read()[-4000:]}")
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def _manifest(run_dir: Path, step: int, rank: int) -> dict | None:
    path = run_dir / checkpoint_dir_name(step) / f"manifest.rank{rank}.json"
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None  # not there yet, or being written


def _fake_checkpoint(run_dir: Path, step: int, *, world: int, ranks_persisted: int) -> None:
    d = run_dir / checkpoint_dir_name(step)
    (d / "ds").mkdir(parents=True)
    torch.save({"module": {"w": torch.ones(3)}}, d / "ds" / "mp_rank_00_model_states.pt")
    torch.save({"decay": 0.9, "shadow": {"w": torch.ones(3)}}, d / EMA_FILE)
    (d / MODEL_FILE).write_text(json.dumps({"num_classes": 2, "world_size": world}))
    (d / STATE_FILE).write_text(json.dumps({"step": step}))
    for rank in range(ranks_persisted):
        write_manifest(d, rank=rank, world=world, step=step)


def test_a_restart_takes_the_newest_persisted_checkpoint_that_ray_has_not_registered(tmp_path):
    """What a restarted worker group resumes from when Ray Train's registered checkpoint lags
    the run directory: the newest newer one that verifies (an incomplete one is passed over)."""
    _fake_checkpoint(tmp_path, 4, world=2, ranks_persisted=2)
    _fake_checkpoint(tmp_path, 8, world=2, ranks_persisted=2)
    _fake_checkpoint(tmp_path, 12, world=2, ranks_persisted=1)  # rank 1 killed while persisting
    run = RunDir(str(tmp_path))
    eight = join(run.uri, checkpoint_dir_name(8))
    assert newer_good_checkpoint(run, join(run.uri, checkpoint_dir_name(4))) == eight
    assert newer_good_checkpoint(run, None) == eight  # nothing registered, no driver's choice
    assert newer_good_checkpoint(run, eight) is None  # Ray's own is the newest good one
    assert checkpoint_step("bucket/runs/kill/checkpoint_00000012") == 12
    assert checkpoint_step("s3://bucket/runs/kill/checkpoint_00000012/") == 12
    assert checkpoint_step("/runs/kill/other") is None
    # The manifest names the process that wrote it (the worker-kill test below relies on it).
    manifest = json.loads((tmp_path / checkpoint_dir_name(4) / "manifest.rank1.json").read_text())
    assert manifest["pid"] == os.getpid() and manifest["host"]


@pytest.mark.slow
def test_killed_worker_is_replaced_and_the_run_finishes(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(PYTHONPATH=str(ROOT), RAY_AUTH_MODE="disabled", RAYDIFF_CACHE_DIR=str(tmp_path / "cache"))
    args = [f"run.storage={tmp_path}", f"optim.steps={STEPS}", *ARGS]
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator", "train", *args], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    run_dir = tmp_path / "kill"
    run = RunDir(str(run_dir))
    try:
        deadline = time.time() + 900  # generous: the shared 2-core machine is often overloaded
        manifest = _wait_for(lambda: _manifest(run_dir, EVERY, 1), proc, deadline, "the first checkpoint")
        victim = psutil.Process(manifest["pid"])
        # The pid is a live Ray Train worker of this run, not a reused number.
        assert "RayTrainWorker" in " ".join(victim.cmdline()) or victim.name().startswith("ray::"), victim.cmdline()
        assert proc.pid in {p.pid for p in victim.parents()}
        killed_at = max(r["step"] for r in run.metrics())
        t_kill = time.time()
        victim.send_signal(signal.SIGKILL)
        out, _ = proc.communicate(timeout=max(1, deadline - time.time()))
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, out[-4000:]
    assert f"final step: {STEPS}" in out, out[-3000:]
    assert killed_at < STEPS, "the kill came after training ended: make the run longer"

    events = run.events()
    resumed = [e for e in events if e["event"] == "resumed"]
    assert len(resumed) == 1, ([e["event"] for e in events], out[-3000:])
    resumed_step = resumed[0]["step"]
    assert resumed_step % EVERY == 0 and killed_at - resumed_step <= EVERY, (killed_at, resumed_step)
    first_after = [e for e in events if e["event"] == "first_step" and e["time"] > t_kill]
    assert [e["step"] for e in first_after] == [resumed_step + 1]
    recovery = first_after[0]["time"] - t_kill
    print(f"\nworker kill (2 workers, unet-tiny 16px, CPU): killed at step {killed_at}, resumed from step "
          f"{resumed_step} ({killed_at - resumed_step} steps redone), training again {recovery:.1f} s after the kill")

    # Each step once: in the history and in the file itself (rewound on resume).
    assert [r["step"] for r in run.metrics()] == list(range(1, STEPS + 1))
    raw = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert raw == list(range(1, STEPS + 1))

    # The optimizer state came along through the resume after the kill: Adam's step counter in
    # every shard and parameter group counts every step of the run; an optimizer restarted fresh
    # would count only the steps since the resume (STEPS - resumed_step). The elastic resume of a
    # 2-worker run on 1 worker is test_exact_resume's image-folder case.
    assert set(adam_steps(run_dir / checkpoint_dir_name(STEPS))) == {STEPS}, resumed_step
