"""Where a run stands, read from its directory without starting Ray: for ``raydiff train`` on a
run that is already complete (it prints the summary in seconds instead of starting Ray, the
workers and the evaluation again) and for ``raydiff train --dry-run``.

A run is complete when its newest checkpoint is at or past ``optim.steps`` and the driver
recorded the end of that invocation: a ``finished`` event at that step in ``events.jsonl``
(written after the evaluation), or, for runs written before that event existed, an
``eval.json`` scored at that step. A run stopped between its last checkpoint and the
evaluation is therefore not complete and is run again (it resumes there and evaluates).
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass, field
from typing import Any

from orchestrator.config import TrainConfig
from orchestrator.data import dropped
from orchestrator.storage import RunDir, join
from orchestrator.train.checkpoint.layout import MODEL_FILE, CheckpointRef
from orchestrator.train.checkpoint.manager import Checkpointer
from orchestrator.train.startup import startup_line

FINISHED_EVENT = "finished"


@dataclass
class RunStatus:
    uri: str
    checkpoints: list[CheckpointRef] = field(default_factory=list)
    eval: dict[str, Any] | None = None
    bad_samples: dict[str, int] = field(default_factory=dict)
    complete: bool = False

    @property
    def latest(self) -> CheckpointRef | None:
        return self.checkpoints[-1] if self.checkpoints else None

    @property
    def exists(self) -> bool:
        return bool(self.checkpoints)

    def checkpoint_uri(self) -> str | None:
        return join(self.uri, self.latest.name) if self.latest is not None else None


def _json(rundir: RunDir, rel: str) -> Any:
    try:
        return json.loads(rundir.read_text(rel))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def read_status(cfg: TrainConfig) -> RunStatus:
    """Read-only: lists checkpoints and reads a few small JSON files (no checkpoint is loaded)."""
    rundir = RunDir.for_config(cfg)
    st = RunStatus(rundir.uri, Checkpointer(rundir).checkpoints())
    st.eval = _json(rundir, "eval.json")
    st.bad_samples = _json(rundir, "bad_samples.json") or {}
    latest = st.latest
    if latest is None or latest.step < cfg.optim.steps:
        return st
    finished = [e for e in rundir.events() if e.get("event") == FINISHED_EVENT]
    if finished:
        st.complete = finished[-1].get("step") == latest.step
    else:
        st.complete = st.eval is not None and st.eval.get("step") == latest.step
    if st.complete and _wants_eval(cfg, rundir, latest) and (st.eval is None or st.eval.get("step") != latest.step):
        st.complete = False  # evaluation is on now but was off (or failed) when the run ended
    return st


def _wants_eval(cfg: TrainConfig, rundir: RunDir, ref: CheckpointRef) -> bool:
    if not cfg.run.evaluate:
        return False
    model = _json(rundir, posixpath.join(ref.name, MODEL_FILE)) or {}
    return model.get("num_classes") is not None


def summary_lines(run_uri: str, final_step: int, checkpoint_uri: str | None, eval_result: dict[str, Any] | None,
                  bad_samples: dict[str, int], s3: Any = None) -> list[str]:
    """What ``raydiff train`` prints at the end of a run, and for a run that was complete already."""
    lines = [f"run directory: {run_uri}", f"final step: {final_step}; checkpoint: {checkpoint_uri}"]
    grids = sorted(n for n in RunDir(run_uri, s3).listdir("samples") if n.startswith("step_"))
    if grids:
        lines.append(f"sample grids: {join(run_uri, 'samples')}/ (latest {grids[-1]})")
    startup = startup_line(RunDir(run_uri, s3).events())
    if startup:
        lines.append(startup)
    if bad_samples:
        kinds = ", ".join(f"{k}={v}" for k, v in sorted(bad_samples.items()))
        lines.append(f"data: {dropped(bad_samples)} bad samples skipped ({kinds})")
    if eval_result is not None and "sample_accuracy" in eval_result:
        lines.append(eval_line(eval_result))
        if "shape_accuracy" in eval_result:
            lines.append(shape_line(eval_result))
    elif eval_result is not None and eval_result.get("kind") == "text_composition":
        from orchestrator.eval.compose import composition_lines

        lines += composition_lines(eval_result)
    return lines


def shape_line(e: dict[str, Any]) -> str:
    verdict = "recognisable" if e["shape_accuracy"] >= e["shape_threshold"] else "NOT recognisable"
    return (f"shape recognition: {e['shape_accuracy']:.1%} of samples show their class's shape, colour ignored "
            f"(threshold {e['shape_threshold']:.0%}: shapes {verdict}; the shape judge scores "
            f"{e['shape_judge_val_accuracy']:.1%} on held-out real images)")


def eval_line(e: dict[str, Any]) -> str:
    return (f"class recognition: {e['sample_accuracy']:.1%} of {e['samples_per_class'] * e['num_classes']} "
            f"generated samples recognised as their class (chance {e['chance']:.1%}; the judge classifier "
            f"scores {e['classifier_val_accuracy']:.1%} on held-out real images)")


def dry_run_lines(cfg: TrainConfig) -> list[str]:
    """The ``--dry-run`` section on the run directory: does the run exist, where would it resume.
    Uses the checkpoint owner's resume choice read-only (nothing is set aside here)."""
    st = read_status(cfg)
    if not st.exists:
        return [f"run: {st.uri} has no checkpoint: a new run starts at step 0"]
    steps = ", ".join(str(r.step) for r in st.checkpoints)
    lines = [f"run: {st.uri} exists, checkpoints at steps {steps}"]
    if st.complete:
        lines.append(f"complete at step {st.latest.step} (optim.steps={cfg.optim.steps}): raydiff train prints its "
                     f"summary without starting Ray; raise optim.steps to train further")
        return lines
    problems: list[str] = []
    verdict = Checkpointer.for_config(cfg).newest_good(warn=problems.append)
    lines += [f"  {p} (a real run sets it aside under corrupt/)" for p in problems]
    if verdict.ref is None:
        lines.append("no checkpoint verifies: training would start at step 0")
    else:
        lines.append(f"would resume from {join(st.uri, verdict.ref.name)} at step {verdict.ref.step} "
                     f"and train to step {cfg.optim.steps}")
    return lines
