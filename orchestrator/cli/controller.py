"""``raydiff controller run|status|stop``: keep job specs running on a Ray cluster through driver
failures (orchestrator/controller/)."""

from __future__ import annotations

import os
import re
import signal
import sys
import threading
import time

from orchestrator.cli.submit import _env_vars
from orchestrator.config import ConfigError

_OVERRIDE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+=")


def register(sub) -> None:
    p = sub.add_parser("controller", help="submit job specs to Ray, watch them, resubmit failed ones (resuming)")
    csub = p.add_subparsers(dest="controller_command", required=True, metavar="ACTION")

    r = csub.add_parser(
        "run",
        help="submit job specs and keep them running until they succeed",
        description="Submit each job spec as a Ray Job and watch it. A job whose driver fails or is lost is "
        "resubmitted under the same run.name (new submission id <run.name>-<attempt>), so it resumes from its "
        "latest good checkpoint, with exponential backoff and at most --max-restarts restarts. Failures that are "
        "the user's (invalid config, import error, missing data: exit code 2) are not retried; the reason is "
        "shown by `raydiff controller status`. State lives in --db: a killed controller is replaced by running "
        "it again (with or without the specs), and it picks up the jobs where they are.",
    )
    r.add_argument("items", nargs="*", metavar="SPEC|key.sub=value",
                   help="job specs (jobs/*.yaml) and config overrides applied to every spec")
    where = r.add_mutually_exclusive_group()
    where.add_argument("--address", help="the head's dashboard, http://HEAD:8265 (default: $RAY_API_SERVER_ADDRESS "
                                         "or $RAY_ADDRESS)")
    where.add_argument("--local", action="store_true",
                       help="start a Ray head on this machine, owned by the controller and stopped when it ends")
    r.add_argument("--num-cpus", type=float, default=float(os.cpu_count() or 2),
                   help="logical CPUs of the --local head (default: this machine's)")
    _db_arg(r)
    r.add_argument("--working-dir", default=".", help="directory uploaded with each job (default: .)")
    r.add_argument("--max-restarts", type=int, default=3, help="resubmissions after infrastructure failures (default 3)")
    r.add_argument("--poll-s", type=float, default=5.0, help="seconds between status polls (default 5)")
    r.add_argument("--backoff-s", type=float, default=10.0,
                   help="wait before the first restart, doubled for each further one, jittered (default 10)")
    r.add_argument("--backoff-cap-s", type=float, default=600.0, help="longest wait between restarts (default 600)")
    r.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                   help="environment variable for the jobs (repeatable); never put credentials here")
    r.add_argument("--rerun", action="store_true",
                   help="start the given specs' jobs over if they have ended (by default an ended job stays ended, so "
                        "that running the same command after a controller was killed only picks up where it was)")
    r.add_argument("--entrypoint-num-cpus", type=float, default=None,
                   help="CPUs reserved for each job's driver (default: none)")
    r.set_defaults(func=cmd_run)

    s = csub.add_parser("status", help="the controller's jobs, their attempts and why each ended")
    _db_arg(s)
    s.add_argument("--attempts", action="store_true", help="list every attempt under its job")
    s.set_defaults(func=cmd_status)

    t = csub.add_parser("stop", help="stop a job (its Ray Job too) so that it is not resubmitted")
    t.add_argument("name", help="the job's name (its run.name)")
    _db_arg(t)
    t.add_argument("--wait-s", type=float, default=60.0, help="how long to wait for Ray to stop it (default 60)")
    t.set_defaults(func=cmd_stop)


def _db_arg(p) -> None:
    p.add_argument("--db", default=None,
                   help="the controller's SQLite state (default: $RAYDIFF_CONTROLLER_DB or ~/.raydiff/controller.db)")


def _state(args):
    from orchestrator.controller.state import State, default_db_path

    return State(args.db or os.environ.get("RAYDIFF_CONTROLLER_DB") or default_db_path())


def _split_items(items: list[str]) -> tuple[list[str], list[str]]:
    specs = [i for i in items if not _OVERRIDE.match(i)]
    overrides = [i for i in items if _OVERRIDE.match(i)]
    return specs, overrides


def cmd_run(args) -> int:
    from orchestrator.controller import head as local_head
    from orchestrator.controller.runner import Controller

    specs, overrides = _split_items(args.items)
    if overrides and not specs:
        raise ConfigError(f"overrides {' '.join(overrides)} given without a job spec. Fix: name the spec(s) they "
                          "apply to, e.g. `raydiff controller run --address URL jobs/demo.yaml optim.steps=100`")
    if args.max_restarts < 0:
        raise ConfigError(f"--max-restarts={args.max_restarts} must be 0 or more")
    env = _env_vars(args.env)
    address = args.address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if specs and not (address or args.local):
        raise ConfigError("no cluster address. Fix: --address http://HEAD:8265 (the head's dashboard port), "
                          "or --local to start a Ray head here")
    if args.local:
        # Before a head is started (tens of seconds): a spec that cannot run is an error now.
        from orchestrator.cluster.submit import build_submission

        for spec in specs:
            build_submission(spec, overrides, working_dir=args.working_dir, submission_id="(validation)",
                             env_vars=env)
    state = _state(args)
    lock = state.lock_controller()
    stop = threading.Event()
    controller = Controller(state, poll_s=args.poll_s, backoff_base_s=args.backoff_s, backoff_cap_s=args.backoff_cap_s,
                            entrypoint_num_cpus=args.entrypoint_num_cpus)

    received: list[int] = []

    def _on_signal(signum, _frame) -> None:
        # Only set a flag: printing here could re-enter a print the main thread is in. A second
        # signal interrupts whatever the controller waits on (a Jobs API call that hangs).
        received.append(signum)
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    previous = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    head = None
    try:
        if args.local:
            head = local_head.start_or_adopt(state, num_cpus=args.num_cpus, log=controller.log)
            address = head.dashboard_url
            if head.token is not None:
                controller.tokens[address] = head.token
        names = {controller.register(spec, overrides, address=address, working_dir=args.working_dir,
                                     max_restarts=args.max_restarts, env=env, rerun=args.rerun).name
                 for spec in specs}
        names |= {j.name for j in state.jobs(active=True)}
        if not state.jobs(active=True):
            controller.log("no active jobs to watch")
        jobs = [j for j in controller.run(stop) if j.name in names]
        if received:
            controller.log(f"{signal.Signals(received[0]).name}: stopping the controller"
                           + (" and its local head (its jobs stop with it)" if head else " (jobs keep running on the cluster)"))
    finally:
        if head is not None:
            local_head.stop(head, controller.log)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        lock.close()
    active = [j for j in jobs if j.active]
    if active:
        controller.log(f"controller stopped with {len(active)} active job(s): {', '.join(j.name for j in active)}. "
                       "Run `raydiff controller run` again to keep watching them"
                       + (" (with --local they were stopped with the head and will be resubmitted)" if head else ""))
        return 130
    if jobs:
        print(_table(jobs), flush=True)
    return 0 if all(j.status == "succeeded" for j in jobs) else 1


def _ago(t: float | None) -> str:
    if t is None:
        return "-"
    s = max(0.0, time.time() - t)
    return f"{s:.0f}s ago" if s < 120 else (f"{s / 60:.0f}m ago" if s < 7200 else f"{s / 3600:.1f}h ago")


def _training_again(job, attempts: list) -> dict[str, float]:
    """Seconds from each attempt's submission to the run's next first step (the run's
    events.jsonl), for the attempts that trained; {} where the run directory is unreadable here."""
    from orchestrator.storage import StorageError
    from orchestrator.storage.jsonl import read_records
    from orchestrator.storage.rundir import EVENTS_LOG
    from orchestrator.train.startup import first_step_after

    if not job.run_uri:
        return {}
    try:
        events = read_records(job.run_uri, EVENTS_LOG)
    except (StorageError, OSError):
        return {}
    out = {}
    ordered = sorted((a for a in attempts if a.submitted_at), key=lambda a: a.submitted_at)
    for a, nxt in zip(ordered, [*ordered[1:], None]):
        at = first_step_after(events, a.submitted_at, nxt.submitted_at if nxt else None)
        if at is not None:
            out[a.submission_id] = at - a.submitted_at
    return out


def _table(jobs, attempts: dict | None = None) -> str:
    rows = [("NAME", "STATUS", "ATTEMPTS", "RESTARTS", "SUBMISSION", "UPDATED", "REASON")]
    for j in jobs:
        reason = j.reason or ""
        if j.status == "backoff" and j.next_retry_at:
            reason = f"retry in {max(0.0, j.next_retry_at - time.time()):.0f}s: {reason}"
        rows.append((j.name, j.status, str(j.attempts), f"{j.restarts}/{j.max_restarts}", j.submission_id or "-",
                     _ago(j.updated_at), " ".join(reason.split())))
    widths = [max(len(r[i]) for r in rows) for i in range(6)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:6], widths)) + "  " + r[6] for r in rows]
    if attempts:
        out = [lines[0]]
        for j, line in zip(jobs, lines[1:]):
            out.append(line)
            trained = _training_again(j, attempts.get(j.name, []))
            for a in attempts.get(j.name, []):
                took = f"{a.ended_at - a.submitted_at:.0f}s" if a.ended_at and a.submitted_at else "running"
                # Submission to training again: for a resubmission, what a crash cost.
                again = f", training {trained[a.submission_id]:.0f}s after submission" if a.submission_id in trained else ""
                out.append(f"    {a.submission_id}: {a.ray_status or 'submitted'} {took}{again}"
                           + (f", exit {a.exit_code}" if a.exit_code is not None else "")
                           + (f", {a.kind}" if a.kind else "") + (f": {' '.join(a.reason.split())}" if a.reason else ""))
        lines = out
    return "\n".join(line.rstrip() for line in lines)


def cmd_status(args) -> int:
    state = _state(args)
    jobs = state.jobs()
    if not jobs:
        print(f"no jobs in {state.path}")
        return 0
    attempts = {j.name: state.attempts(j.name) for j in jobs} if args.attempts else None
    print(_table(jobs, attempts))
    return 0


def cmd_stop(args) -> int:
    from orchestrator.controller.runner import Controller, HeadUnreachable, request_stop

    state = _state(args)
    controller = Controller(state, out=sys.stdout)
    try:
        job = request_stop(state, args.name, controller, wait_s=args.wait_s)
    except HeadUnreachable as e:
        print(f"{args.name}: marked stopping, but its cluster does not answer ({e}); a running controller stops it "
              "when it does")
        return 1
    print(_table([job]))
    return 0 if job.status in ("stopped", "succeeded", "failed", "gave_up") else 1
