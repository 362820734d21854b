"""``raydiff submit``: a job spec to a Ray cluster through the Ray Jobs SDK."""

from __future__ import annotations

import os

from orchestrator.config import ConfigError


def register(sub) -> None:
    p = sub.add_parser(
        "submit",
        help="submit a job spec to a Ray cluster (Ray Jobs), print its id and how to follow it",
        description="Validate the job spec here, upload the working directory and run "
        "`python -m orchestrator train --config SPEC [overrides]` on the cluster as a Ray Job. "
        "Resubmitting the same run.name resumes from its last checkpoint in run.storage. Token "
        "authentication: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token with RAY_AUTH_MODE=token.",
    )
    p.add_argument("spec", help="job spec inside the working directory, e.g. jobs/cifar-unet.yaml")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides, passed to the job")
    p.add_argument("--address", help="the head's dashboard, http://HEAD:8265 (default: $RAY_API_SERVER_ADDRESS or $RAY_ADDRESS)")
    p.add_argument("--working-dir", default=".", help="directory uploaded as the job's working directory (default: .)")
    p.add_argument("--submission-id", help="Ray Jobs submission id (default: raydiff-<run.name>-<UTC time>)")
    p.add_argument("--install-deps", action="store_true",
                   help="install raydiff's dependencies on the cluster as the job's pip runtime environment "
                        "(for clusters whose image lacks them; slow on first use per node)")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                   help="environment variable for the job (repeatable); never put credentials here")
    p.add_argument("--entrypoint-num-cpus", type=float, default=None,
                   help="CPUs reserved for the job's driver (default: none, so the head can stay CPU-free)")
    p.add_argument("--follow", action="store_true",
                   help="stream the job's logs until it ends; exit 0 only if it SUCCEEDED")
    p.set_defaults(func=cmd_submit)


def _env_vars(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise ConfigError(f"--env {pair!r} is not NAME=VALUE")
        out[name] = value
    return out


def cmd_submit(args) -> int:
    from orchestrator.cluster import submit as jobs

    address = args.address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if not address:
        raise ConfigError("no cluster address. Fix: --address http://HEAD:8265 (the head's dashboard port)")
    sub = jobs.build_submission(args.spec, args.overrides, working_dir=args.working_dir,
                                submission_id=args.submission_id, install_deps=args.install_deps,
                                env_vars=_env_vars(args.env))
    client = jobs.connect(address)
    sid = jobs.submit(client, sub, entrypoint_num_cpus=args.entrypoint_num_cpus)
    print(f"submitted {sid}: run {sub.run_name} -> {sub.run_uri}")
    print(f"  entrypoint  : {sub.entrypoint}")
    print(jobs.follow_hints(address.rstrip("/"), sid, token_used=jobs.auth_token() is not None), flush=True)
    if not args.follow:
        return 0
    status = jobs.follow(client, sid)
    print(f"job {sid} {status}")
    return 0 if status == "SUCCEEDED" else 1
