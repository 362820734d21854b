"""Submit a job spec to a Ray cluster with the Ray Jobs SDK (what ``raydiff submit`` does).

The job is ``python -m orchestrator train --config SPEC [overrides]`` run on the head with the
working directory uploaded (Ray honours ``.gitignore`` and ``.rayignore`` there; the excludes
below keep environments, run directories and GPU bundles out even without them). The cluster
needs raydiff's dependencies: a cluster image (or ``setup_commands``) that has them, or
``install_deps=True``, which lists them as the job's ``pip`` runtime environment (installed
once per node and cached by Ray).

Token authentication (Ray >= 2.52): Ray's own clients send a token only with
``RAY_AUTH_MODE=token``; raydiff sends one whenever it is given: ``RAY_AUTH_TOKEN``, else the
file named by ``RAY_AUTH_TOKEN_PATH``, else ``~/.ray/auth_token`` when ``RAY_AUTH_MODE=token``.
"""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import sys
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping, TextIO

from orchestrator.config import ConfigError, load_config

# Never uploaded: environments, caches, run directories, GPU bundles, build outputs. Ray's
# packaging also skips .git, .venv, venv and __pycache__ by default.
UPLOAD_EXCLUDES = [
    ".git", ".venv", "venv", "__pycache__", "*.pyc", "*.egg-info", ".pytest_cache",
    "runs/", ".gpu/", "/build/", "/dist/", "*.pt", "*.ckpt", "*.safetensors",
]
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


@dataclass
class Submission:
    spec: str  # the job spec's path inside the working directory
    entrypoint: str
    runtime_env: dict[str, Any]
    submission_id: str
    run_name: str
    run_uri: str
    metadata: dict[str, str] = field(default_factory=dict)


def _spec_in_working_dir(spec: str, working_dir: str) -> str:
    spec_p, wd = Path(spec).resolve(), Path(working_dir).resolve()
    if not spec_p.is_file():
        raise ConfigError(f"job spec {spec!r} does not exist (see jobs/*.yaml)")
    if not wd.is_dir():
        raise ConfigError(f"--working-dir {working_dir!r} is not a directory")
    try:
        return spec_p.relative_to(wd).as_posix()
    except ValueError:
        raise ConfigError(
            f"job spec {spec!r} is outside the working directory {str(wd)!r}, which is all the cluster "
            "receives. Fix: copy it under the working directory (e.g. jobs/) or pass --working-dir"
        ) from None


def project_requirements() -> list[str]:
    """raydiff's dependencies (from the installed package's metadata) for a ``pip`` runtime env.
    Ray itself is left out: the cluster's Ray must not be replaced by a job."""
    try:
        reqs = metadata.requires("raydiff") or []
    except metadata.PackageNotFoundError:
        raise ConfigError("--install-deps reads raydiff's dependencies from its installed metadata, and "
                          "raydiff is not installed here. Fix: `pip install -e .` (or use a cluster image)") from None
    out = []
    for r in reqs:
        if ";" in r and "extra" in r.split(";", 1)[1]:
            continue  # an optional extra (dev, serve-s3)
        name = re.split(r"[\s\[<>=!~;]", r, maxsplit=1)[0].lower()
        if name != "ray":
            out.append(r)
    return out


def default_submission_id(run_name: str) -> str:
    # Ray keeps submission ids unique per cluster; the run name keeps resubmits findable.
    return f"raydiff-{run_name}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"


def build_submission(spec: str, overrides: list[str] | tuple[str, ...] = (), *, working_dir: str = ".",
                     submission_id: str | None = None, install_deps: bool = False,
                     env_vars: dict[str, str] | None = None) -> Submission:
    """Validate the spec with its overrides here (a bad key fails before anything is uploaded)
    and describe the job to submit."""
    cfg = load_config(spec, overrides)
    rel = _spec_in_working_dir(spec, working_dir)
    from orchestrator.storage import join

    entrypoint = shlex.join(["python", "-m", "orchestrator", "train", "--config", rel, *overrides])
    runtime_env: dict[str, Any] = {"working_dir": str(Path(working_dir).resolve()), "excludes": list(UPLOAD_EXCLUDES)}
    if install_deps:
        runtime_env["pip"] = project_requirements()
    if env_vars:
        runtime_env["env_vars"] = dict(env_vars)
    return Submission(
        spec=rel,
        entrypoint=entrypoint,
        runtime_env=runtime_env,
        submission_id=submission_id or default_submission_id(cfg.run.name),
        run_name=cfg.run.name,
        run_uri=join(cfg.run.storage, cfg.run.name),
        metadata={"raydiff_run": cfg.run.name, "raydiff_spec": rel},
    )


# ---------------------------------------------------------------------------------------------
# Talking to the cluster


def auth_token(env: "Mapping[str, str] | None" = None) -> str | None:
    """The token to send, by Ray's precedence (see the module docstring), or None; ``env``: the
    environment to read (default: this process's)."""
    env = os.environ if env is None else env
    if env.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return None
    if env.get("RAY_AUTH_TOKEN", "").strip():
        return env["RAY_AUTH_TOKEN"].strip()
    path = env.get("RAY_AUTH_TOKEN_PATH")
    if path:
        try:
            token = Path(path).expanduser().read_text().strip()
        except OSError as e:
            raise ConfigError(f"RAY_AUTH_TOKEN_PATH={path!r} cannot be read ({e.strerror}). Fix: point it at the "
                              "cluster's token file, or unset it") from None
        if not token:
            raise ConfigError(f"RAY_AUTH_TOKEN_PATH={path!r} is empty. Fix: put the cluster's token in it")
        return token
    if env.get("RAY_AUTH_MODE", "").lower() == "token":
        default = Path.home() / ".ray" / "auth_token"
        if default.is_file() and default.read_text().strip():
            return default.read_text().strip()
    return None


_TOKEN_FIX = ("Fix: export RAY_AUTH_TOKEN=<the cluster's token> (on the head: `ray get-auth-token`; KubeRay: the "
              "Secret named in cluster/kuberay-raycluster.yaml), or RAY_AUTH_TOKEN_PATH=<file with it>")


def connect(address: str | None, token: str | None = None):
    """A ``JobSubmissionClient`` for ``address`` (None: ``RAY_ADDRESS``/``RAY_API_SERVER_ADDRESS``),
    sending ``token``, else the one the environment names (``auth_token``) when there is one. Connection and authentication failures become one-line
    ``ConfigError`` messages with the fix."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    token = token or auth_token()
    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        return JobSubmissionClient(address, headers=headers)
    except AuthenticationError:
        if token:
            raise ConfigError(f"the Ray cluster at {address} rejected the token sent (wrong token for this "
                              f"cluster). {_TOKEN_FIX}") from None
        raise ConfigError(f"the Ray cluster at {address} requires token authentication and no token was "
                          f"given. {_TOKEN_FIX}") from None
    except ConnectionError as e:
        raise ConfigError(f"{e} Fix: check --address (http://HEAD:8265, the head's dashboard port; forward it "
                          "with `ray dashboard CLUSTER.yaml` or `kubectl port-forward svc/HEAD-svc 8265:8265`)") from None


def submit_job(client, *, wait_for_agent_s: float = 60.0, **kwargs: Any) -> str:
    """``client.submit_job(**kwargs)``, retried while the head's job agent has not registered yet
    (Ray answers HTTP 500 "No available agent to submit job" for a few seconds after a head
    starts, e.g. right after `ray up`)."""
    deadline = time.monotonic() + wait_for_agent_s
    while True:
        try:
            return client.submit_job(**kwargs)
        except RuntimeError as e:
            if "No available agent" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(2)


def submit(client, sub: Submission, *, entrypoint_num_cpus: float | None = None) -> str:
    return submit_job(
        client,
        entrypoint=sub.entrypoint,
        runtime_env=sub.runtime_env,
        submission_id=sub.submission_id,
        metadata=sub.metadata,
        entrypoint_num_cpus=entrypoint_num_cpus,
    )


def follow(client, submission_id: str, out: TextIO = sys.stdout, poll_s: float = 2.0) -> str:
    """Stream the job's logs until it ends; returns its final status name."""

    async def _tail() -> None:
        async for lines in client.tail_job_logs(submission_id):
            out.write(lines)
            out.flush()

    try:
        asyncio.run(_tail())
    except Exception as e:  # noqa: BLE001 - the log stream is a convenience; the status below decides
        out.write(f"raydiff: log stream ended early ({type(e).__name__}: {e}); polling the job status\n")
    while True:
        status = str(client.get_job_status(submission_id).value)
        if status in TERMINAL:
            return status
        time.sleep(poll_s)


def follow_hints(address: str, submission_id: str, token_used: bool) -> str:
    env = "RAY_AUTH_MODE=token " if token_used else ""
    return "\n".join([
        f"  follow logs : {env}ray job logs --address {address} --follow {submission_id}",
        f"  status      : {env}ray job status --address {address} {submission_id}",
        f"  stop        : {env}ray job stop --address {address} {submission_id}",
        f"  dashboard   : {address}/#/jobs/{submission_id}",
    ])
