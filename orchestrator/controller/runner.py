"""The controller's watch loop: submit, poll, classify, resubmit.

Every ``poll_s`` seconds each active job (state.py) is moved one step:

- ``pending`` (or ``backoff`` whose time has come): submitted as ``<run.name>-<attempt>`` with
  the same spec, overrides and run name, so the run resumes from its latest good checkpoint. A
  resubmission names the previous submission in ``RAYDIFF_LEASE_TAKEOVER``: Ray reported it
  ended, so the new driver may take over its lease at once (orchestrator/storage/lease.py).
- ``submitting``: the controller stopped between recording a submission and hearing back from
  Ray; the id is looked up, adopted if Ray has it, submitted if not.
- ``submitted``: ``get_job_info``; SUCCEEDED ends the job, FAILED is classified (policy.py):
  the user's fault ends it as ``failed`` with the reason, infrastructure's schedules a retry
  with backoff until ``max_restarts`` is used up (``gave_up``). STOPPED by someone else ends it
  as ``stopped``. A job the cluster no longer knows is resubmitted (infrastructure).
- ``stopping`` (``raydiff controller stop``): ``stop_job`` until Ray reports it ended.

All of it lives in SQLite, so a controller killed at any point is replaced by running it again:
it adopts the recorded jobs (a job still RUNNING is watched, not resubmitted). An unreachable
head is not a job failure: the job keeps its state and the controller keeps asking.
"""

from __future__ import annotations

import random
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, TextIO

from orchestrator.cluster.submit import build_submission, connect, submit
from orchestrator.config import ConfigError
from orchestrator.controller.policy import Verdict, backoff_s, classify
from orchestrator.controller.state import Job, State

TAKEOVER_ENV = "RAYDIFF_LEASE_TAKEOVER"  # read by orchestrator/storage/lease.py in the new driver


class HeadUnreachable(Exception):
    """The cluster's Jobs API did not answer (or refused our credentials): try again later."""


def submission_id_for(name: str, attempt: int) -> str:
    return f"{name}-{attempt}"


def _is_missing(e: Exception) -> bool:
    return isinstance(e, RuntimeError) and ("404" in str(e) or "does not exist" in str(e))


class Controller:
    def __init__(self, state: State, *, poll_s: float = 5.0, backoff_base_s: float = 10.0,
                 backoff_cap_s: float = 600.0, entrypoint_num_cpus: float | None = None,
                 out: TextIO | None = None, rng: random.Random | None = None):
        self.state = state
        self.poll_s = poll_s
        self.backoff_base_s = backoff_base_s
        self.backoff_cap_s = backoff_cap_s
        self.entrypoint_num_cpus = entrypoint_num_cpus
        self.out = out or sys.stdout
        self.rng = rng or random.Random()
        self._clients: dict[str, Any] = {}
        # Tokens of heads this controller knows itself (its --local head), by dashboard address;
        # other clusters' tokens come from the environment (cluster/submit.py auth_token).
        self.tokens: dict[str, str] = {}
        self._unreachable: dict[str, str] = {}  # address -> the error last reported for it

    def log(self, msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=self.out, flush=True)

    # -- the cluster ------------------------------------------------------------------------------
    def client(self, address: str):
        client = self._clients.get(address)
        if client is None:
            try:
                client = self._clients[address] = connect(address, self.tokens.get(address))
            except ConfigError as e:
                raise HeadUnreachable(str(e)) from None
        return client

    def _call(self, address: str, fn: str | Callable[[Any], Any], *args: Any, **kwargs: Any) -> Any:
        """``client.fn(...)`` (or ``fn(client)``); connection trouble becomes ``HeadUnreachable``
        (and forgets the client, which a restarted head would not accept)."""
        import requests
        from ray.exceptions import AuthenticationError

        client = self.client(address)
        try:
            result = fn(client) if callable(fn) else getattr(client, fn)(*args, **kwargs)
        except (requests.exceptions.ConnectionError, requests.exceptions.Timeout, AuthenticationError) as e:
            self._clients.pop(address, None)
            raise HeadUnreachable(f"{type(e).__name__}: {e}") from None
        if address in self._unreachable:
            self.log(f"{address} answers again")
            del self._unreachable[address]
        return result

    # -- registering ----------------------------------------------------------------------------
    def register(self, spec: str, overrides: list[str], *, address: str, working_dir: str = ".",
                 max_restarts: int = 3, env: dict[str, str] | None = None, rerun: bool = False) -> Job:
        """Validate the spec here and add it as a job. A job of the same run that is still active
        is adopted as it is; one that has ended stays ended (running the same command again
        after a controller was killed picks up where it was) unless ``rerun``, which starts it
        over. An invalid spec is recorded as ``failed`` with the error, never submitted."""
        env = dict(env or {})
        try:
            sub = build_submission(spec, overrides, working_dir=working_dir, submission_id="(validation)",
                                   env_vars=env)
        except ConfigError as e:
            name = Path(spec).stem
            self.log(f"{name}: not submitted, the job spec is invalid (not retried): {e}")
            existing = self.state.get(name)
            if existing is not None and (existing.active or not rerun):
                return existing
            return self.state.register(name, spec=spec, overrides=list(overrides), working_dir=working_dir,
                                       address=address, env=env, run_uri=None, max_restarts=max_restarts,
                                       status="failed", reason=f"invalid job spec: {e}")
        existing = self.state.get(sub.run_name)
        if existing is not None and existing.active:
            same = (existing.spec, existing.overrides, existing.address) == (spec, list(overrides), address)
            self.log(f"{sub.run_name}: already {existing.status} (submission {existing.submission_id}); adopted"
                     + ("" if same else " as recorded: the given spec, overrides or address differ and are ignored "
                        "until it ends"))
            return existing
        if existing is not None and not rerun:
            self.log(f"{sub.run_name}: {existing.status} earlier ({' '.join((existing.reason or '').split())}); not "
                     "submitted again. Fix: --rerun starts it over")
            return existing
        job = self.state.register(sub.run_name, spec=spec, overrides=list(overrides), working_dir=working_dir,
                                  address=address, env=env, run_uri=sub.run_uri, max_restarts=max_restarts)
        self.log(f"{job.name}: registered ({spec} {' '.join(overrides)}".rstrip() + f" -> {job.run_uri})")
        return job

    # -- the loop -------------------------------------------------------------------------------
    def run(self, stop: threading.Event | None = None, *, names: set[str] | None = None) -> list[Job]:
        """Watch the active jobs (those in ``names``, or all) until none is active or ``stop`` is
        set; returns those jobs as they are then."""
        stop = stop or threading.Event()
        watched = [j for j in self.state.jobs(active=True) if names is None or j.name in names]
        for job in watched:
            if job.submission_id and job.status in ("submitted", "submitting", "stopping"):
                self.log(f"{job.name}: watching {job.status} submission {job.submission_id} "
                         f"(attempt {job.attempts}, {job.restarts}/{job.max_restarts} restarts used)")
        while not stop.is_set():
            active = [j for j in self.state.jobs(active=True) if names is None or j.name in names]
            if not active:
                break
            for job in active:
                if stop.is_set():
                    break
                try:
                    self.step(job)
                except HeadUnreachable as e:
                    if self._unreachable.get(job.address) != str(e):
                        self._unreachable[job.address] = str(e)
                        self.log(f"{job.address} does not answer ({e}); jobs there keep their state, retrying "
                                 f"every {self.poll_s:g}s")
                except RuntimeError as e:
                    # An error answer from the Jobs API (a head under load or restarting): the
                    # job keeps its state and is asked about again next round.
                    self.log(f"{job.name}: the cluster answered with an error ({' '.join(str(e).split())[:300]}); "
                             "retrying")
            stop.wait(self.poll_s)
        return [j for j in self.state.jobs() if names is None or j.name in names]

    def step(self, job: Job) -> Job:
        now = time.time()
        if job.status == "pending" or (job.status == "backoff" and (job.next_retry_at or 0) <= now):
            return self._submit(job)
        if job.status == "submitting":
            return self._resume_submitting(job)
        if job.status in ("submitted", "stopping"):
            return self._watch(job)
        return job

    # -- submitting -----------------------------------------------------------------------------
    def _free_attempt(self, job: Job) -> int:
        """The next attempt number whose submission id the cluster does not know yet (ids are
        unique per cluster, and a replaced database may have used some already)."""
        attempt = job.attempts + 1
        for _ in range(1000):
            try:
                self._call(job.address, "get_job_info", submission_id_for(job.name, attempt))
            except RuntimeError as e:
                if _is_missing(e):
                    return attempt
                raise
            attempt += 1
        raise HeadUnreachable(f"1000 submission ids {job.name}-N after {job.attempts} are taken on {job.address}")

    def _submit(self, job: Job) -> Job:
        attempt = self._free_attempt(job)
        sid = submission_id_for(job.name, attempt)
        restarts = job.restarts + (1 if job.status == "backoff" else 0)
        began = self.state.begin_attempt(job.name, sid, attempt, expect_status=job.status, status="submitting",
                                         restarts=restarts, next_retry_at=None)
        if began is None:
            return self.state.get(job.name)  # stopped meanwhile: the next round handles it
        return self._send(began)

    def _send(self, job: Job) -> Job:
        """Submit the job's recorded submission id (status ``submitting``)."""
        sid = job.submission_id
        env = dict(job.env)
        previous = self._previous_submission(job)
        if previous:
            env[TAKEOVER_ENV] = previous
        try:
            sub = build_submission(job.spec, job.overrides, working_dir=job.working_dir, submission_id=sid,
                                   env_vars=env)
        except ConfigError as e:
            # The spec was edited or moved since it was registered.
            reason = f"invalid job spec: {e}"
            self.state.update_attempt(sid, ended_at=time.time(), kind="user", reason=reason)
            self.log(f"{job.name}: not submitted, the job spec is now invalid (not retried): {e}")
            return self._set(job, status="failed", reason=reason)
        try:
            # submit() waits out a head whose job agent has not registered yet (just started).
            self._call(job.address, lambda client: submit(client, sub, entrypoint_num_cpus=self.entrypoint_num_cpus))
        except (RuntimeError, ValueError) as e:
            if "already exists" in str(e):  # our earlier request went through after all
                return self._resume_submitting(job)
            # Refused (runtime env upload, a head shutting down): an attempt that failed to start.
            return self._failed(job, None, Verdict("infra", f"the cluster refused the submission: {' '.join(str(e).split())[:300]}"))
        after = f" (restart {job.restarts}/{job.max_restarts} after: {job.reason})" if previous and job.restarts else ""
        self.log(f"{job.name}: submitted {sid}{after}")
        return self.state.update(job.name, expect_status="submitting", status="submitted") or self.state.get(job.name)

    def _resume_submitting(self, job: Job) -> Job:
        try:
            self._call(job.address, "get_job_info", job.submission_id)
        except RuntimeError as e:
            if not _is_missing(e):
                raise
            self.log(f"{job.name}: submission {job.submission_id} was recorded but not made; submitting it")
            return self._send(job)
        self.log(f"{job.name}: found submission {job.submission_id} on the cluster; watching it")
        return self.state.update(job.name, expect_status="submitting", status="submitted") or self.state.get(job.name)

    def _previous_submission(self, job: Job) -> str | None:
        ids = [a.submission_id for a in self.state.attempts(job.name) if a.submission_id != job.submission_id]
        return ids[-1] if ids else None

    # -- watching -------------------------------------------------------------------------------
    def _watch(self, job: Job) -> Job:
        sid = job.submission_id
        try:
            info = self._call(job.address, "get_job_info", sid)
        except RuntimeError as e:
            if not _is_missing(e):
                raise
            if job.status == "stopping":
                return self._ended(job, "STOPPED", None, None, "stopped by raydiff controller stop")
            return self._failed(job, None, Verdict("infra", f"the cluster at {job.address} no longer knows submission "
                                                            f"{sid} (a restarted head?)"))
        status = str(getattr(info.status, "value", info.status))
        if status in ("PENDING", "RUNNING"):
            if status == "RUNNING":
                att = next((a for a in self.state.attempts(job.name) if a.submission_id == sid), None)
                if att is not None and att.running_at is None:
                    self.state.update_attempt(sid, running_at=time.time(), ray_status=status)
                    self.log(f"{job.name}: {sid} is running")
            if job.status == "stopping":
                self._call(job.address, "stop_job", sid)
            return job
        code = getattr(info, "driver_exit_code", None)
        if status == "SUCCEEDED":
            return self._ended(job, status, code, None, "succeeded", final="succeeded")
        if job.status == "stopping":
            return self._ended(job, status, code, None, "stopped by raydiff controller stop")
        if status == "STOPPED":
            return self._ended(job, status, code, None, "stopped outside the controller (ray job stop); not restarted")
        logs = ""
        if not (info.message or "").strip():
            try:
                logs = (self._call(job.address, "get_job_logs", sid) or "")[-20000:]
            except RuntimeError:
                logs = ""
        return self._failed(job, code, classify(info, logs))

    def _ended(self, job: Job, ray_status: str, code: int | None, kind: str | None, reason: str,
               final: str = "stopped") -> Job:
        self.state.update_attempt(job.submission_id, ended_at=time.time(), ray_status=ray_status, exit_code=code,
                                  kind=kind, reason=reason)
        self.log(f"{job.name}: {job.submission_id} {ray_status}; job {final}" + ("" if final == "succeeded" else f": {reason}"))
        return self.state.update(job.name, expect_status=job.status, status=final, reason=reason) or self.state.get(job.name)

    def _failed(self, job: Job, code: int | None, verdict: Verdict) -> Job:
        self.state.update_attempt(job.submission_id, ended_at=time.time(), ray_status="FAILED", exit_code=code,
                                  kind=verdict.kind, reason=verdict.reason)
        if not verdict.retry:
            self.log(f"{job.name}: {job.submission_id} failed, the user's to fix (not retried): {verdict.reason}")
            return self._set(job, status="failed", reason=verdict.reason)
        if job.restarts >= job.max_restarts:
            self.log(f"{job.name}: {job.submission_id} failed ({verdict.reason}); {job.max_restarts} restarts used, "
                     "giving up")
            return self._set(job, status="gave_up", reason=f"{verdict.reason} (after {job.restarts} restarts)")
        wait = backoff_s(job.restarts + 1, base_s=self.backoff_base_s, cap_s=self.backoff_cap_s, rng=self.rng)
        self.log(f"{job.name}: {job.submission_id} failed ({verdict.reason}); resubmitting in {wait:.1f}s "
                 f"(restart {job.restarts + 1}/{job.max_restarts})")
        return self._set(job, status="backoff", reason=verdict.reason, next_retry_at=time.time() + wait)

    def _set(self, job: Job, **fields: Any) -> Job:
        """Move ``job`` on from the status it was read in; if ``controller stop`` changed that
        status meanwhile, leave it to the next round."""
        return self.state.update(job.name, expect_status=job.status, **fields) or self.state.get(job.name)


def request_stop(state: State, name: str, controller: Controller, *, wait_s: float = 60.0) -> Job:
    """``raydiff controller stop NAME``: mark the job stopping, stop its Ray Job if one may run,
    and wait until Ray reports it ended. A running controller does the same on its next round;
    this works without one."""
    job = state.get(name)
    if job is None:
        names = ", ".join(j.name for j in state.jobs()) or "none"
        raise ConfigError(f"no job named {name!r} in {state.path} (jobs: {names})")
    if not job.active:
        return job
    job = state.request_stop(name)
    if not job.active:
        return job  # ended meanwhile
    current = next((a for a in state.attempts(name) if a.submission_id == job.submission_id), None)
    if current is None or current.ended_at is not None:
        # Waiting for its first submission or out a backoff: nothing runs on the cluster.
        return state.update(name, expect_status="stopping", status="stopped",
                            reason="stopped by raydiff controller stop") or state.get(name)
    deadline = time.monotonic() + wait_s
    while job.active and time.monotonic() < deadline:
        job = controller.step(job)
        if job.active:
            time.sleep(1.0)
            job = state.get(name)
    return job
