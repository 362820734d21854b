"""A finished sweep's outputs: the results table (printed, and saved as CSV), the metric against
training progress for every trial (PNG) and the best configuration as a job spec that
``raydiff train --config`` accepts unchanged."""

from __future__ import annotations

import io
import logging
import math
from typing import Any

import pandas as pd
import yaml

from orchestrator.config import TrainConfig, config_to_dict
from orchestrator.storage import RunDir, StorageError, join, listdir
from orchestrator.storage.jsonl import read_records
from orchestrator.storage.rundir import EVENTS_LOG
from orchestrator.train.startup import time_to_first_step
from orchestrator.tune.config import TuneJob
from orchestrator.tune.space import trial_tree

CSV_FILE = "results.csv"
PNG_FILE = "metric.png"
BEST_FILE = "best.yaml"
MASK = "**********"
log = logging.getLogger("raydiff")


def _trial_id(result: Any) -> str:
    tid = (result.metrics or {}).get("trial_id")
    if tid:
        return str(tid)
    # Tune names trial directories {trainable}_{trial_id}_{index}_{params}...
    parts = result.path.rstrip("/").rsplit("/", 1)[-1].split("_")
    return "_".join(parts[2:4]) if len(parts) >= 4 else result.path


def _target_steps(job: TuneJob, params: dict[str, Any]) -> int:
    return int(params.get("optim.steps", job.optim.steps))


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _start_seconds(runs: list[str], job: TuneJob) -> float | None:
    if not runs:
        return None
    # A trial's runs live in the sweep directory (tune/runner.py, tune/trainable.py).
    uri = join(job.run.storage, job.run.name, runs[-1])
    try:
        events = read_records(uri, EVENTS_LOG, job.storage.s3)
    except (StorageError, OSError) as e:  # the table still prints; the start-up column says "-"
        log.warning("time to first step of %s not read: %s", uri, e)
        return None
    took = time_to_first_step(events)
    return None if took is None else round(took, 1)


def results_table(grid: Any, job: TuneJob) -> Any:
    """One row per trial: trial, status, steps, metric (last and best), sample score, run
    directories, then the searched parameters."""
    metric = job.tune.metric
    rows = []
    for result in grid:
        m = result.metrics or {}
        params = {k: result.config.get(k) for k in job.tune.space}
        hist = result.metrics_dataframe
        values = hist[metric].dropna().tolist() if hist is not None and metric in hist else []
        runs = sorted(set(hist["run"].dropna())) if hist is not None and "run" in hist else []
        step = int(m.get("step", 0) or 0)
        if result.error is not None:
            status = "error"
        elif step >= _target_steps(job, params):
            status = "completed"
        else:
            status = "stopped early"
        rows.append({
            "trial": _trial_id(result),
            "status": status,
            "step": step,
            # Seconds from the trial's newest start that trained to its first step: what every trial pays.
            "start_s": _start_seconds(runs, job),
            metric: m.get(metric),
            f"best_{metric}": min(values) if values else None,
            "sample_accuracy": m.get("sample_accuracy"),
            "runs": " ".join(runs),
            **params,
        })
    return pd.DataFrame(rows).sort_values("trial", ignore_index=True)


def best_row(table: Any, metric: str) -> Any | None:
    """The trial with the lowest final metric, among completed trials if any completed (an
    early-stopped trial's number is from fewer steps)."""
    scored = table[table[metric].apply(_finite)]
    done = scored[scored["status"] == "completed"]
    pool = done if len(done) else scored
    if not len(pool):
        return None
    return pool.loc[pool[metric].astype(float).idxmin()]


def best_job_spec(job: TuneJob, row: Any) -> str:
    """The training job with the best trial's values, as YAML for ``raydiff train --config``:
    the sweep's own data source (not the resolved cache path), a new run name, and no
    credentials (they come from the environment or the command line)."""
    params = {k: row[k] for k in job.tune.space}
    params = {k: (v.item() if hasattr(v, "item") else v) for k, v in params.items()}
    tree = trial_tree(job.training_tree(), params)
    tree["run"]["name"] = f"{job.run.name}-best"
    s3 = tree["storage"]["s3"]
    for k, v in list(s3.items()):
        if v == MASK:
            s3[k] = None
    cfg = TrainConfig.model_validate(tree)  # what raydiff train will read back
    head = (f"# Best trial {row['trial']} of sweep {job.run.name}: {job.tune.metric}={row[job.tune.metric]:.6g} "
            f"after {row['step']} steps.\n# Searched: " + ", ".join(f"{k}={v!r}" for k, v in params.items()) + "\n")
    return head + yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def trial_history(job: TuneJob, trial: str) -> list[tuple[int, float]]:
    """``(step, metric)`` of one trial over its whole life, read from its runs' ``metrics.jsonl``.

    Tune's ``metrics_dataframe`` holds only what the trial reported since it was last restored,
    so a trial resumed after a kill would lose its points from before it. A trial's runs are
    ``{trial}`` and, after each PBT exploit, ``{trial}-x{step}-{donor}`` (tune/trainable.py:
    run_for); a later run takes over from its first step on, like a resume within one run."""
    sweep_uri = join(job.run.storage, job.run.name)
    metric = job.tune.metric
    runs = []
    for name in listdir(sweep_uri, job.storage.s3):
        if name != trial and not name.startswith(f"{trial}-x"):
            continue
        points = [(r["step"], float(r[metric])) for r in RunDir(join(sweep_uri, name), job.storage.s3).metrics()
                  if isinstance(r.get("step"), int) and _finite(r.get(metric))]
        if points:
            runs.append(points)
    history: list[tuple[int, float]] = []
    for points in sorted(runs, key=lambda p: p[0][0]):
        history = [p for p in history if p[0] < points[0][0]] + points
    return history


def plot_png(table: Any, job: TuneJob) -> bytes:
    """The metric against training step for every trial of ``table`` (its whole history:
    ``trial_history``); stopped trials dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = job.tune.metric
    status = dict(zip(table["trial"], table["status"]))
    fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
    for tid in table["trial"]:
        try:
            h = trial_history(job, tid)
        except (StorageError, OSError) as e:  # the other trials are still plotted
            log.warning("metrics of trial %s not read: %s", tid, e)
            continue
        if not h:
            continue
        st = status.get(tid, "")
        ax.plot([p[0] for p in h], [p[1] for p in h], marker="o", markersize=3,
                linestyle="--" if st != "completed" else "-", label=f"{tid} ({st})")
    ax.set_xlabel("training step")
    ax.set_ylabel(metric)
    ax.set_title(f"sweep {job.run.name}: {metric} per trial ({job.tune.scheduler}, {job.tune.searcher})")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def write_outputs(table: Any, grid: Any, job: TuneJob, sweep: RunDir) -> tuple[str, str | None, str | None]:
    csv_uri = sweep.write_text(CSV_FILE, table.to_csv(index=False))
    png_uri = sweep.write_bytes(PNG_FILE, plot_png(table, job)) if len(table) else None
    row = best_row(table, job.tune.metric)
    best_uri = sweep.write_text(BEST_FILE, best_job_spec(job, row)) if row is not None else None
    return csv_uri, png_uri, best_uri
