"""Kill a training worker mid-run (SIGKILL of the real process): Ray Train restarts the worker
group, raydiff resumes from the newest persisted checkpoint, the run ends at the same final
step, redoes at most one checkpoint interval, and metrics.jsonl holds each step once."""

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

from orchestrator.storage import RunDir

from test_train_e2e import TINY

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _train_worker_of(pid: int) -> psutil.Process | None:
    for p in psutil.Process(pid).children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(p.cmdline()) or p.name().startswith("ray::RayTrainWorker"):
                return p
        except psutil.NoSuchProcess:
            continue
    return None


def test_killed_worker_is_replaced_and_the_run_finishes(tmp_path):
    steps, every = 40, 5
    args = [f"run.storage={tmp_path}", "run.name=kill", "scaling.num_workers=1", "optim.batch_size=4",
            f"optim.steps={steps}", f"checkpoint.every_steps={every}", "run.max_failures=2", "run.evaluate=false",
            "sampling.every_steps=1000", *[t for t in TINY if not t.startswith(("optim.batch_size", "run.max_failures"))]]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled", "RAYDIFF_CACHE_DIR": str(tmp_path / "cache")}
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator", "train", *args], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    run_dir = tmp_path / "kill"
    try:
        deadline = time.time() + 400
        while not (run_dir / "checkpoint_00000005" / "manifest.rank0.json").exists():
            assert proc.poll() is None and time.time() < deadline, proc.stdout.read() if proc.poll() is not None else "timeout"
            time.sleep(0.5)
        worker = _train_worker_of(proc.pid)
        assert worker is not None
        killed_at = max(r["step"] for r in RunDir(str(run_dir)).metrics())
        t_kill = time.time()
        worker.send_signal(signal.SIGKILL)
        out, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, out[-4000:]
    assert f"final step: {steps}" in out
    run = RunDir(str(run_dir))
    resumed = [e for e in run.events() if e["event"] == "resumed"]
    assert killed_at < steps, "the kill came after training ended: make the run longer"
    assert len(resumed) == 1, (run.events(), out[-3000:])
    assert killed_at - resumed[0]["step"] <= every  # at most one interval redone
    recovery = next(e["time"] for e in run.events() if e["event"] == "resumed") - t_kill
    print(f"worker kill at step {killed_at}: resumed from step {resumed[0]['step']} after {recovery:.1f} s")
    raw = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert raw == list(range(1, steps + 1))
