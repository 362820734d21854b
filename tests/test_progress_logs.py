"""Progress without a terminal, the library-noise filters and the finished-run check (no Ray)."""

from __future__ import annotations

import io
import json
import logging
import sys
import warnings

import pytest

from orchestrator import logs
from orchestrator.config import load_config
from orchestrator.train.progress import Progress


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_lines_mode_prints_start_interval_checkpoint_and_end_lines_only():
    clock, out = Clock(), []
    p = Progress("lines", name="demo", total=100, start_step=0, every_s=30, clock=clock, emit=out.append)
    p.step(1)
    assert out == ["raydiff: training demo: step 1/100 (first step of this run)"]
    for step in range(2, 11):  # 10 steps in 9 s: nothing due before 30 s
        clock.t += 1
        p.step(step)
    assert len(out) == 1
    p.logged({"loss": 0.12345, "images_per_s": 256.4})
    clock.t += 21  # 30 s after the first line, 10 steps timed in 30 s: 89 steps left take 267 s
    p.step(11)
    assert out[-1] == "raydiff: step 11/100 (11%), loss 0.1235, 256 img/s, 00:30 elapsed, about 04:27 left"
    p.checkpoint(11, "runs/demo/checkpoint_00000011", 0.42)
    assert out[-1] == "raydiff: checkpoint at step 11/100, loss 0.1235: runs/demo/checkpoint_00000011 (training paused 0.4 s)"
    clock.t += 5
    p.step(12)  # not due
    p.close()
    assert out[-1].startswith("raydiff: step 12/100 (12%), loss 0.1235, 256 img/s, 00:35 elapsed")
    assert "left" not in out[-1]
    assert len(out) == 4
    assert not any("\r" in line or "\x1b" in line for line in out)


def test_lines_mode_after_resume_names_the_resume_step():
    out = []
    p = Progress("lines", name="r", total=9, start_step=6, every_s=30, clock=Clock(), emit=out.append)
    p.step(7)
    assert out == ["raydiff: training r: step 7/9 (first step of this run, resumed at step 6)"]


def test_off_mode_prints_nothing():
    out = []
    p = Progress("off", name="x", total=5, start_step=0, every_s=1, clock=Clock(), emit=out.append)
    for s in range(1, 6):
        p.step(s)
    p.checkpoint(5, "x", 0.0)
    p.close()
    assert out == []


def test_progress_mode_follows_stdout(monkeypatch):
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    assert logs.progress_mode(True) == "lines"
    assert logs.progress_mode(False) == "off"

    class Tty(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stdout", Tty())
    assert logs.progress_mode(True) == "bar"


def test_filters_drop_library_warnings_and_keep_others(monkeypatch):
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        logs.filter_warnings()
        warnings.warn("`torch.distributed.all_gather_into_tensor` is deprecated. Please use "
                      "`torch.distributed.all_gather_single` instead.", FutureWarning)
        warnings.warn("`torch.distributed._all_gather_base` is a private function and will be deprecated.", FutureWarning)
        warnings.warn("something the user should see", FutureWarning)
        warnings.warn("raydiff's own deprecation", DeprecationWarning)
    assert [str(w.message) for w in seen] == ["something the user should see", "raydiff's own deprecation"]


def test_configure_quiet_and_verbose(monkeypatch):
    for k in ("RAY_DATA_LOG_LEVEL", "TORCH_CPP_LOG_LEVEL", "RAY_COLOR_PREFIX"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    levels = {name: logging.getLogger(name).level for name, _ in logs.QUIET_LOGGERS}
    try:
        logs.configure(verbose=False)
        import os

        assert os.environ["RAY_DATA_LOG_LEVEL"] == "WARNING" and os.environ["TORCH_CPP_LOG_LEVEL"] == "ERROR"
        assert os.environ["RAY_COLOR_PREFIX"] == "0"  # not a terminal
        assert not logging.getLogger("ray.train").isEnabledFor(logging.INFO)
        assert not logs.is_verbose() and logs.ray_train_log_level(False) == "WARNING"
        assert logs.worker_env(False)["TORCH_CPP_LOG_LEVEL"] == "ERROR"
        assert logs.worker_env(True) == {}
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
        logs.configure_worker(False)


def test_quiet_loggers_silence_ray_trains_per_report_logger_without_importing_ray_train():
    """Ray Train's worker context logs each report at INFO on a logger named after its file; the
    quiet set-up finds that name without importing Ray Train (a fresh process: pytest's has it)."""
    from fresh_python import run_fresh_python

    out = run_fresh_python("""
import logging, sys
from orchestrator import logs
logs.quiet_loggers()
print('ray.train' in sys.modules, 'ray.data' in sys.modules)
from ray.train.v2._internal.execution import context
print(logging.getLogger(context.__file__).isEnabledFor(logging.INFO), logging.getLogger(context.__file__).level)
""")
    assert out.splitlines() == ["False False", f"False {logging.WARNING}"]


def test_library_prints_are_held_back_unless_verbose(capsys, caplog):
    with caplog.at_level(logging.DEBUG, logger="raydiff.libraries"):
        with logs.library_prints(False):
            print("DeepSpeed op built successfully")
    assert capsys.readouterr().out == ""
    assert "DeepSpeed op built successfully" in caplog.text
    with logs.library_prints(True):
        print("shown")
    assert capsys.readouterr().out == "shown\n"


# -- a finished run ----------------------------------------------------------------------------
def _fake_run(root, step: int, *, finished: bool, eval_step: int | None = None) -> None:
    """The files train/status.py reads (a real run's layout, without the weights)."""
    run = root / "done"
    ck = run / f"checkpoint_{step:08d}"
    ck.mkdir(parents=True)
    (ck / "train_state.json").write_text(json.dumps({"step": step, "samples_seen": 8 * step, "epoch": 0,
                                                      "batch_in_epoch": step}))
    (ck / "model.json").write_text(json.dumps({"num_classes": 10, "world_size": 1, "class_names": None}))
    (run / "samples").mkdir()
    (run / "samples" / f"step_{step:07d}.png").write_bytes(b"png")
    if eval_step is not None:
        (run / "eval.json").write_text(json.dumps({"step": eval_step, "num_classes": 10, "chance": 0.1,
                                                   "classifier_val_accuracy": 0.9, "sample_accuracy": 0.7,
                                                   "samples_per_class": 2}))
    if finished:
        (run / "events.jsonl").write_text(json.dumps({"event": "finished", "step": step}) + "\n")


def test_status_complete_only_when_finished_at_the_configured_steps(tmp_path):
    from orchestrator.train.status import read_status

    _fake_run(tmp_path, 6, finished=True, eval_step=6)
    base = [f"run.storage={tmp_path}", "run.name=done"]
    assert read_status(load_config(None, [*base, "optim.steps=6"])).complete
    assert not read_status(load_config(None, [*base, "optim.steps=9"])).complete  # more steps: it continues
    # Evaluation switched on after a run that ended without it: the rerun evaluates.
    (tmp_path / "done" / "eval.json").unlink()
    assert not read_status(load_config(None, [*base, "optim.steps=6"])).complete
    assert read_status(load_config(None, [*base, "optim.steps=6", "run.evaluate=false"])).complete


def test_status_stopped_after_last_checkpoint_is_not_complete(tmp_path):
    from orchestrator.train.status import read_status

    _fake_run(tmp_path, 6, finished=False)  # killed before the evaluation and the finished event
    assert not read_status(load_config(None, [f"run.storage={tmp_path}", "run.name=done", "optim.steps=6"])).complete


def test_rerun_of_a_finished_run_prints_summary_without_ray(tmp_path, monkeypatch, capsys):
    import ray

    from orchestrator.cli import main

    _fake_run(tmp_path, 6, finished=True, eval_step=6)

    def no_ray(*a, **k):
        raise AssertionError("ray.init called for a finished run")

    monkeypatch.setattr(ray, "init", no_ray)
    # The suite's session-wide Ray (tests/conftest.py) may be up already: nothing must change it.
    was_up = ray.is_initialized()
    assert main(["train", f"run.storage={tmp_path}", "run.name=done", "optim.steps=6"]) == 0
    out = capsys.readouterr().out
    assert ray.is_initialized() == was_up
    run = tmp_path / "done"
    assert f"run {run} is already complete at step 6 (optim.steps=6)" in out
    assert "raise optim.steps" in out
    assert f"checkpoint: {run}/checkpoint_00000006" in out
    assert f"sample grids: {run}/samples/ (latest step_0000006.png)" in out
    assert "class recognition: 70.0%" in out


def test_dry_run_says_whether_the_run_exists_and_where_it_resumes(tmp_path, capsys):
    from orchestrator.cli import main

    base = ["train", "--dry-run", f"run.storage={tmp_path}", "run.name=done"]
    assert main([*base]) == 0
    assert f"run: {tmp_path}/done has no checkpoint: a new run starts at step 0" in capsys.readouterr().out
    _fake_run(tmp_path, 6, finished=True, eval_step=6)
    assert main([*base, "optim.steps=6"]) == 0
    out = capsys.readouterr().out
    assert "exists, checkpoints at steps 6" in out and "complete at step 6" in out
    assert main([*base, "optim.steps=9"]) == 0
    out = capsys.readouterr().out
    # The fake checkpoint has no manifests or weights: verify.py's choice rejects it, read-only.
    assert "would resume from" not in out and "no checkpoint verifies: training would start at step 0" in out
    assert (tmp_path / "done" / "checkpoint_00000006").is_dir()  # nothing set aside in a dry run
    assert not (tmp_path / "done" / "corrupt").exists()


@pytest.mark.parametrize("verbose", [False, True])
def test_train_accepts_verbose_after_the_command(verbose):
    from orchestrator.cli import build_parser

    argv = ["train", "--verbose", "--dry-run"] if verbose else ["train", "--dry-run"]
    assert build_parser().parse_args(argv).verbose is verbose
    assert build_parser().parse_args(["-v", "train"]).verbose is True


def test_bar_mode_draws_ray_tqdm_with_loss_and_rate(capsys):
    """On a terminal: Ray's distributed tqdm (rendered in place by the driver; here, outside a
    worker, by tqdm_ray itself), resumed steps counted, loss and images/s in its description."""
    p = Progress("bar", name="t", total=5, start_step=1, every_s=30)
    for s in range(2, 6):
        p.step(s)
    p.logged({"loss": 0.5, "images_per_s": 10.0})
    p.checkpoint(5, "x", 0.1)  # no checkpoint line under a live bar
    p.close()
    err = capsys.readouterr().err
    assert "train t loss 0.5000, 10 img/s" in err and "5.00/5.00" in err
    assert "raydiff: checkpoint" not in err
