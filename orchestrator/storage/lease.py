"""One writer per run: a lease object, ``lease.json``, in the run directory.

Two drivers training the same ``{run.storage}/{run.name}`` would interleave metrics, overwrite
each other's checkpoints and resume from each other's half-written state. The driver therefore
takes the run's lease before Ray starts, a background thread renews it, and it is released when
the driver ends. The record names its holder: ``{"holder": {"id", "host", "pid", "pid_started",
"submission_id"}, "acquired", "renewed", "ttl_s"}`` (times are Unix seconds of the holder's clock).

Who may take a lease that is already there (``acquire_lease``):

- nobody, while it is *live*: renewed less than ``ttl_s`` ago by a holder that may still run.
  The second run is refused with ``LeaseHeld`` (a ``StorageError``: exit 2) naming the holder.
- anyone, once it is *stale*, automatically, so that a killed run never blocks its own resume:
  - *expired*: not renewed for ``ttl_s`` (the holder died, hung, or lost its storage), or
  - *holder gone*: the holder ran on this host and its process no longer exists (the same pid
    with another start time is another process). A run killed with ``kill -9`` and started again
    on the same machine, or a Ray Job resubmitted to the same head, resumes at once instead of
    waiting ``ttl_s``.
- ``takeover_submission=ID`` (the job controller sets ``RAYDIFF_LEASE_TAKEOVER`` for a
  resubmission): a lease held by the Ray Job submission ``ID``, which Ray has reported ended,
  whichever host its driver ran on.
- ``force=True`` (``raydiff train --force``): any lease, even a live-looking one. For a holder
  you know is gone but whose lease has not expired yet (a machine that lost power a moment ago);
  if the holder is in fact alive, its renewal thread finds the lease taken and stops that run.

Every takeover is written to ``events.jsonl`` with the previous holder and the reason.

Atomicity. Local paths: every read-decide-write runs under ``flock`` on ``.lease.lock`` beside
the lease (a local filesystem, or NFSv4 which supports locks), and writes replace the file
atomically. S3: creating uses ``PutObject`` with ``If-None-Match: *`` and replacing uses
``If-Match: <ETag read>``, so of two drivers that race only one write succeeds (AWS S3 since
2024, MinIO, and moto support both). Every write is read back and the holder id compared, which
also settles a conditional write whose first attempt succeeded but was retried by botocore. A
store that ignores the conditions (or answers 501) gets unconditional writes plus that read-back:
two drivers starting within one round trip of each other can then both read back their own
record before one is overwritten, and the loser notices only at its next renewal (``ttl_s / 4``
later) and stops. Expiry compares clocks of different machines: keep them within a few seconds
(NTP) of each other, far below ``ttl_s``.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from orchestrator.storage.lease_store import _store
from orchestrator.storage.rundir import RunDir
from orchestrator.storage.uri import StorageError

if TYPE_CHECKING:
    from orchestrator.config import S3Config

log = logging.getLogger("raydiff")

DEFAULT_TTL_S = 60.0
TTL_ENV = "RAYDIFF_LEASE_TTL_S"
TAKEOVER_ENV = "RAYDIFF_LEASE_TAKEOVER"
# Exit status of a process whose run lease was taken over (sysexits.h EX_TEMPFAIL: the run itself
# is fine and goes on in the process that took it; this one stopped writing).
LEASE_LOST_EXIT = 75


class LeaseHeld(StorageError):
    """Another live run holds this run directory's lease."""


class LeaseLost(StorageError):
    """The lease this process held was taken over by another."""


def _ttl(ttl_s: float | None) -> float:
    if ttl_s is not None:
        return float(ttl_s)
    raw = os.environ.get(TTL_ENV)
    try:
        value = float(raw) if raw else DEFAULT_TTL_S
    except ValueError:
        raise StorageError(f"{TTL_ENV}={raw!r} is not a number of seconds. Fix: unset it or set e.g. 60") from None
    if not value > 0 or value == float("inf"):
        raise StorageError(f"{TTL_ENV}={raw!r} must be a positive number of seconds. Fix: unset it or set e.g. 60")
    return value


def job_submission_id() -> str | None:
    """The Ray Jobs submission id when this process is a job's entrypoint (Ray passes the job's
    metadata to the driver in ``RAY_JOB_CONFIG_JSON_ENV_VAR``), else None."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return None
    try:
        return (json.loads(raw).get("metadata") or {}).get("job_submission_id")
    except (ValueError, AttributeError):
        return None


def _process_started(pid: int) -> float | None:
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:  # gone (or not ours to see)
        return None


def this_holder() -> dict[str, Any]:
    pid = os.getpid()
    return {"id": uuid.uuid4().hex, "host": socket.gethostname(), "pid": pid, "pid_started": _process_started(pid),
            "submission_id": job_submission_id()}


def describe_holder(record: dict[str, Any], now: float | None = None) -> str:
    """``host pid N (Ray Job submission S), renewed Xs ago`` for messages."""
    h = record.get("holder") or {}
    now = time.time() if now is None else now
    parts = [f"{h.get('host', '?')} pid {h.get('pid', '?')}"]
    if h.get("submission_id"):
        parts.append(f"(Ray Job submission {h['submission_id']})")
    renewed = record.get("renewed")
    if isinstance(renewed, (int, float)):
        parts.append(f"renewed {max(0.0, now - renewed):.0f}s ago")
    return " ".join(parts)


def stale_reason(record: dict[str, Any], now: float, *, force: bool = False,
                 takeover_submission: str | None = None) -> str | None:
    """Why ``record`` may be taken over now, or None while it is live (see the module docstring)."""
    h = record.get("holder")
    renewed, ttl = record.get("renewed"), record.get("ttl_s")
    if not isinstance(h, dict) or not isinstance(renewed, (int, float)) or not isinstance(ttl, (int, float)):
        return "the lease record is unreadable"
    if now - renewed > ttl:
        return f"expired {now - renewed - ttl:.0f}s ago (not renewed for {now - renewed:.0f}s, ttl {ttl:g}s)"
    if h.get("host") == socket.gethostname() and isinstance(h.get("pid"), int):
        started = _process_started(h["pid"])
        if started is None:
            return "its process no longer exists on this host"
        if isinstance(h.get("pid_started"), (int, float)) and abs(started - h["pid_started"]) > 1.0:
            return "its process no longer exists on this host (the pid now belongs to another process)"
    if takeover_submission and h.get("submission_id") == takeover_submission:
        return f"its Ray Job submission {takeover_submission} has ended (resubmitted by the controller)"
    if force:
        return "taken over with --force"
    return None


def _parse(raw: bytes | None) -> dict[str, Any] | None:
    """The record, ``{}`` for an unreadable one, None for no lease."""
    try:
        rec = json.loads(raw) if raw is not None else None
    except ValueError:
        return {}
    return rec if isinstance(rec, dict) or rec is None else {}


def read_lease(run_uri: str, s3cfg: "S3Config | None" = None) -> dict[str, Any] | None:
    """The lease record of the run at ``run_uri`` (``{}`` if unreadable), or None when free."""
    return _parse(_store(run_uri, s3cfg).read()[0])


# ---------------------------------------------------------------------------------------------
# The held lease


@dataclass
class Lease:
    run_uri: str
    s3cfg: "S3Config | None"
    holder: dict[str, Any]
    ttl_s: float
    acquired: float
    # 0 for a lease taken from nobody, one more than the previous holder's on every takeover:
    # orders the holders of a run in events.jsonl and in messages (fence.py compares holder ids).
    generation: int = 0
    taken_over: dict[str, Any] | None = None  # {"from": record, "reason": str} when it was taken
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)

    def _record(self, now: float) -> bytes:
        return json.dumps({"holder": self.holder, "generation": self.generation, "acquired": self.acquired,
                           "renewed": now, "ttl_s": self.ttl_s}, indent=2).encode()

    @property
    def holder_id(self) -> str:
        return self.holder["id"]

    def renew(self) -> None:
        """Push the expiry forward; ``LeaseLost`` when another process holds the lease now."""
        store = _store(self.run_uri, self.s3cfg)
        with store.locked():
            raw, token = store.read()
            rec = _parse(raw)
            if rec is None or (rec.get("holder") or {}).get("id") != self.holder["id"]:
                raise LeaseLost(f"the lease of run {self.run_uri} was taken over"
                                + (f" by {describe_holder(rec)}" if rec else " (the lease was deleted)"))
            if not store.write(self._record(time.time()), expect=token, create=False):
                raise LeaseLost(f"the lease of run {self.run_uri} was taken over while renewing it")

    def release(self) -> None:
        """Stop renewing and delete the lease if this process still holds it."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)
        store = _store(self.run_uri, self.s3cfg)
        try:
            with store.locked():
                rec = _parse(store.read()[0])
                if rec is not None and (rec.get("holder") or {}).get("id") == self.holder["id"]:
                    store.delete()
        except StorageError as e:
            # The lease then expires after ttl_s; nothing else to do on the way out.
            log.warning("raydiff: could not release the run lease (%s); it expires in %.0fs", e, self.ttl_s)

    def start_renewing(self, on_lost: Callable[[LeaseLost], None] | None = None) -> "Lease":
        """Renew every ``ttl_s / 4`` in a daemon thread. On loss, ``on_lost`` (default: one line on
        stderr and exit ``LEASE_LOST_EXIT`` at once, so that a run that is no longer the writer
        stops; its workers' writes are refused by the fence meanwhile: fence.py)."""
        on_lost = on_lost or _terminate_on_loss
        interval = self.ttl_s / 4

        def loop() -> None:
            while not self._stop.wait(interval):
                try:
                    self.renew()
                except LeaseLost as e:
                    on_lost(e)
                    return
                except StorageError as e:
                    # Storage trouble: keep trying; the lease expires only after ttl_s.
                    log.warning("raydiff: renewing the run lease failed (%s); retrying in %.0fs", e, interval)

        self._thread = threading.Thread(target=loop, name="raydiff-lease", daemon=True)
        self._thread.start()
        return self



def lease_lost_line(e: LeaseLost) -> str:
    return (f"raydiff: {e}; this process stopped writing the run and exits with status {LEASE_LOST_EXIT} "
            "(the run goes on in the process that took the lease)")


def _terminate_on_loss(e: LeaseLost) -> None:
    # Not SIGTERM: Ray's handlers turned that into an abort (exit 134) with a native stack dump.
    # os._exit from this thread skips the main thread's cleanup, which would write to the run (the
    # local Ray this driver started shares its fate and stops with it).
    try:
        sys.stderr.write(lease_lost_line(e) + "\n")
        sys.stderr.flush()
        sys.stdout.flush()
    finally:
        os._exit(LEASE_LOST_EXIT)


def acquire_lease(run: RunDir | str, s3cfg: "S3Config | None" = None, *, force: bool = False,
                  ttl_s: float | None = None, takeover_submission: str | None = None,
                  renew: bool = True) -> Lease:
    """Take the run directory's lease (rules in the module docstring) and, with ``renew``, keep
    it renewed until ``release()``. ``takeover_submission`` defaults to ``RAYDIFF_LEASE_TAKEOVER``.
    Raises ``LeaseHeld`` naming the holder when it is live."""
    run_uri, s3cfg = (run.uri, run.s3) if isinstance(run, RunDir) else (run, s3cfg)
    ttl = _ttl(ttl_s)
    takeover_submission = takeover_submission or os.environ.get(TAKEOVER_ENV) or None
    store = _store(run_uri, s3cfg)
    holder = this_holder()
    for _ in range(5):
        now = time.time()
        lease = Lease(run_uri, s3cfg, holder, ttl, acquired=now)
        with store.locked():
            raw, token = store.read()
            rec = _parse(raw)
            if rec is None:
                ok = store.write(lease._record(now), expect=None, create=True)
            else:
                reason = stale_reason(rec, now, force=force, takeover_submission=takeover_submission)
                if reason is None:
                    raise LeaseHeld(_held_message(run_uri, rec, now))
                lease.taken_over = {"from": rec, "reason": reason}
                prev_gen = rec.get("generation")
                lease.generation = prev_gen + 1 if isinstance(prev_gen, int) else 1
                ok = store.write(lease._record(now), expect=token, create=False)
            if not ok:
                continue  # another driver wrote first: look again at what is there now
            # Read back: settles retried conditional writes and stores without conditions.
            if (_parse(store.read()[0]) or {}).get("holder", {}).get("id") != holder["id"]:
                continue
        if lease.taken_over is not None:
            prev = lease.taken_over["from"]
            log.warning("raydiff: took over the lease of run %s from %s: %s", run_uri,
                        describe_holder(prev, now) if prev else "an unreadable record", lease.taken_over["reason"])
            RunDir(run_uri, s3cfg).event({"event": "lease_taken_over", "time": now, "holder": holder,
                                          "generation": lease.generation,
                                          "previous": prev.get("holder") if prev else None,
                                          "reason": lease.taken_over["reason"]})
        return lease.start_renewing() if renew else lease
    raise LeaseHeld(f"could not take the lease of run {run_uri}: other drivers kept writing it at the same time. "
                    "Fix: start one run per run.name")


def _held_message(run_uri: str, rec: dict[str, Any], now: float) -> str:
    left = max(0.0, rec["renewed"] + rec["ttl_s"] - now)
    sid = (rec.get("holder") or {}).get("submission_id")
    stop = f"`ray job stop {sid}` or `raydiff controller stop NAME`" if sid else "Ctrl-C in its terminal"
    return (f"run {run_uri} is being trained by another process: its lease is held by {describe_holder(rec, now)}. "
            f"Two writers would interleave checkpoints and metrics. Fix: wait for that run to end or stop it "
            f"({stop}), or choose another run.name; if that process is gone, its lease expires in {left:.0f}s, "
            "or pass --force to take it over now")
