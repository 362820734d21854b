"""Run logs on object storage: O(flushes) small writes, nothing lost beyond the unflushed tail,
one ordered history for readers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

from orchestrator import storage
from orchestrator.config import S3Config
from orchestrator.storage import JsonlLog, RunDir, read_records, supersede

ROOT = Path(__file__).resolve().parents[1]


def test_supersede_keeps_the_latest_branch_of_each_step():
    recs = [{"step": s} for s in (1, 2, 3, 4, 5, 6)] + [{"step": s, "b": 2} for s in (5, 6, 7)]
    out = supersede(recs)
    assert [r["step"] for r in out] == [1, 2, 3, 4, 5, 6, 7]
    assert all(r.get("b") == 2 for r in out[4:])
    assert supersede([{"event": "resumed"}, {"event": "resumed"}]) == [{"event": "resumed"}] * 2


def test_local_log_appends_each_record_at_once(tmp_path):
    log = JsonlLog(str(tmp_path / "run"), "metrics.jsonl", flush_every_s=1e9)
    log.write({"step": 1})
    log.write({"step": 2})
    # Visible before any flush: a local log is tail -f-able and loses nothing on a kill.
    assert (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() == ['{"step": 1}', '{"step": 2}']
    assert RunDir(str(tmp_path / "run")).metrics() == [{"step": 1}, {"step": 2}]


def test_rewind_drops_the_redone_steps_of_a_local_log(tmp_path):
    log = JsonlLog(str(tmp_path / "run"), "metrics.jsonl")
    for step in range(1, 7):
        log.write({"step": step})
    log.write({"note": "no step"})
    log.rewind(4)  # resumed from the checkpoint at step 4
    log.write({"step": 5, "redone": True})
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x) for x in lines] == [{"step": 1}, {"step": 2}, {"step": 3}, {"step": 4},
                                              {"note": "no step"}, {"step": 5, "redone": True}]


def test_s3_log_of_1000_steps_issues_o_steps_small_writes(s3_server, s3_faults):
    """Through the proxy in front of the local S3 server: logging every step of a 1,000-step run
    with a checkpoint (flush) every 100 steps writes ~10 objects whose bytes add up to the log
    once, where a read-modify-write per line would send ~1,000 PUTs and O(steps^2) bytes."""
    bucket = s3_server.create_bucket(f"jsonl-{uuid.uuid4().hex[:8]}")
    cfg = S3Config(endpoint_url=s3_faults.endpoint_url, region=s3_server.region)
    run = f"s3://{bucket}/runs/long"
    log = JsonlLog(run, "metrics.jsonl", cfg, flush_every_s=1e9)
    payload = 0
    for step in range(1, 1001):
        rec = {"step": step, "loss": 1.0 / step, "loss_per_t_bin": [0.1] * 10}
        payload += len(json.dumps(rec)) + 1
        log.write(rec)
        if step % 100 == 0:
            log.flush()
    log.close()
    puts, put_bytes = s3_faults.plan.requests_by_method.get("PUT", 0), s3_faults.plan.bytes_by_method.get("PUT", 0)
    assert puts == 10
    assert s3_faults.plan.requests_by_method.get("GET", 0) == 0  # no read-modify-write
    assert payload <= put_bytes < 1.05 * payload
    steps = [r["step"] for r in RunDir(run, cfg).metrics()]
    assert steps == list(range(1, 1001))


WRITER = textwrap.dedent("""
    import sys, time
    from orchestrator.config import S3Config
    from orchestrator.storage import JsonlLog
    log = JsonlLog(sys.argv[1], "metrics.jsonl", S3Config(endpoint_url=sys.argv[2], region="us-east-1"),
                   flush_every_s=1e9)
    for step in range(1, 26):
        log.write({"step": step})
        if step % 10 == 0:
            log.flush()
    print("WROTE", flush=True)
    time.sleep(600)
""")


def test_kill_between_flushes_loses_only_the_unflushed_tail(s3_server, tmp_path):
    bucket = s3_server.create_bucket(f"jsonl-kill-{uuid.uuid4().hex[:8]}")
    run = f"s3://{bucket}/runs/killed"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", WRITER, run, s3_server.endpoint_url], stdout=subprocess.PIPE,
                            text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "WROTE"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    records = read_records(run, "metrics.jsonl", s3_server.s3_config())
    assert [r["step"] for r in records] == list(range(1, 21))  # steps 21-25 were never flushed
    # A resumed writer continues the same history; readers see each step once.
    log = JsonlLog(run, "metrics.jsonl", s3_server.s3_config())
    for step in range(16, 31):
        log.write({"step": step, "resumed": True})
    log.close()
    hist = RunDir(run, s3_server.s3_config()).metrics()
    assert [r["step"] for r in hist] == list(range(1, 31))
    assert all(r.get("resumed") for r in hist[15:]) and not any(r.get("resumed") for r in hist[:15])
    assert storage.listdir(f"{run}/metrics.jsonl.parts", s3_server.s3_config()).__len__() == 3
