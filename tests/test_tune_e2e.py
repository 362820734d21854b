"""Sweeps end to end: real Ray Tune over real raydiff training runs (Ray Train + DeepSpeed, CPU),
each sweep driver a real process with its own local Ray (so it can be SIGKILLed)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from PIL import Image

from orchestrator.storage import RunDir
from orchestrator.train.checkpoint.layout import list_checkpoints

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
STEPS = 12


def _job(tmp_path: Path, name: str, **tune) -> Path:
    """jobs/tune-smoke.yaml cut down for the test machine, with the given tune settings."""
    tree = yaml.safe_load((ROOT / "jobs" / "tune-smoke.yaml").read_text())
    tree["run"].update({"name": name, "storage": str(tmp_path / "sweeps"), "evaluate": False})
    tree["data"].update({"builtin_images_per_class": 6})
    tree["optim"].update({"steps": STEPS})
    tree["checkpoint"].update({"every_steps": 3, "keep": 2})
    tree["logging"].update({"every_steps": 3, "val_every_steps": 3})
    tree["scaling"].update({"cpus_per_worker": 0.5})
    tree["tune"].update(tune)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def _env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # each sweep starts its own Ray
    env.update({"RAY_AUTH_MODE": "disabled", "RAYDIFF_CACHE_DIR": str(tmp_path / "cache"), "RAY_USAGE_STATS_ENABLED": "0",
                "PYTHONPATH": os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])})
    return env


def _raydiff(args: list[str], tmp_path: Path, log: Path) -> subprocess.Popen:
    # Own session: the sweep driver and its local Ray are one process group to kill.
    return subprocess.Popen([sys.executable, "-m", "orchestrator", *args], cwd=tmp_path, env=_env(tmp_path),
                            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def _runs(sweep: Path) -> dict[str, RunDir]:
    return {p.name: RunDir(str(p)) for p in sorted(sweep.iterdir()) if p.is_dir() and p.name != "tune"}


def _state(run: RunDir) -> dict:
    events = run.events() if run.exists("events.jsonl") else []
    steps = [r.step for r in list_checkpoints(run)]
    return {"checkpoint": max(steps, default=0), "started": sum(e["event"] == "started" for e in events),
            "finished": [e["step"] for e in events if e["event"] == "finished"],
            "metrics": [r["step"] for r in run.metrics()] if run.exists("metrics.jsonl") else []}


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # already gone, with its whole group
    proc.wait()


def _tune_status(sweep: Path, settled_s: float = 0.5) -> dict[str, str]:
    """Trial id -> status in Tune's last saved experiment state (what a restore starts from),
    once that state has been in storage for ``settled_s``.

    Tune copies a save's files (experiment state, searcher, callbacks) to storage one by one:
    acting the moment the experiment state lands would kill the driver inside that copy far
    more often than a user's kill at a random moment does. (A kill inside it restores a newer
    experiment state with an older searcher or rung state; orchestrator/tune/asha.py completes
    the rungs, tests/test_tune_config.py covers that case.)"""
    states = sorted((sweep / "tune").glob("experiment_state-*.json"))
    if not states:
        return {}
    try:
        if time.time() - states[-1].stat().st_mtime < settled_s:
            return {}
        data = json.loads(states[-1].read_text())
    except (OSError, ValueError):
        return {}  # being rewritten
    trials = [json.loads(t[0]) for t in data.get("trial_data", [])]
    return {t["trial_id"]: t["status"] for t in trials}


def _finish(proc: subprocess.Popen, log: Path, timeout: float) -> str:
    try:
        proc.wait(timeout=timeout)
    finally:
        _kill(proc)
    text = log.read_text()
    assert proc.returncode == 0, text[-6000:]
    return text


def test_asha_sweep_killed_and_resumed_then_best_config_is_a_job(tmp_path, capsys):
    # Grid order: two learning rates that train, then two that barely move the weights. ASHA's
    # only rung is at step 9, so trials are never stopped before the kill point (steps 3-6).
    job = _job(tmp_path, "asha", searcher="grid", num_samples=1, max_concurrent_trials=2,
               asha={"grace_period": 9, "reduction_factor": 2},
               space={"optim.lr": {"grid": [2e-3, 1e-3, 1e-6, 2e-6]}})
    sweep = tmp_path / "sweeps" / "asha"
    log1 = tmp_path / "first.log"
    first = _raydiff(["tune", "--config", str(job)], tmp_path, log1)
    at_kill: dict[str, dict] = {}
    finished: set[str] = set()
    deadline = time.monotonic() + 600
    try:
        while time.monotonic() < deadline and first.poll() is None:
            if sweep.exists():
                states = {name: _state(run) for name, run in _runs(sweep).items()}
                # Finished as far as Tune's saved state knows (a final checkpoint alone is not),
                # or as the run's own files do (its "finished" event): Tune saves its state every
                # few seconds, long enough for the next trials to train past the rung at step 9.
                done = [t for t, st in _tune_status(sweep).items() if st == "TERMINATED"]
                ended = [n for n, s in states.items() if s["finished"]]
                midway = [n for n, s in states.items() if 0 < s["checkpoint"] <= 6]
                if (done or ended) and midway:
                    at_kill, finished = states, set(done)
                    break
            time.sleep(0.3)
    finally:
        _kill(first)  # the driver and its local Ray, mid-sweep
    assert at_kill, "never saw a finished trial beside one mid-way:\n" + log1.read_text()[-6000:]
    # What the restore starts from: the runs' files and Tune's last saved state as the kill left
    # them (between the look above and the kill a run may have moved on, and ASHA may have stopped
    # a trial at its rung: terminated in Tune's state, it is not run again).
    killed = {name: _state(run) for name, run in _runs(sweep).items()}
    finished |= {t for t, st in _tune_status(sweep, settled_s=0).items() if st == "TERMINATED"}

    out = _finish(_raydiff(["tune", "--config", str(job)], tmp_path, tmp_path / "second.log"), tmp_path / "second.log", 600)
    assert "resuming sweep" in out
    assert "not completed from the trials' metric logs" not in out  # the restored rungs got the runs' histories
    runs = _runs(sweep)
    after = {name: _state(run) for name, run in runs.items()}
    for name, before in killed.items():
        # Finished before the kill, as Tune's saved state knows it or as the run's own files do (a
        # run that finished after Tune's last save is restored as running, and reported from its
        # files without training): kept, not run again.
        if name in finished or before["finished"]:
            assert after[name] == before, (name, before, after[name])
        elif before["checkpoint"] > 0:  # mid-way: continued from its checkpoint, not from scratch
            resumed = [e for e in runs[name].events() if e["event"] == "resumed"]
            assert resumed and resumed[0]["step"] >= before["checkpoint"], (name, runs[name].events())
            assert after[name]["started"] == before["started"] + 1
            assert after[name]["metrics"][:len(before["metrics"])] == before["metrics"]

    table = pd.read_csv(sweep / "results.csv")
    assert len(table) == 4 and set(table["status"]) <= {"completed", "stopped early"}
    stopped = table[table["status"] == "stopped early"]
    assert len(stopped) >= 1 and (stopped["step"] < STEPS).all()
    assert table["val_loss"].notna().all()
    # Every trial's start-up (its newest start that trained, to its first step) is read from its
    # events.jsonl: also for a trial whose last invocation trained nothing (a run stopped after its
    # last checkpoint but before recording its end runs again and resumes at the last step).
    assert (table["start_s"] > 0).all()
    with Image.open(sweep / "metric.png") as png:
        assert png.size[0] >= 600
    best = sweep / "best.yaml"
    spec = yaml.safe_load(best.read_text())
    assert "tune" not in spec and spec["optim"]["lr"] in (2e-3, 1e-3) and spec["run"]["name"] == "asha-best"

    # best.yaml is a complete job for `raydiff train --config`: resolved and planned on this
    # machine (training a config is every other end-to-end test's subject; a third run of the
    # sweep's start-up here cost 40 s of the suite, issue 18).
    from orchestrator.cli import main

    capsys.readouterr()
    assert main(["train", "--config", str(best), "--dry-run"]) == 0  # in this process: no start-up to pay
    planned = capsys.readouterr().out
    resolved = yaml.safe_load(planned.split("# plan", 1)[0])
    assert resolved["optim"]["lr"] == spec["optim"]["lr"] and resolved["optim"]["steps"] == STEPS
    assert resolved["run"]["name"] == "asha-best" and "tune" not in resolved


def test_pbt_exploit_continues_from_the_donors_checkpoint(tmp_path):
    job = _job(tmp_path, "pbt", searcher="random", scheduler="pbt", num_samples=1, max_concurrent_trials=2,
               pbt={"perturbation_interval": 6, "quantile_fraction": 0.5, "resample_probability": 0.0, "synch": True},
               space={"optim.lr": {"grid": [2e-3, 1e-6]}, "optim.ema_decay": {"uniform": [0.9, 0.99]}})
    tree = yaml.safe_load(job.read_text())
    tree["run"]["evaluate"] = True  # the final sample-quality score goes in the results
    tree["checkpoint"]["keep"] = 4  # the donor's step-6 checkpoint outlives the donor's run
    job.write_text(yaml.safe_dump(tree))
    log = tmp_path / "pbt.log"
    _finish(_raydiff(["tune", "--config", str(job)], tmp_path, log), log, 900)
    sweep = tmp_path / "sweeps" / "pbt"
    runs = _runs(sweep)
    exploited = [n for n in runs if "-x" in n]
    assert exploited, f"no exploit happened: {sorted(runs)}"
    name = exploited[0]
    trial, rest = name.split("-x", 1)
    step, donor = rest.split("-", 1)
    init = [e for e in runs[name].events() if e["event"] == "initialized"]
    # The new run started from the donor's checkpoint at that step ...
    assert len(init) == 1 and init[0]["step"] == int(step)
    assert init[0]["checkpoint"] == str(sweep / donor / f"checkpoint_{init[0]['step']:08d}")
    # ... trained on from there (no step before it) to the end ...
    steps = [r["step"] for r in runs[name].metrics()]
    assert steps and min(steps) > init[0]["step"] and max(steps) == STEPS
    mine = yaml.safe_load(runs[name].read_text("config.yaml"))["optim"]
    theirs = yaml.safe_load(runs[donor].read_text("config.yaml"))["optim"]
    # ... with its own, perturbed EMA decay: PBT scales it by 0.8 or 1.2, kept inside [0.9, 0.99].
    expected = [min(max(theirs["ema_decay"] * f, 0.9), 0.99) for f in (0.8, 1.2)]
    assert any(mine["ema_decay"] == pytest.approx(e) for e in expected), (mine, theirs)
    table = pd.read_csv(sweep / "results.csv")
    assert len(table) == 2 and (table["status"] == "completed").all()
    assert table["sample_accuracy"].between(0, 1).all()
    assert trial in set(table["trial"])
