"""The tune section: search spaces are validated against the training config before anything
starts, with the key named; conversion to Ray Tune; trial run naming; the best job spec."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from pydantic import SecretStr

from orchestrator.config import ConfigError, load_config
from orchestrator.tune import space as S
from orchestrator.tune.config import load_tune_config
from orchestrator.tune.results import best_job_spec, best_row
from orchestrator.tune.trainable import run_for

ROOT = Path(__file__).resolve().parents[1]
BASE = ["data.val_images=16", "logging.val_every_steps=3", "optim.steps=12", "tune.asha.grace_period=3"]


def job(*overrides: str):
    return load_tune_config(None, [*BASE, *overrides])


@pytest.mark.parametrize("override, key, words", [
    ("tune.space.optim.lrr.choice=[1]", "tune.space.optim.lrr", "unknown key"),
    ("tune.space.optimm.lr.choice=[1]", "tune.space.optimm.lr", "unknown key"),
    ("tune.space.optim.lr.choice=[]", "tune.space.optim.lr", "non-empty"),
    ("tune.space.optim.lr.uniform=[0.1, 0.01]", "tune.space.optim.lr", "must be < high"),
    ("tune.space.optim.lr.loguniform=[0, 0.01]", "tune.space.optim.lr", "low > 0"),
    ("tune.space.optim.lr.loguniform=[-1, 0.01]", "tune.space.optim.lr", "low > 0"),
    ("tune.space.run.name.choice=[a, b]", "tune.space.run.name", "not searchable"),
    ("tune.space.storage.s3.region.choice=[eu]", "tune.space.storage.s3.region", "not searchable"),
    ("tune.space.data.val_images.choice=[8, 16]", "tune.space.data.val_images", "not searchable"),
    ("tune.space.optim.choice=[1]", "tune.space.optim", "a section"),
    ("tune.space.diffusion.weighting.choice=[uniform, bogus]", "tune.space.diffusion.weighting", "'bogus'"),
    ("tune.space.optim.lr.loguniform=[1e-4, 3]", "tune.space.optim.lr", "less than or equal to 1"),
    ("tune.space.optim.warmup_steps.uniform=[0, 10]", "tune.space.optim.warmup_steps", "not a float"),
    ("tune.space.optim.lr.randint=[1, 3]", "tune.space.optim.lr", "integer keys"),
    ("tune.space.optim.batch_size.choice=[8, 9]", "tune.space.optim.batch_size", "not divisible"),
    ("tune.space.optim.lr.uniform=[0.1]", "tune.space.optim.lr", "[low, high]"),
])
def test_invalid_spaces_are_rejected_naming_the_key(override, key, words):
    with pytest.raises(ConfigError) as e:
        job(override, "scaling.num_workers=2", "optim.batch_size=8")
    msg = str(e.value)
    assert f"{key}:" in msg and words in msg, msg


@pytest.mark.parametrize("overrides, words", [
    (["tune.searcher=optuna", "tune.space.optim.lr.grid=[1e-4, 1e-3]"], "grid with tune.searcher=optuna"),
    (["tune.searcher=grid", "tune.space.optim.lr.loguniform=[1e-4, 1e-3]"], "tune.searcher=grid"),
    (["tune.scheduler=pbt", "tune.space.optim.lr.loguniform=[1e-4, 1e-3]"], "searcher=random"),
    (["tune.scheduler=pbt", "tune.searcher=random", "tune.space.model.name.choice=[unet-tiny]",
      "tune.pbt.mutate=[model.name]"], "cannot change"),
    (["tune.scheduler=pbt", "tune.searcher=random", "tune.space.optim.lr.loguniform=[1e-4, 1e-3]",
      "tune.pbt.perturbation_interval=3", "checkpoint.every_steps=6"], "perturbation_interval=3"),
    (["logging.val_every_steps=0", "tune.space.optim.lr.loguniform=[1e-4, 1e-3]"], "needs a validation loss"),
    (["tune.mode=max", "tune.space.optim.lr.loguniform=[1e-4, 1e-3]"], "tune.mode=min"),
    (["tune.asha.grace_period=12", "tune.space.optim.lr.loguniform=[1e-4, 1e-3]"], "grace_period=12"),
    (["tune.space={}"], "tune.space is empty"),
])
def test_inconsistent_sweeps_are_rejected(overrides, words):
    with pytest.raises(ConfigError) as e:
        job(*overrides)
    assert words in str(e.value), str(e.value)


def test_nested_and_dotted_keys_and_yaml_numbers(tmp_path):
    f = tmp_path / "sweep.yaml"
    f.write_text("tune:\n  space:\n    optim.lr: {loguniform: [1e-5, 3e-3]}\n"
                 "    diffusion:\n      weighting: {choice: [uniform, p2]}\n"
                 "    optim:\n      warmup_steps: {randint: [0, 10]}\n")
    j = load_tune_config(f, BASE)
    assert j.tune.space == {"optim.lr": {"loguniform": [1e-5, 3e-3]}, "diffusion.weighting": {"choice": ["uniform", "p2"]},
                            "optim.warmup_steps": {"randint": [0, 10]}}
    space = S.param_space(j.tune.space)
    assert space["optim.warmup_steps"].upper == 11  # both ends included
    assert space["optim.lr"].lower == 1e-5


def test_every_training_leaf_outside_the_exclusions_is_searchable():
    j = job("tune.space.optim.lr.loguniform=[1e-4, 1e-3]")
    base = j.training_tree()

    def leaves(tree, prefix=""):
        for k, v in tree.items():
            key = f"{prefix}{k}"
            if isinstance(v, dict):
                yield from leaves(v, key + ".")
            else:
                yield key, v

    searchable = 0
    for key, value in leaves(base):
        if key in S.NOT_SEARCHABLE or key.startswith(tuple(S.NOT_SEARCHABLE_PREFIXES)):
            continue
        S.check_entry(key, {"choice": [value]}, base)  # the current value is always a legal choice
        searchable += 1
    assert searchable > 60


def test_grid_counts_and_pbt_mutations():
    j = job("tune.searcher=grid", "tune.num_samples=2", "tune.space.optim.lr.grid=[1e-4, 1e-3]",
            "tune.space.diffusion.weighting.grid=[uniform, min_snr, p2]", "tune.scheduler=fifo")
    assert j.num_trials() == 12
    p = job("tune.scheduler=pbt", "tune.searcher=random", "checkpoint.every_steps=3", "tune.pbt.perturbation_interval=6",
            "tune.space.optim.lr.loguniform=[1e-4, 1e-3]", "tune.space.model.name.choice=[unet-tiny, unet-small]",
            "tune.space.diffusion.weighting.choice=[uniform, p2]")
    assert p.pbt_keys() == ["optim.lr", "diffusion.weighting"]  # model.name cannot change mid-run
    muts = S.pbt_mutations(p.tune.space, p.pbt_keys())
    assert muts["diffusion.weighting"] == ["uniform", "p2"] and muts["optim.lr"].lower == 1e-4


def test_trial_run_names_for_new_restored_and_exploited_trials():
    assert run_for("t1", None) == ("t1", None)
    own = {"trial_id": "t1", "run": "t1-x6-t2", "checkpoint_uri": "/s/t1-x6-t2/checkpoint_00000009", "checkpoint_step": 9}
    assert run_for("t1", own) == ("t1-x6-t2", None)  # restored: same run, Ray Train resumes it
    donor = {"trial_id": "t2", "run": "t2", "checkpoint_uri": "/s/t2/checkpoint_00000012", "checkpoint_step": 12}
    assert run_for("t1", donor) == ("t1-x12-t2", "/s/t2/checkpoint_00000012")


def test_best_spec_is_a_training_job_with_the_best_values(tmp_path):
    j = job("tune.space.optim.lr.loguniform=[1e-4, 1e-3]", "tune.space.diffusion.weighting.choice=[uniform, p2]",
            "storage.s3.secret_access_key=hunter2")
    table = pd.DataFrame([
        {"trial": "a", "status": "completed", "step": 12, "val_loss": 0.30, "optim.lr": 3e-4, "diffusion.weighting": "p2"},
        {"trial": "b", "status": "stopped early", "step": 3, "val_loss": 0.10, "optim.lr": 1e-4, "diffusion.weighting": "uniform"},
        {"trial": "c", "status": "completed", "step": 12, "val_loss": 0.20, "optim.lr": 5e-4, "diffusion.weighting": "uniform"},
    ])
    row = best_row(table, "val_loss")
    assert row["trial"] == "c"  # completed trials first: b's number is from 3 steps
    text = best_job_spec(j, row)
    assert "hunter2" not in text and "*****" not in text
    f = tmp_path / "best.yaml"
    f.write_text(text)
    cfg = load_config(f)  # raydiff train --config reads it unchanged
    assert cfg.optim.lr == 5e-4 and cfg.diffusion.weighting == "uniform"
    assert cfg.run.name == "demo-best" and cfg.data.source == "builtin" and cfg.storage.s3.secret_access_key is None
    assert not isinstance(cfg.storage.s3.secret_access_key, SecretStr)


@pytest.mark.parametrize("name", ["tune-smoke.yaml", "tune-lr-weighting.yaml"])
def test_shipped_sweeps_validate(name):
    j = load_tune_config(ROOT / "jobs" / name)
    assert j.num_trials() >= 4 and j.tune.metric == "val_loss"


def test_cli_rejects_a_bad_space_before_starting(capsys):
    from orchestrator.cli import main

    rc = main(["tune", "--config", str(ROOT / "jobs" / "tune-smoke.yaml"), "tune.space.optim.lr.loguniform=[0, 1e-3]"])
    assert rc == 2
    assert "tune.space.optim.lr: loguniform needs low > 0" in capsys.readouterr().err
    assert main(["tune", "--config", str(ROOT / "jobs" / "tune-smoke.yaml"), "--dry-run"]) == 0
    assert "optim.lr: {loguniform:" in capsys.readouterr().out


def test_pbt_explore_stays_inside_the_space():
    space = {"optim.ema_decay": {"uniform": [0.9, 0.99]}, "optim.warmup_steps": {"randint": [0, 10]},
             "diffusion.weighting": {"choice": ["uniform", "p2"]}}
    out = S.clip_to_space({"optim.ema_decay": 0.95 * 1.2, "optim.warmup_steps": 12.6, "diffusion.weighting": "p2"}, space)
    assert out == {"optim.ema_decay": 0.99, "optim.warmup_steps": 10, "diffusion.weighting": "p2"}


def test_exploit_falls_back_to_the_donors_latest_checkpoint(tmp_path):
    import json

    from orchestrator.tune.trainable import donor_checkpoint

    cfg = load_config(None, [])
    donor = tmp_path / "t2"
    for step in (9, 12):
        d = donor / f"checkpoint_{step:08d}"
        d.mkdir(parents=True)
        (d / "train_state.json").write_text(json.dumps({"step": step}))
    (donor / "checkpoint_00000015").mkdir()  # an upload in progress: no train_state.json yet
    assert donor_checkpoint(str(donor / "checkpoint_00000009"), cfg) == str(donor / "checkpoint_00000009")
    # Rotated out by the donor's checkpoint.keep: its latest complete one instead.
    assert donor_checkpoint(str(donor / "checkpoint_00000006"), cfg) == str(donor / "checkpoint_00000012")


def test_asha_rungs_survive_a_restore():
    """Tune saves callbacks' state, not the scheduler's: the rungs travel in AshaRungs."""
    import pickle

    from ray.tune.schedulers import ASHAScheduler

    from orchestrator.tune.asha import AshaRungs

    def fresh():
        s = ASHAScheduler(time_attr="step", metric="val_loss", mode="min", max_t=12, grace_period=3, reduction_factor=2)
        return s, AshaRungs(s)

    sched, cb = fresh()
    rungs = dict(sched._brackets[0]._rungs)
    rungs[3]["t1"], rungs[6]["t1"] = -0.9, -0.7
    # What Tuner.restore does: unpickle scheduler and callback together, then set_state.
    sched2, cb2 = pickle.loads(pickle.dumps(fresh()))
    assert cb2.scheduler is sched2
    cb2.set_state(pickle.loads(pickle.dumps(cb.get_state())))
    assert dict(sched2._brackets[0]._rungs) == {12: {}, 6: {"t1": -0.7}, 3: {"t1": -0.9}}


def test_asha_rungs_completed_from_the_trials_metrics_after_a_stale_restore(caplog):
    """Tune copies the experiment state and the callbacks' state to storage one file at a time:
    a kill in between restores trials as finished (or past a rung) with rungs saved before they
    got there. The first step after the restore records their results at each milestone they
    had reached, from their own metric logs, and the rungs judge the next trials again."""
    import pickle
    from types import SimpleNamespace

    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    from orchestrator.storage import StorageError
    from orchestrator.tune.asha import AshaRungs

    histories = {
        # finished: its step-12 result was its final (done) one, which ASHA never sees
        "t1": [(3, 0.9), (6, 0.7), (9, 0.5), (12, 0.4)],
        # Tune had its step-6 result; its run had trained on to step 9 before the kill
        "t2": [(3, 1.0), (6, 0.98), (9, 0.95)],
        # never reported to Tune: judged when it reaches the rungs again
        "t3": [(3, 5.0)],
        "t5": [(3, 0.1), (6, 0.2)],
    }
    read: list[str] = []

    def history(trial_id):
        read.append(trial_id)
        if trial_id == "t4":
            raise StorageError("s3://b/sweep/t4/metrics.jsonl: access denied")
        return histories[trial_id]

    sched = ASHAScheduler(time_attr="step", metric="val_loss", mode="min", max_t=12, grace_period=3, reduction_factor=2)
    cb = pickle.loads(pickle.dumps(AshaRungs(sched, history)))
    assert cb.history is None  # the reader (credentials) is never saved with the Tuner's state
    sched = cb.scheduler
    cb.history = history
    cb.set_state({"rungs": [[(12, {}), (6, {}), (3, {"t5": -0.3})]]})  # stale: saved before t1, t2 reached a rung
    trials = [SimpleNamespace(trial_id="t1", last_result={"step": 12, "val_loss": 0.4, "done": True}),
              SimpleNamespace(trial_id="t2", last_result={"step": 6, "val_loss": 0.98, "done": False}),
              SimpleNamespace(trial_id="t3", last_result={}),
              SimpleNamespace(trial_id="t4", last_result={"step": 3, "val_loss": 0.6, "done": False}),
              SimpleNamespace(trial_id="t5", last_result={"step": 3, "val_loss": 0.1, "done": False})]
    for trial in trials:
        sched.on_trial_add(None, trial)
    with caplog.at_level("WARNING", logger="raydiff.tune"):
        cb.on_step_begin(0, trials)
        cb.on_step_begin(1, trials)  # once per sweep
    assert dict(sched._brackets[0]._rungs) == {12: {}, 6: {"t1": -0.7, "t2": -0.98}, 3: {"t1": -0.9, "t2": -1.0, "t5": -0.3}}
    assert sorted(read) == ["t1", "t2", "t4"]  # t3 had no result, t5 was recorded
    assert "t4" in caplog.text and "access denied" in caplog.text
    # The step-6 rung was empty as saved (nobody to judge against); a weak trial reaching it
    # now is stopped against t1 and t2 (median 0.84), a strong one goes on.
    weak, strong = SimpleNamespace(trial_id="t6"), SimpleNamespace(trial_id="t7")
    for trial in (weak, strong):
        sched.on_trial_add(None, trial)
    assert sched.on_trial_result(None, weak, {"step": 6, "val_loss": 1.5}) == TrialScheduler.STOP
    assert sched.on_trial_result(None, strong, {"step": 6, "val_loss": 0.6}) == TrialScheduler.CONTINUE


def test_plot_history_spans_resumes_and_pbt_runs(tmp_path):
    """metric.png's points come from the trials' metrics.jsonl, not from Tune's per-restore
    history: a trial killed and resumed keeps its points from before the kill, and a PBT
    exploit's run takes over from its first step."""
    import json

    from PIL import Image
    import io

    from orchestrator.tune.results import plot_png, trial_history

    j = job(f"run.storage={tmp_path}", "run.name=sw", "tune.metric=val_loss", "tune.space.optim.lr.choice=[1e-4]")
    runs = {
        # killed after step 6, resumed from the checkpoint at step 3: steps 6.. are redone
        "t1": [(3, 0.9), (6, 0.8), (6, 0.7), (9, 0.6), (12, 0.5)],
        "t2": [(3, 1.0), (6, 0.95), (9, 0.9)],
        "t2-x6-t1": [(9, 0.65), (12, 0.55)],  # exploited t1's step-6 checkpoint
        "t10": [(3, 2.0)],  # another trial whose name starts like t1's
    }
    for run, points in runs.items():
        d = tmp_path / "sw" / run
        d.mkdir(parents=True)
        (d / "metrics.jsonl").write_text("".join(
            json.dumps({"step": s, "loss": v + 0.1, "val_loss": v}) + "\n" for s, v in points)
            + json.dumps({"step": 13, "loss": 0.1}) + "\n")  # no val_loss: not a point
    assert trial_history(j, "t1") == [(3, 0.9), (6, 0.7), (9, 0.6), (12, 0.5)]
    assert trial_history(j, "t2") == [(3, 1.0), (6, 0.95), (9, 0.65), (12, 0.55)]
    assert trial_history(j, "t10") == [(3, 2.0)]
    assert trial_history(j, "t3") == []
    table = pd.DataFrame([{"trial": t, "status": "completed"} for t in ("t1", "t2", "t3", "t10")])
    with Image.open(io.BytesIO(plot_png(table, j))) as png:
        assert png.size == (800, 500)


def test_a_trial_restored_onto_a_finished_run_reports_it_without_training(tmp_path, monkeypatch):
    """Tune saves trial statuses every ~10 s, so a sweep killed just after a run finished restores
    that trial as running. Its run is complete in its own files: the trial reports the run's final
    result (metric, step, a pointer to its last checkpoint, done) without starting a training run,
    and a run that is not complete (no ``finished`` event at its last checkpoint) still trains."""
    import json
    from types import SimpleNamespace

    import ray.tune

    from orchestrator.storage import RunDir
    from orchestrator.tune import trainable
    from orchestrator.tune.trainable import POINTER_FILE, SweepSpec, tune_trial

    base = load_config(None, ["optim.steps=12", "run.evaluate=false"]).model_dump()
    spec = SweepSpec(base=base, sweep_uri=str(tmp_path), sweep="s", metric="val_loss")
    run = RunDir(str(tmp_path / "t1"))
    for step in (9, 12):
        d = tmp_path / "t1" / f"checkpoint_{step:08d}"
        d.mkdir(parents=True)
        (d / "train_state.json").write_text(json.dumps({"step": step}))
    log = run.log("metrics.jsonl")
    for step, val in ((3, 0.5), (6, 0.4), (9, 0.3), (12, 0.25)):
        log.write({"step": step, "loss": val + 0.1, "val_loss": val, "time": float(step)})
    log.close()
    run.event({"event": "started", "time": 0.0})
    run.event({"event": "finished", "step": 12, "time": 13.0})

    reports = []

    def report(metrics, checkpoint=None):
        pointer = json.loads((Path(checkpoint.path) / POINTER_FILE).read_text())
        reports.append((metrics, pointer))

    class Started(Exception):
        pass

    def run_training(*a, **kw):
        raise Started

    monkeypatch.setattr(ray.tune, "get_context", lambda: SimpleNamespace(get_trial_id=lambda: "t1"))
    monkeypatch.setattr(ray.tune, "get_checkpoint", lambda: None)
    monkeypatch.setattr(ray.tune, "report", report)
    monkeypatch.setattr(trainable, "run_training", run_training)
    monkeypatch.setattr(trainable, "_train", lambda cfg, *a: run_training())  # the training path (queue, thread)

    tune_trial({"optim.lr": 1e-3}, spec)
    (metrics, pointer), = reports
    assert metrics["done"] is True and metrics["step"] == 12 and metrics["val_loss"] == 0.25 and metrics["run"] == "t1"
    assert pointer == {"trial_id": "t1", "run": "t1", "checkpoint_uri": str(tmp_path / "t1" / "checkpoint_00000012"),
                       "checkpoint_step": 12}
    assert [e["event"] for e in run.events()] == ["started", "finished"]  # nothing started again

    # Trained to the end, but its driver died before recording the end (the evaluation, the
    # report): not complete, so it runs again (resumes at its last step and finishes).
    events = tmp_path / "t1" / "events.jsonl"
    events.write_text("".join(line + "\n" for line in events.read_text().splitlines() if '"finished"' not in line))
    assert [e["event"] for e in run.events()] == ["started"]
    with pytest.raises(Started):
        tune_trial({"optim.lr": 1e-3}, spec)
