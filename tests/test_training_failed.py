"""A run whose workers fail past ``run.max_failures`` ends with one line naming each failed
rank's error and the command that resumes it, exit code 1, and no traceback (train/failure.py,
cli/__init__.py). The errors are Ray Train's own classes, built as its worker-group poll builds
them (ray/train/v2/_internal/execution/worker_group/poll.py)."""

from __future__ import annotations

import pytest
from ray.exceptions import RayActorError
from ray.train import ControllerError, WorkerGroupError
from ray.train.v2._internal.exceptions import WorkerHealthCheckFailedError

from orchestrator import cli
from orchestrator.train.failure import training_failed

# Ray's text for a worker whose process exited (os._exit) during training.
DIED = ("The actor died unexpectedly before finishing this task.\n\tclass_name: RayTrainWorker\n\tpid: 4242\n"
        "The actor is dead because its worker process has died. Worker exit type: SYSTEM_ERROR Worker exit "
        "detail: Worker unexpectedly exits with a connection error code 2. End of file. Some common causes include: "
        "(1) the process was killed by the OOM killer due to high memory usage, (2) ray stop --force was called")


def _group_error(failures):
    return WorkerGroupError("\n".join(f"[Rank {r}]: {e}" for r, e in failures.items()), failures)


def test_the_summary_names_each_rank_and_the_resume_step():
    failures = {
        0: RuntimeError("CUDA out of memory. Tried to allocate 2 GiB\nlong traceback..."),
        1: RuntimeError("CUDA out of memory. Tried to allocate 2 GiB\nlong traceback..."),
        2: WorkerHealthCheckFailedError("Worker health check failed.", RayActorError(error_msg=DIED)),
    }
    e = training_failed(_group_error(failures), run_uri="/r/x", max_failures=0, resume_step=8)
    text = str(e)
    assert "\n" not in text
    assert "rank 0, 1: RuntimeError: CUDA out of memory. Tried to allocate 2 GiB;" in text
    assert "rank 2: the worker process died (Worker unexpectedly exits with a connection error code 2)." in text
    assert "run.max_failures=0" in text and "resumes from the checkpoint at step 8" in text
    assert e.resume_step == 8 and e.run_uri == "/r/x"
    none = training_failed(ControllerError(ValueError("bad")), run_uri="/r/x", max_failures=2, resume_step=None)
    assert "after 2 restarts" in str(none) and "ValueError: bad" in str(none) and "no checkpoint yet" in str(none)


@pytest.mark.parametrize("verbose", [False, True])
def test_cli_prints_one_line_and_the_command_and_exits_1(monkeypatch, capsys, verbose):
    import orchestrator.cli.train as train_cli

    def fail(args):
        raise training_failed(_group_error({1: KeyError("x")}), run_uri="/r/x", max_failures=0, resume_step=4)

    monkeypatch.setattr(train_cli, "cmd_train", fail)
    argv = [*(["-v"] if verbose else []), "train", "run.name=x", "storage.s3.secret_access_key=hunter2"]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert ("Traceback" in err) == verbose
    last = err.strip().splitlines()[-1]
    assert last.startswith("raydiff: training failed (no restart allowed, run.max_failures=0): rank 1: KeyError: 'x'.")
    assert last.endswith(f": raydiff {'-v ' if verbose else ''}train run.name=x storage.s3.secret_access_key=...")
    assert "hunter2" not in err


@pytest.mark.slow
def test_a_failed_local_run_says_so_in_one_line_beside_another_ray_and_resumes(ray_local, tmp_path):
    """A real run, its own local Ray started beside the test session's (``ray_local``): the
    workers exit after step 3 (train/faults.py) with no restart allowed. The output ends with one
    line naming the failure and the command, exit 1, and has no traceback of raydiff's or of Ray
    Train's placement-group cleaner (asking the state API with two Ray instances on the machine,
    it printed "Found multiple active Ray instances"). The same command then resumes at step 2."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from orchestrator.storage import RunDir
    from orchestrator.train.faults import EXIT_ENV

    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own Ray, not the session's
    env.update(PYTHONPATH=str(root), RAY_AUTH_MODE="disabled", RAYDIFF_CACHE_DIR=str(tmp_path / "cache"))
    args = ["train", f"run.storage={tmp_path}", "run.name=mf0", "run.max_failures=0", "optim.steps=4",
            "scaling.num_workers=1", "optim.batch_size=8", "checkpoint.every_steps=2", "run.evaluate=false",
            "sampling.every_steps=1000", "sampling.num_steps=2", "sampling.per_class=1", "sampling.max_rows=2",
            "data.resolution=16", "model.name=unet-tiny", "data.builtin_images_per_class=6", "optim.warmup_steps=2"]

    def raydiff(extra_env):
        return subprocess.run([sys.executable, "-m", "orchestrator", *args], cwd=tmp_path, env={**env, **extra_env},
                              capture_output=True, text=True, timeout=900)

    failed = raydiff({EXIT_ENV: "3"})
    out = failed.stdout + failed.stderr
    assert failed.returncode == 1, out[-3000:]
    assert "Found multiple active Ray instances" not in out and "PlacementGroupCleaner" not in out, out[-3000:]
    # Ray Train's controller logs one warning with a traceback when it cannot shut down a crashed
    # worker's backend (ray/train/v2/_internal/callbacks/backend_setup.py); no other traceback.
    assert out.count("Traceback") == out.count("Graceful shutdown of backend failed"), out[-3000:]
    last = failed.stderr.strip().splitlines()[-1]
    assert last.startswith("raydiff: training failed (no restart allowed, run.max_failures=0): rank 0: "
                           "the worker process died"), last
    assert f"running the same command again resumes from the checkpoint at step 2: raydiff {' '.join(args)}" in last
    done = raydiff({})
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert "Traceback" not in done.stdout + done.stderr
    steps = [r["step"] for r in RunDir(str(tmp_path / "mf0")).metrics() if "loss" in r]
    assert steps[-1] == 4
