"""One trial: a Tune function trainable that runs a full raydiff training run (Ray Train +
DeepSpeed) and reports its validation loss to Tune.

The pattern is Ray 2.60's for Train inside Tune: the trial function builds the run (here
``orchestrator.train.driver.run_training``, with Ray already initialised) and a Train callback
carries the workers' reports to Tune. Ray's ``TuneReportCallback`` forwards metrics only; this
one (``ReportBridge``) also forwards the checkpoint, and the trial reports each result with a
small Tune checkpoint that points at the run's latest Train checkpoint. Tune needs trial
checkpoints for two things here:

- ``Tuner.restore`` after the sweep driver died: an unfinished trial comes back with its last
  pointer and reruns the same run name, which Ray Train resumes from its own latest checkpoint;
- population-based training: exploiting copies the donor's pointer into the weaker trial, which
  then starts a new run (``{trial}-x{step}-{donor}``) from the donor's checkpoint with its own,
  perturbed hyperparameters (``init_checkpoint``; see train/checkpoint/warmstart.py).

Each trial's runs live in the sweep directory: ``{run.storage}/{sweep}/{trial_id}`` (plus one
run per PBT exploit).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass
from typing import Any

import ray.tune
from ray.data import DataContext
from ray.train.v2.api.callback import UserCallback
from ray.tune import Checkpoint
from ray.util.queue import Empty, Queue

from orchestrator.config import validate_config
from orchestrator.storage import RunDir, exists, join
from orchestrator.train.checkpoint.layout import STATE_FILE
from orchestrator.train.checkpoint.manager import Checkpointer
from orchestrator.data.source import resolve_paths
from orchestrator.ray_session import adopt_session_settings
from orchestrator.train.driver import TrainOutcome, complete_outcome, run_training
from orchestrator.tune.cleanup import PlacementGroupTracker
from orchestrator.tune.space import trial_tree

POINTER_FILE = "raydiff_pointer.json"


@dataclass(frozen=True)
class SweepSpec:
    """What every trial shares (handed to trials through the object store)."""

    base: dict[str, Any]  # training tree, data resolved, secrets revealed: in memory only
    sweep_uri: str
    sweep: str
    metric: str
    # The Ray Train settings the processes of the sweep's local Ray inherited (ray_session.py),
    # None on a cluster: the trials' controllers need no runtime env to get them.
    ray_train_settings: dict[str, str] | None = None
    # Whether that Ray serves the state API (ray_session.state_api_served: a local one does not).
    state_api: bool = True
    # ASHA judges trials at rungs: a resumed trial first shows it its result at the resume point
    # (``replay_resume_point``).
    replay_resume_point: bool = False


class ReportBridge(UserCallback):
    """Runs in the Train controller: puts rank 0's metrics and the checkpoint path of every
    report on the trial's queue. A bounded queue: training runs at most a report or two ahead
    of Tune, so a PBT donor's checkpoint is still there when it is copied."""

    def __init__(self, queue: Any):
        self.queue = queue

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        self.queue.put({"metrics": dict(metrics[0]),
                        "checkpoint": os.path.basename(checkpoint.path.rstrip("/")) if checkpoint else None})


def read_pointer(checkpoint: Any) -> dict[str, Any] | None:
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as d:
        path = os.path.join(d, POINTER_FILE)
        return json.loads(open(path).read()) if os.path.exists(path) else None


def run_for(trial_id: str, pointer: dict[str, Any] | None) -> tuple[str, str | None]:
    """``(run name, checkpoint to start from)`` for a trial given the Tune checkpoint it got.

    No pointer: a new trial, run = trial id. Its own pointer: a restored trial, same run (Ray
    Train resumes it). Another trial's pointer: PBT exploited it, a new run from the donor's
    checkpoint, named after it so that a restore finds the same run again."""
    if pointer is None:
        return trial_id, None
    if pointer["trial_id"] == trial_id:
        return pointer["run"], None
    return f"{trial_id}-x{pointer['checkpoint_step']}-{pointer['trial_id']}", pointer["checkpoint_uri"]


def donor_checkpoint(uri: str, cfg: Any) -> str:
    """``uri``, or the donor run's latest checkpoint if ``uri`` is gone: the donor trains on while
    Tune decides, and its run keeps only ``checkpoint.keep`` checkpoints. A later checkpoint of
    the same (better) trial is what PBT means to copy, a step or two further on."""
    if exists(join(uri, STATE_FILE), cfg.storage.s3):
        return uri
    donor = RunDir(uri.rstrip("/").rsplit("/", 1)[0], cfg.storage.s3)
    latest = Checkpointer(donor).latest()
    if latest is None:
        raise RuntimeError(f"PBT donor run {donor.uri} has no checkpoint left to continue from. "
                           "Fix: raise checkpoint.keep")
    return join(donor.uri, latest.name)


class _Trial:
    def __init__(self, spec: SweepSpec, trial_id: str, run: str, steps: int):
        self.spec, self.trial_id, self.run, self.steps = spec, trial_id, run, steps
        self.run_uri = join(spec.sweep_uri, run)
        self.checkpoint: tuple[str, int] | None = None  # latest Train checkpoint (uri, step)
        self.last: dict[str, Any] = {}

    def pointer_checkpoint(self) -> Any:
        if self.checkpoint is None:
            return None
        uri, step = self.checkpoint
        d = tempfile.mkdtemp(prefix="raydiff-pointer-")
        with open(os.path.join(d, POINTER_FILE), "w") as f:
            json.dump({"trial_id": self.trial_id, "run": self.run, "checkpoint_uri": uri, "checkpoint_step": step}, f)
        return Checkpoint.from_directory(d)

    def report(self, metrics: dict[str, Any]) -> None:
        checkpoint = self.pointer_checkpoint()
        try:
            ray.tune.report({**metrics, "run": self.run}, checkpoint=checkpoint)
        finally:
            if checkpoint is not None:  # Tune has copied it into the trial directory by now
                shutil.rmtree(checkpoint.path, ignore_errors=True)

    def forward(self, item: dict[str, Any]) -> None:
        m = item["metrics"]
        if item["checkpoint"]:
            self.checkpoint = (join(self.run_uri, item["checkpoint"]), int(m["step"]))
        # Only results that carry the metric go to Tune (schedulers and searchers need it in
        # every result); checkpoint-only reports just move the pointer.
        if m.get(self.spec.metric) is not None:
            self.last = _result_fields(m)
            if self.last["step"] < self.steps:
                # The last step's result is reported once, after the run, as the final one.
                self.report(self.last)


def _result_fields(m: dict[str, Any]) -> dict[str, Any]:
    return {k: m[k] for k in ("step", "samples_seen", "epoch", "loss", "val_loss") if k in m}


def _last_result_in_storage(trial: _Trial, s3: Any) -> dict[str, Any]:
    """The run's newest metrics record that carries the sweep's metric, read from its storage.

    For a trial that Tune restarts onto a run that has already trained to the end (e.g. restored
    after its final result was lost): this invocation trains nothing and reports nothing, yet
    the trial's final result must still carry the metric and the final step."""
    for rec in reversed(RunDir(trial.run_uri, s3).metrics()):
        if rec.get(trial.spec.metric) is not None:
            return _result_fields(rec)
    return {}


def replay_resume_point(trial: _Trial, s3: Any) -> None:
    """For a trial restored onto its own run (the sweep's driver died): report to Tune the run's
    result at the checkpoint it resumes from, before it trains again.

    A trial that passed an ASHA rung just before the kill, and that Tune had not judged there yet
    (its result was still on the way, or Tune's saved state predates it), would otherwise resume
    past the rung and never be judged at it: its next result is past the milestone, and its last
    one is its final one, which Tune does not show the scheduler (seen: a weak trial ran to the end
    instead of stopping at the rung). A result Tune had already seen is judged again as ASHA
    judges a repeated rung: not recorded twice."""
    rundir = RunDir(trial.run_uri, s3)
    latest = Checkpointer(rundir).newest_good(warn=lambda _: None).ref
    if latest is None:
        return
    at = [r for r in rundir.metrics() if r.get(trial.spec.metric) is not None and r["step"] <= latest.step]
    if at:
        trial.checkpoint = (join(trial.run_uri, latest.name), latest.step)
        trial.report(_result_fields(at[-1]))  # ASHA may stop the trial here


def _train(cfg: Any, trial: _Trial, spec: SweepSpec, init_checkpoint: str | None) -> TrainOutcome:
    """The trial's training run, its reports forwarded to Tune as they come."""
    queue = Queue(maxsize=1, actor_options={"num_cpus": 0})
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["run"] = run_training(cfg, callbacks=(ReportBridge(queue), PlacementGroupTracker(spec.sweep)),
                                          init_checkpoint=init_checkpoint)
        except BaseException as e:  # noqa: BLE001 - re-raised in the trial's thread below
            outcome["error"] = e

    # Training runs in a helper thread so that this thread is free to report: ray.tune.report
    # blocks until Tune asks for the next result, and is where Tune ends a stopped trial.
    thread = threading.Thread(target=fit, name=f"raydiff-trial-{trial.trial_id}", daemon=True)
    thread.start()
    while True:
        try:
            trial.forward(queue.get(timeout=1.0))
        except Empty:
            if not thread.is_alive():
                break
    while not queue.empty():  # reports put between the last get and the thread's end
        trial.forward(queue.get_nowait())
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["run"]


def tune_trial(params: dict[str, Any], spec: SweepSpec) -> None:
    """The Tune function trainable (``tune.with_parameters(tune_trial, spec=...)``)."""
    # This process is the trial's training driver: no Ray Data progress bars in the sweep's output.
    DataContext.get_current().enable_progress_bars = False
    adopt_session_settings(spec.ray_train_settings, state_api=spec.state_api)
    trial_id = ray.tune.get_context().get_trial_id()
    pointer = read_pointer(ray.tune.get_checkpoint())
    run, init_checkpoint = run_for(trial_id, pointer)
    tree = trial_tree(spec.base, params)
    tree["run"].update({"storage": spec.sweep_uri, "name": run})
    cfg = validate_config(tree)
    trial = _Trial(spec, trial_id, run, cfg.optim.steps)
    # A trial that Tune restores onto a run that finished before the sweep's driver died (Tune's
    # saved trial statuses lag the runs' own files by up to its ~10 s save period) has nothing to
    # train: its final result comes from the run's files, without a Ray Train run's start-up
    # (15-20 s on 2 cores, issue 18) to resume at the last step and train nothing.
    out = complete_outcome(resolve_paths(cfg))
    if out is None:
        if init_checkpoint is not None:
            init_checkpoint = donor_checkpoint(init_checkpoint, cfg)
        elif pointer is not None and spec.replay_resume_point:  # restored onto its own run
            replay_resume_point(trial, cfg.storage.s3)
        out = _train(cfg, trial, spec, init_checkpoint)
    final = dict(trial.last) or _last_result_in_storage(trial, cfg.storage.s3)
    final["step"] = out.final_step
    if out.checkpoint_path:
        trial.checkpoint = (out.checkpoint_path, out.final_step)
    if out.eval is not None:
        final["sample_accuracy"] = out.eval["sample_accuracy"]
    if spec.metric in final:
        # done=True: Tune stops the trial on this result without asking the scheduler (PBT
        # would otherwise pause a finished trial to perturb it).
        trial.report({**final, "done": True})
