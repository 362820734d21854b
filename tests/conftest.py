"""Shared fixtures: one local Ray per test session, one local S3 (moto) per test session.

Both are session-scoped because starting them costs seconds on the 2-core test machine.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from s3_server import DUMMY_ACCESS_KEY, DUMMY_SECRET_KEY, REGION, FaultProxy, MotoS3  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """In a test process of `make test` (pytest-xdist, whole files handed out one at a time to
    whichever process is free, `--dist loadfile --no-loadscope-reorder`): the files with
    end-to-end tests first, the short ones after, so that the last minutes are short tests filling
    both processes, not a Tune sweep file alone (in file order it comes last). Tests pass in any
    order; a run in one process keeps the file order."""
    if not hasattr(config, "workerinput"):  # not an xdist worker
        return
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    # Stable: file order within each group.
    items.sort(key=lambda item: 0 if item.path.name in LONGEST_FILES else 1 if item.path in slow_files else 2)


# The longest file, started first: its two sweeps took 5.8 min of a 19-min `make test` (2 cores,
# 2026-12-07), started last of the end-to-end files (file order) and ended last of them. Only the
# order changes.
LONGEST_FILES = ("test_tune_e2e.py",)


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray with 4 logical CPUs (over-committed on purpose: 2 cores, but Ray Data and
    training workers both need CPU slots). Token auth is disabled: loopback-only tests."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # Workers would otherwise try EC2 metadata for S3 region/credentials and stall.
    os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
    # Workers inherit the environment at start: give them the same dummy keys the s3_server
    # fixture uses, whichever fixture starts first.
    os.environ.setdefault("AWS_ACCESS_KEY_ID", DUMMY_ACCESS_KEY)
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", DUMMY_SECRET_KEY)
    os.environ.setdefault("AWS_DEFAULT_REGION", REGION)
    from orchestrator.logs import configure
    from orchestrator.plan import local_gpus
    from orchestrator.ray_session import LOCAL_RAY_TRAIN_ENV, start_local_ray, use_ray_train_settings
    from orchestrator.train.launch import worker_env_vars

    # The CLI's set-up, which the tests' in-process commands apply at their start: Ray's processes
    # inherit the variables it sets (Ray Train's print patch off among them) whichever test starts
    # this Ray first.
    configure(verbose=False)
    use_ray_train_settings(LOCAL_RAY_TRAIN_ENV)  # what raydiff's own local Ray uses
    import ray

    started_here = not ray.is_initialized()
    if started_here:
        # Workers import the project from the repo root: through the environment Ray's processes
        # inherit at start, not a job runtime_env. With one, Ray matches worker processes by
        # runtime env, so every task and actor of every test waits for a new process (a setup hop
        # and Ray's import, 1-1.5 CPU-s each here) while the idle workers Ray prestarts sit
        # unused; raydiff's own local Ray has none either (ray_session.py).
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("PYTHONPATH", str(ROOT), prepend=os.pathsep)
            # With the training workers' variables, as raydiff's own local Ray (ray_session.init_ray),
            # so that Ray Train's controller and workers need no runtime env (train/session_env.py).
            start_local_ray(worker_env_vars(local_gpus(), verbose=False), num_cpus=4, include_dashboard=False,
                            log_to_driver=False, configure_logging=False)
        from ray.data import DataContext

        DataContext.get_current().enable_progress_bars = False
    yield ray
    if started_here:
        ray.shutdown()


@dataclass
class S3Server:
    endpoint_url: str
    region: str
    access_key: str
    secret_key: str
    moto: MotoS3
    create_bucket: Callable[[str], str]

    def client(self, endpoint_url: str | None = None):
        return self.moto.client(endpoint_url)

    def s3_config(self, **overrides):
        """An ``S3Config`` pointing at this server (credentials from the environment)."""
        from orchestrator.config import S3Config

        kw = {"endpoint_url": self.endpoint_url, "region": self.region}
        kw.update(overrides)
        return S3Config(**kw)


@pytest.fixture(scope="session")
def s3_server():
    """moto S3 on 127.0.0.1 with dummy AWS credentials in the environment.

    ``s3_server.endpoint_url``, ``s3_server.create_bucket(name)``, ``s3_server.client()``,
    ``s3_server.s3_config()``. Buckets persist for the session: use unique names per test.
    """
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_EC2_METADATA_DISABLED")}
    os.environ["AWS_ACCESS_KEY_ID"] = DUMMY_ACCESS_KEY
    os.environ["AWS_SECRET_ACCESS_KEY"] = DUMMY_SECRET_KEY
    os.environ["AWS_DEFAULT_REGION"] = REGION
    os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
    server = MotoS3().start()
    yield S3Server(
        endpoint_url=server.endpoint_url,
        region=REGION,
        access_key=DUMMY_ACCESS_KEY,
        secret_key=DUMMY_SECRET_KEY,
        moto=server,
        create_bucket=server.create_bucket,
    )
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture()
def one_thread():
    """torch on one intra-op thread for the test, restored after. Tests of thousands of small CPU
    ops ran 3-4x slower with two threads on the shared 2-core machine (OpenMP threads waiting on
    each other; test_fid.py's eval), while bigger batches are faster on torch's choice (bench
    quality: 26 s on 2 threads, 40 s on one), so the setting must not outlive the test."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture()
def counter_name() -> Iterator[Callable[[str], str]]:
    """Fresh bad-sample counter names (``counter_name("bad")``), whose counters end with the test:
    a counter is an actor, and one left in the session's shared Ray is an idle process (about 0.8%
    of a core) for the rest of the suite."""
    import uuid

    from orchestrator.data.counter import release_counter

    names: list[str] = []

    def new(prefix: str) -> str:
        names.append(f"{prefix}-{uuid.uuid4().hex}")
        return names[-1]

    yield new
    for name in names:
        release_counter(name)


@pytest.fixture()
def s3_faults(s3_server):
    """A fault-injecting proxy in front of the session's moto server (fresh per test)."""
    proxy = FaultProxy(s3_server.moto.port).start()
    yield proxy
    proxy.stop()
