"""End to end on real Ray Train + DeepSpeed (CPU, gloo): checkpoints, grids, resume, ZeRO stages."""

from __future__ import annotations

import io
import json
import time

import pytest
from PIL import Image

from orchestrator.train.checkpoint.layout import list_checkpoints
from orchestrator.train.checkpoint.manager import Checkpointer
from orchestrator.config import load_config
from orchestrator.train.driver import run_training
from orchestrator.train.startup import PHASES, startup_breakdown
from orchestrator.storage import RunDir
from tests.tb_events import read_dir, visible

pytestmark = pytest.mark.slow

TINY = [
    "model.name=unet-tiny",
    "data.builtin_images_per_class=6",
    "optim.batch_size=8",
    "optim.warmup_steps=2",
    "logging.every_steps=1",
    "logging.progress=false",
    "sampling.num_steps=3",
    "sampling.per_class=2",
    "sampling.max_rows=3",
    "run.max_failures=0",
]


@pytest.fixture()
def builtin_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("RAYDIFF_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "builtin-cache"))


def _metrics(rundir: RunDir) -> list[dict]:
    return rundir.metrics()


def _live_actors() -> dict[str, str]:
    """Actor id -> class name of every actor of the Ray session that is not dead, from the GCS's
    actor table (the session serves no state API)."""
    from ray._private.state import state

    return {i: a["ActorClassName"] for i, a in state.actor_table(None).items() if a["State"] != "DEAD"}


def _actors_left(before: dict[str, str], allowed: set[str], timeout_s: float = 30) -> set[str]:
    """Classes of the actors started since ``before`` that are still alive, other than ``allowed``,
    once those ended (an actor ended with ``ray.kill`` or by its handle's release is gone within a
    moment, not at once), or at the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        left = {cls for i, cls in _live_actors().items() if i not in before} - allowed
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


def test_two_workers_zero2_checkpoint_grid_then_resume(ray_local, builtin_cache, tmp_path):
    common = [f"run.storage={tmp_path}", "run.name=e2e", "precision.zero_stage=2", "scaling.num_workers=2",
              "checkpoint.every_steps=3", "checkpoint.keep=2", "sampling.every_steps=6", *TINY]
    cfg = load_config(None, [*common, "optim.steps=6", "run.evaluate=true", "run.eval_per_class=1"])
    out = run_training(cfg)
    rundir = RunDir.for_config(cfg)
    assert out.final_step == 6
    assert [r.step for r in list_checkpoints(rundir)] == [3, 6]
    grid = Image.open(io.BytesIO(rundir.read_bytes("samples/step_0000006.png")))
    # 3 rows (classes) x 2 columns of 32x32 with 2 px padding, upscaled 2x.
    assert grid.size == (2 * (2 * 34 + 2), 2 * (3 * 34 + 2))
    assert rundir.exists("config.yaml") and rundir.exists("eval.json")
    m = _metrics(rundir)
    assert [r["step"] for r in m] == [1, 2, 3, 4, 5, 6]
    assert all(r["loss"] > 0 and len(r["loss_per_t_bin"]) == 10 and r["images_per_s"] > 0 for r in m)
    assert m[-1]["samples_seen"] == 6 * 8
    # TensorBoard events (tracking/tensorboard.py) hold the same records; the report was drawn.
    tb = visible(read_dir(tmp_path / "e2e" / "tensorboard"))
    assert {"train/loss", "loss_per_t_bin/00", "train/lr", "train/grad_norm", "train/ema_decay",
            "precision/loss_scale", "perf/images_per_s", "perf/data_wait_share", "data/skipped_samples"} <= set(tb)
    assert [(s, round(v, 5)) for s, v in tb["train/loss"]] == [(r["step"], round(r["loss"], 5)) for r in m]
    assert [s for s, _ in tb["samples"]] == [6]
    assert Image.open(io.BytesIO(rundir.read_bytes("report.png"))).size == (1500, 1200)

    # Same run name again with more steps: resumes from step 6 instead of starting over.
    cfg2 = load_config(None, [*common, "optim.steps=9", "run.evaluate=false"])
    out2 = run_training(cfg2)
    assert out2.final_step == 9
    m2 = _metrics(rundir)
    assert [r["step"] for r in m2] == list(range(1, 10))
    events = rundir.events()
    resumed = [e for e in events if e["event"] == "resumed"]
    assert [(e["event"], e["step"], e["samples_seen"]) for e in resumed] == [("resumed", 6, 48)]
    # Each invocation records its start and first step; every checkpoint its training stall.
    assert [e["event"] for e in events].count("started") == 2
    assert [e["step"] for e in events if e["event"] == "first_step"] == [1, 7]
    # ... and the phases of its start-up, in order (train/startup.py).
    assert [p for p, _ in startup_breakdown(events)] == list(PHASES)
    assert [e["step"] for e in events if e["event"] == "checkpoint"] == [3, 6, 9]
    assert m2[-1]["samples_seen"] == 9 * 8
    assert [s for s, _ in visible(read_dir(tmp_path / "e2e" / "tensorboard"))["train/loss"]] == list(range(1, 10))
    refs = list_checkpoints(rundir)
    assert [r.step for r in refs] == [6, 9]  # keep=2
    state = json.loads(rundir.read_text(f"{refs[-1].name}/train_state.json"))
    # 60 images / global batch 8 -> 7 steps per epoch: step 9 is epoch 1, batch 2 (16 samples into it).
    assert state == {"step": 9, "samples_seen": 72, "epoch": 1, "batch_in_epoch": 2, "samples_in_epoch": 16,
                     "data_order": 2}
    model, saved_cfg = Checkpointer(rundir).ema_model(refs[-1])
    assert saved_cfg.optim.steps == 9 and model.num_classes == 10

    # A third invocation of the finished run trains nothing and still reports where it is.
    assert run_training(cfg2).final_step == 9
    assert [r["step"] for r in _metrics(rundir)] == list(range(1, 10))


@pytest.mark.parametrize("stage", [0, 1, 3])
def test_zero_stage_trains_checkpoints_and_resumes(ray_local, builtin_cache, tmp_path, stage):
    # Stages 1-3 shard over 2 workers; stage 0 shards nothing, so one worker shows its layout (2-rank
    # ZeRO-0 resumes: test_elastic_resume).
    workers = 1 if stage == 0 else 2

    def cfg_for(steps: int):
        return load_config(None, [f"run.storage={tmp_path}", f"run.name=zero{stage}", f"precision.zero_stage={stage}",
                                  f"scaling.num_workers={workers}", "precision.dtype=bf16",
                                  f"optim.steps={steps}", "checkpoint.every_steps=2", "sampling.every_steps=2",
                                  "run.evaluate=false", *TINY])

    from ray._private.state import state

    before = set(state.actor_table(None))
    out = run_training(cfg_for(2))
    rundir = RunDir.for_config(cfg_for(2))
    assert out.final_step == 2
    # Data without a bad sample: no bad-sample counter was started (data/counter.py), alive or ended.
    started = {a["ActorClassName"] for i, a in state.actor_table(None).items() if i not in before}
    assert "RayTrainWorker" in started and "BadSampleCounter" not in started
    (ref,) = list_checkpoints(rundir)
    files = rundir.listdir(f"{ref.name}/ds")
    # Stage 0 keeps optimizer state inside the model-states file; stages 1-3 shard it per rank.
    expected = {"mp_rank_00_model_states.pt"} if stage == 0 else {
        f"bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(workers)}
    assert expected <= set(files), files
    assert rundir.exists("samples/step_0000002.png")
    # The optimizer state survives the round trip: a resumed run continues at step 3.
    assert run_training(cfg_for(3)).final_step == 3
    assert [r["step"] for r in _metrics(rundir)] == [1, 2, 3]
    assert [r.step for r in list_checkpoints(rundir)] == [2, 3]


def test_training_skips_and_reports_bad_files(ray_local, tmp_path, monkeypatch):
    """A folder with broken files trains to the end; the skips are in metrics and bad_samples.json.
    Relative paths (as a user types them) resolve against the caller's working directory."""
    from orchestrator.data.demo import write_demo_dataset
    from test_data_helpers import huge_png_header

    root = write_demo_dataset(tmp_path / "data", images_per_class=4)
    cls = sorted(p for p in root.iterdir() if p.is_dir())
    (cls[0] / "empty.png").write_bytes(b"")
    (cls[1] / "notes.png").write_text("not an image")
    (cls[2] / "cut.png").write_bytes((cls[2] / "00000.png").read_bytes()[:60])
    (cls[3] / "bomb.png").write_bytes(huge_png_header())
    Image.new("L", (32, 32), 128).save(cls[4] / "gray.png")  # valid, converted to RGB
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["run.storage=runs", "run.name=bad", "data.source=data", "optim.steps=3", "scaling.num_workers=1",
                             "checkpoint.every_steps=3", "sampling.every_steps=3", "run.evaluate=false", *TINY])
    before = _live_actors()
    out = run_training(cfg)
    # Nothing of the run stays in a Ray session that outlives it (the suite's, a sweep's, a
    # notebook's): not its bad-sample counter, not Ray Train's controller (each an idle process).
    assert not _actors_left(before, {"_AutoscalingCoordinatorActor"})  # Ray Data's, one per session
    assert out.final_step == 3
    bad = out.bad_samples
    assert bad.get("empty_file") == 1 and bad.get("not_an_image") == 1
    assert bad.get("truncated", 0) + bad.get("corrupt", 0) == 1
    assert bad.get("decompression_bomb") == 1
    assert bad.get("converted_from_L") == 1
    rundir = RunDir.for_config(cfg)
    assert (tmp_path / "runs" / "bad" / "metrics.jsonl").is_file()
    assert json.loads(rundir.read_text("bad_samples.json")) == bad
    assert _metrics(rundir)[-1]["bad_samples"] == bad
    assert rundir.exists("samples/step_0000003.png")
