"""The controller's pieces that need no cluster: whose fault a failed job is (on Ray's own
JobDetails objects, with messages in the form Ray's job supervisor writes), the backoff, and the
SQLite state (compare-and-set against a concurrent stop, one controller per database, schema)."""

from __future__ import annotations

import random
import sqlite3

import pytest
from ray.dashboard.modules.job.pydantic_models import JobDetails, JobType

from orchestrator.config import ConfigError
from orchestrator.controller.policy import backoff_s, classify
from orchestrator.controller.state import SCHEMA_VERSION, State


def _failed(code: int | None, logs: str = "", error_type: str | None = "JOB_ENTRYPOINT_COMMAND_ERROR",
            message: str | None = None) -> JobDetails:
    if message is None:
        message = (f"Job entrypoint command failed with exit code {code}, last available logs (truncated to "
                   f"20,000 chars):\n{logs}") if logs else f"Job entrypoint command failed with exit code {code}. No logs available."
    return JobDetails(type=JobType.SUBMISSION, status="FAILED", entrypoint="python -m orchestrator train --config j.yaml",
                      message=message, error_type=error_type, driver_exit_code=code)


def test_raydiff_user_errors_are_not_retried_and_say_why():
    v = classify(_failed(2, "INFO something\nraydiff: /data/cats does not exist. Fix: check the path\n"))
    assert (v.kind, v.retry) == ("user", False)
    assert v.reason == "raydiff: /data/cats does not exist. Fix: check the path"
    v = classify(_failed(2, "raydiff: run /runs/a is being trained by another process: its lease is held by h pid 7"))
    assert v.kind == "user" and "lease is held" in v.reason


def test_import_and_syntax_errors_are_the_users():
    tb = ('Traceback (most recent call last):\n  File "<frozen runpy>", line 198, in _run_module_as_main\n'
          "ModuleNotFoundError: No module named 'orchestrator'\n")
    v = classify(_failed(1, tb))
    assert v.kind == "user" and "ModuleNotFoundError: No module named 'orchestrator'" in v.reason
    assert classify(_failed(1, "  File \"x.py\", line 3\nSyntaxError: invalid syntax\n")).kind == "user"


def test_signals_lost_drivers_and_crashes_are_infrastructure():
    for code, name in ((-9, "SIGKILL"), (137, "SIGKILL"), (143, "SIGTERM")):
        v = classify(_failed(code))
        assert v.kind == "infra" and name in v.reason and str(code) in v.reason
    lost = _failed(None, error_type="JOB_SUPERVISOR_ACTOR_DIED",
                   message="Job supervisor actor died: the node it ran on was removed")
    v = classify(lost)
    assert v.kind == "infra" and "JOB_SUPERVISOR_ACTOR_DIED" in v.reason and "node it ran on" in v.reason
    v = classify(_failed(1, "ray.train.TrainingFailedError: worker group failed\n"))
    assert v.kind == "infra" and "TrainingFailedError" in v.reason
    assert classify(_failed(None, error_type=None, message="Unexpected error")).kind == "infra"
    # Workers failed past run.max_failures: retried (it resumes), with raydiff's one line as the reason.
    v = classify(_failed(1, "raydiff plan:\nraydiff: training failed (no restart allowed, run.max_failures=0): rank 1: "
                            "KeyError: 'x'. The run r keeps its checkpoints\n"))
    assert v.kind == "infra" and v.retry and "rank 1: KeyError: 'x'" in v.reason and "exit code 1" in v.reason


def test_runtime_env_that_cannot_be_built_is_the_users():
    v = classify(_failed(None, error_type="RUNTIME_ENV_SETUP_FAILURE",
                         message="Failed to set up runtime environment: No matching distribution for torchh"))
    assert v.kind == "user" and "torchh" in v.reason


def test_backoff_doubles_with_jitter_and_is_capped():
    rng = random.Random(0)
    waits = [backoff_s(n, base_s=10, cap_s=60, rng=rng) for n in range(1, 7)]
    assert backoff_s(0, base_s=10, cap_s=60) == 0
    for n, w in enumerate(waits, start=1):
        full = min(60, 10 * 2 ** (n - 1))
        assert full / 2 <= w <= full
    assert max(waits) <= 60 and waits[-1] >= 30  # capped, never below half the cap
    assert len({round(backoff_s(3, base_s=10, cap_s=600, rng=rng), 6) for _ in range(20)}) > 10  # jittered


def _job(state: State, name: str = "a", status: str = "pending"):
    return state.register(name, spec="jobs/a.yaml", overrides=["optim.steps=5"], working_dir=".",
                          address="http://127.0.0.1:8265", env={}, run_uri=f"runs/{name}", max_restarts=2,
                          status=status)


def test_state_survives_reopening_and_refuses_a_stale_transition(tmp_path):
    db = tmp_path / "c.db"
    s1 = State(db)
    job = _job(s1)
    job = s1.begin_attempt("a", "a-1", 1, expect_status="pending", status="submitting")
    assert (job.status, job.attempts, job.submission_id) == ("submitting", 1, "a-1")
    s1.update("a", expect_status="submitting", status="submitted")
    # Another process (`raydiff controller stop`) marks it stopping...
    s2 = State(db)
    assert s2.request_stop("a").status == "stopping"
    # ...so the controller's decision made on the old status does not overwrite it.
    assert s1.update("a", expect_status="submitted", status="backoff", reason="killed") is None
    assert s1.begin_attempt("a", "a-2", 2, expect_status="submitted", status="submitting") is None
    assert [a.submission_id for a in s1.attempts("a")] == ["a-1"]
    s1.close()
    s3 = State(db)
    j = s3.get("a")
    assert (j.status, j.overrides, j.attempts) == ("stopping", ["optim.steps=5"], 1)
    # An ended job registered again starts over (restarts reset), its ids carry on.
    s3.update("a", status="stopped")
    j = _job(s3)
    assert (j.status, j.attempts, j.restarts) == ("pending", 1, 0)
    s2.close()
    s3.close()


def test_one_controller_per_database(tmp_path):
    s = State(tmp_path / "c.db")
    held = s.lock_controller()
    with pytest.raises(ConfigError, match=r"another controller \(pid \d+\) is running"):
        State(tmp_path / "c.db").lock_controller()
    held.close()  # a killed controller's lock goes with its process
    State(tmp_path / "c.db").lock_controller().close()


def test_newer_or_foreign_database_is_refused(tmp_path):
    db = tmp_path / "new.db"
    con = sqlite3.connect(db)
    con.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    con.close()
    with pytest.raises(ConfigError, match="newer than this raydiff"):
        State(db)
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"not a database at all" * 100)
    with pytest.raises(ConfigError, match="cannot be used"):
        State(junk)
