"""One writer per run: the lease in the run directory, on local disk and on S3 (moto), with real
processes for a killed holder and a holder that loses its lease."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from orchestrator.storage import LEASE_LOST_EXIT, LeaseHeld, LeaseLost, RunDir, acquire_lease, read_lease
from orchestrator.storage.lease import _store, job_submission_id, stale_reason

ROOT = Path(__file__).resolve().parents[1]


def _foreign(renewed_ago: float, ttl: float = 60, submission_id: str | None = None) -> dict:
    """A lease record written by a driver on another machine."""
    now = time.time()
    return {"holder": {"id": "f" * 32, "host": "other-host.example", "pid": 4242, "pid_started": 1.0,
                       "submission_id": submission_id},
            "acquired": now - renewed_ago - 5, "renewed": now - renewed_ago, "ttl_s": ttl}


def _write_record(run: RunDir, record: dict) -> None:
    run.write_text("lease.json", json.dumps(record))


def test_second_acquire_is_refused_naming_the_holder_then_free_after_release(tmp_path):
    run = RunDir(str(tmp_path / "r1"))
    first = acquire_lease(run, renew=False)
    try:
        with pytest.raises(LeaseHeld) as e:
            acquire_lease(run, renew=False)
        msg = str(e.value)
        assert f"{socket.gethostname()} pid {os.getpid()}" in msg
        assert "is being trained by another process" in msg and "--force" in msg
        assert read_lease(run.uri)["holder"]["id"] == first.holder["id"]
    finally:
        first.release()
    assert read_lease(run.uri) is None
    again = acquire_lease(run, renew=False)
    assert again.taken_over is None
    again.release()


def test_renewal_pushes_expiry_and_notices_a_takeover(tmp_path):
    run = RunDir(str(tmp_path / "r2"))
    lost: list[LeaseLost] = []
    got = threading.Event()
    lease = acquire_lease(run, ttl_s=2, renew=False)
    lease.start_renewing(on_lost=lambda e: (lost.append(e), got.set()))
    try:
        first = read_lease(run.uri)["renewed"]
        time.sleep(0.8)
        assert read_lease(run.uri)["renewed"] > first  # renewed every ttl/4
        # Alive and renewed: refused without --force, taken with it.
        with pytest.raises(LeaseHeld):
            acquire_lease(run, ttl_s=2, renew=False)
        thief = acquire_lease(run, ttl_s=30, force=True, renew=False)
        assert thief.taken_over["reason"] == "taken over with --force"
        assert got.wait(5), "the first holder did not notice that its lease was taken"
        assert "was taken over by" in str(lost[0])
        thief.release()
    finally:
        lease.release()
    events = run.events()
    assert [e["event"] for e in events] == ["lease_taken_over"]
    assert events[0]["previous"]["id"] == lease.holder["id"] and events[0]["holder"]["id"] == thief.holder["id"]


def test_expired_and_controller_takeovers_and_unreadable_record(tmp_path):
    run = RunDir(str(tmp_path / "r3"))
    # Live on another host: refused, the message says when it expires.
    _write_record(run, _foreign(renewed_ago=5, ttl=60, submission_id="demo-1"))
    with pytest.raises(LeaseHeld, match=r"other-host.example pid 4242 \(Ray Job submission demo-1\) renewed [56]s ago.*expires in 5[45]s"):
        acquire_lease(run, renew=False)
    # Another submission id named by the controller does not open it; the holder's own does.
    with pytest.raises(LeaseHeld):
        acquire_lease(run, takeover_submission="demo-7", renew=False)
    lease = acquire_lease(run, takeover_submission="demo-1", renew=False)
    assert "demo-1 has ended" in lease.taken_over["reason"]
    lease.release()
    # Expired: taken automatically, no flag needed.
    _write_record(run, _foreign(renewed_ago=90, ttl=60))
    lease = acquire_lease(run, renew=False)
    assert lease.taken_over["reason"].startswith("expired 3")
    lease.release()
    # A record nobody can read (truncated write on a full disk) does not lock the run forever.
    run.write_text("lease.json", '{"holder": {"id": "x"')
    lease = acquire_lease(run, renew=False)
    assert lease.taken_over["reason"] == "the lease record is unreadable"
    lease.release()


def test_stale_reason_pid_reuse_is_not_the_holder():
    rec = {"holder": {"id": "a", "host": socket.gethostname(), "pid": os.getpid(), "pid_started": 1.0},
           "renewed": time.time(), "ttl_s": 60}
    # This pid is alive but started long after 1970: another process reusing the number.
    assert "another process" in stale_reason(rec, time.time())
    import psutil

    rec["holder"]["pid_started"] = psutil.Process().create_time()
    assert stale_reason(rec, time.time()) is None


def test_job_submission_id_from_rays_driver_environment(monkeypatch):
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    assert job_submission_id() is None
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR",
                       json.dumps({"runtime_env": {}, "metadata": {"job_submission_id": "cifar-3", "job_name": "cifar-3"}}))
    assert job_submission_id() == "cifar-3"


_HOLDER = """
import sys, time
from orchestrator.storage import acquire_lease
lease = acquire_lease(sys.argv[1], ttl_s=float(sys.argv[2]))
print("held", flush=True)
time.sleep(600)
"""


def _start_holder(uri: str, ttl_s: float) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", _HOLDER, uri, str(ttl_s)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    line = p.stdout.readline()
    assert line.strip() == "held", f"holder process failed to start (rc={p.poll()})"
    return p


def test_killed_holder_on_this_host_is_taken_over_at_once_and_a_robbed_holder_stops(tmp_path):
    uri = str(tmp_path / "r4")
    holder = _start_holder(uri, ttl_s=3600)  # would block a resume for an hour by expiry alone
    try:
        with pytest.raises(LeaseHeld, match=f"pid {holder.pid}"):
            acquire_lease(uri, renew=False)
        holder.send_signal(signal.SIGKILL)
        holder.wait(30)
        t0 = time.monotonic()
        lease = acquire_lease(uri, renew=False)
        assert time.monotonic() - t0 < 5
        assert lease.taken_over["reason"] == "its process no longer exists on this host"
        lease.release()

        # A live holder whose lease is taken with --force stops itself at its next renewal.
        holder = _start_holder(uri, ttl_s=2)
        thief = acquire_lease(uri, force=True, renew=False)
        assert holder.wait(30) == LEASE_LOST_EXIT
        assert read_lease(uri)["holder"]["id"] == thief.holder["id"]  # the robbed holder did not delete it
        thief.release()
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()


def test_local_lease_is_exclusive_under_concurrent_acquires(tmp_path):
    uri = str(tmp_path / "r5")
    won: list = []
    refused: list = []
    barrier = threading.Barrier(4)

    def contender() -> None:
        barrier.wait()
        try:
            won.append(acquire_lease(uri, renew=False))
        except LeaseHeld as e:
            refused.append(e)

    threads = [threading.Thread(target=contender) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(won) == 1 and len(refused) == 3
    assert read_lease(uri)["holder"]["id"] == won[0].holder["id"]
    won[0].release()


def test_s3_lease_uses_conditional_writes(s3_server):
    bucket = s3_server.create_bucket("lease-s3")
    uri = f"s3://{bucket}/runs/r6"
    s3 = s3_server.s3_config()
    first = acquire_lease(uri, s3, renew=False)
    with pytest.raises(LeaseHeld, match=f"pid {os.getpid()}"):
        acquire_lease(uri, s3, renew=False)
    # What a driver that read "no lease" a moment before the first one wrote would do next:
    # its If-None-Match create fails, and so does an If-Match replace with an old ETag.
    store = _store(uri, s3)
    raw, etag = store.read()
    assert not store.write(b"{}", expect=None, create=True)
    first.renew()
    assert not store.write(b"{}", expect=etag, create=False)
    assert read_lease(uri, s3)["holder"]["id"] == first.holder["id"]
    # A write by someone else in between makes the renewal fail.
    client = s3_server.client()
    client.put_object(Bucket=bucket, Key="runs/r6/lease.json", Body=json.dumps(_foreign(renewed_ago=0)).encode())
    with pytest.raises(LeaseLost, match="other-host.example"):
        first.renew()
    # Expired on S3: taken over with a conditional replace; release deletes only its own record.
    client.put_object(Bucket=bucket, Key="runs/r6/lease.json", Body=json.dumps(_foreign(renewed_ago=120)).encode())
    lease = acquire_lease(uri, s3, renew=False)
    assert lease.taken_over["reason"].startswith("expired")
    first.release()
    assert read_lease(uri, s3)["holder"]["id"] == lease.holder["id"]
    lease.release()
    assert read_lease(uri, s3) is None
