"""Issue 8, exact data position: a run interrupted mid-epoch (every worker process exits hard
after a step, RAYDIFF_FAULT_EXIT_AT_STEP) and resumed by running it again trains on the same
multiset of samples per epoch as an uninterrupted run, at sample granularity: an image folder on
local disk with 2 workers (decoded cache; resumed on 1 worker) and WebDataset shards on the local S3 server with 1
worker (streamed, each epoch read again). Samples are recorded by RAYDIFF_RECORD_SAMPLE_IDS.

The uninterrupted run's multiset is known without running it: 40 samples and a global batch of
8 make 5 full batches per epoch, so every sample exactly once (checked against the listing, not
against this code's own order). Two Ray runs per case instead of three keep the file short."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import pytest
from ray.exceptions import ActorDiedError
from ray.train import WorkerGroupError
from ray.train.v2._internal.exceptions import WorkerHealthCheckFailedError

from orchestrator.config import load_config
from orchestrator.data.demo import write_demo_dataset
from orchestrator.data.upload import upload
from orchestrator.storage import RunDir
from orchestrator.train.checkpoint.layout import checkpoint_dir_name, list_checkpoints
from orchestrator.train.driver import run_training
from orchestrator.train.failure import TrainingFailed
from orchestrator.train.faults import EXIT_ENV, RECORD_ENV

pytestmark = pytest.mark.slow

# 40 images, global batch 8: 5 steps per epoch, 2 epochs; checkpoints every 2 steps. The
# interrupted run stops after step 7 (epoch 1): it resumes from step 6 (epoch 1, 8 samples in) or,
# if that checkpoint had not been persisted yet, step 4 (epoch 0, 32 samples in): mid-epoch both.
TINY = [
    "model.name=unet-tiny", "data.builtin_images_per_class=4", "data.resolution=16", "data.local_shuffle_buffer=12",
    "optim.batch_size=8", "optim.steps=10", "optim.warmup_steps=2", "checkpoint.every_steps=2",
    "logging.every_steps=5", "logging.progress=false", "sampling.every_steps=1000", "sampling.num_steps=2",
    "sampling.per_class=1", "sampling.max_rows=2", "run.evaluate=false", "run.max_failures=0",
]


def _records(record_dir: Path, skip: dict[int, int] | None = None) -> list[dict]:
    """The recorded lines in file order per rank, without the first ``skip[rank]`` of each."""
    out = []
    for f in sorted(record_dir.glob("rank*.jsonl")):
        lines = [json.loads(line) for line in f.read_text().splitlines()]
        out += lines[(skip or {}).get(lines[0]["rank"], 0):] if lines else []
    return out


def _by_step(records: list[dict]) -> dict[int, tuple[int, list[str]]]:
    """step -> (epoch, sorted ids of all ranks' micro-batches)."""
    out: dict[int, tuple[int, list[str]]] = {}
    for r in records:
        epoch, ids = out.get(r["step"], (r["epoch"], []))
        out[r["step"]] = (epoch, sorted(ids + r["ids"]))
    return out


def _seen(before: list[dict], after: list[dict]) -> dict[int, Counter[str]]:
    """Per epoch, the multiset of sample ids trained on; a step redone after the resume counts
    once, as the resumed run trained it (as metrics.jsonl keeps the redone step's record)."""
    steps = {**_by_step(before), **_by_step(after)}
    out: dict[int, Counter[str]] = {}
    for epoch, ids in steps.values():
        out.setdefault(epoch, Counter()).update(ids)
    return out


def _check_fault_exit(error: WorkerGroupError, records: list[dict], step: int) -> None:
    """The run failed because its workers exited at the injected fault, nothing else: Ray Train's
    health check found each failed worker's process dead (``os._exit`` reports no exception, a
    raised error would be a user error instead), and every rank's last trained step is the fault's.
    (The hook's printed line is not checked: where a worker's stdout lands depends on which Ray
    the run uses; Ray Train's structured worker log, named in the error, does not always hold it.)"""
    assert error.worker_failures, error
    for rank, failure in error.worker_failures.items():
        assert isinstance(failure, WorkerHealthCheckFailedError), (rank, failure)
        assert isinstance(failure.health_check_failure, ActorDiedError), (rank, failure)
        assert "its worker process has died" in str(failure.health_check_failure), (rank, failure)
    last = {}
    for r in records:
        last[r["rank"]] = max(last.get(r["rank"], 0), r["step"])
    assert last and set(last.values()) == {step}, last


def _interrupted_run(common: list[str], tmp_path: Path, monkeypatch, all_ids: list[str],
                     resume_overrides: tuple[str, ...] = ()) -> RunDir:
    """Train until every worker exits after step 7, run the same command again (it resumes mid-
    epoch), and check what was trained on: with 40 samples and a global batch of 8, an
    uninterrupted run trains on every sample exactly once per epoch (5 full batches), so that is
    the multiset each epoch must have. The redone steps must also train on the same samples as
    before the interruption (whatever the world size of the resumed run)."""
    record = tmp_path / "ids"
    monkeypatch.setenv(RECORD_ENV, str(record))
    monkeypatch.setenv(EXIT_ENV, "7")
    cfg = load_config(None, [*common, "run.name=cut"])
    # One line naming the failure (train/failure.py), caused by Ray Train's worker-group error.
    with pytest.raises(TrainingFailed) as failed:
        run_training(cfg)
    assert isinstance(failed.value.__cause__, WorkerGroupError)
    before = _records(record)
    _check_fault_exit(failed.value.__cause__, before, step=7)
    assert max(r["step"] for r in before) == 7
    monkeypatch.delenv(EXIT_ENV)
    # The same command again (possibly on another number of workers): resumes.
    assert run_training(load_config(None, [*common, "run.name=cut", *resume_overrides])).final_step == 10

    resumed = [e for e in RunDir.for_config(cfg).events() if e["event"] == "resumed"]
    assert len(resumed) == 1 and resumed[0]["step"] in (4, 6), resumed
    assert resumed[0]["samples_in_epoch"] > 0  # mid-epoch
    after = _records(record, skip=Counter(r["rank"] for r in before))
    assert min(r["step"] for r in after) == resumed[0]["step"] + 1
    redone = {step: v for step, v in _by_step(after).items() if step <= 7}
    assert redone and redone == {step: v for step, v in _by_step(before).items() if step in redone}
    seen = _seen(before, after)
    assert sorted(seen) == [0, 1]
    for epoch in (0, 1):
        assert seen[epoch] == Counter(all_ids), f"epoch {epoch}: extra {seen[epoch] - Counter(all_ids)}, missing {Counter(all_ids) - seen[epoch]}"
    return RunDir.for_config(cfg)


def test_image_folder_two_workers_cached_resumed_on_one(ray_local, tmp_path, monkeypatch):
    """Also the elastic case: the 2-worker run resumes on 1 worker, which takes both slices."""
    monkeypatch.setenv("RAYDIFF_CACHE_DIR", str(tmp_path / "cache"))
    common = [f"run.storage={tmp_path / 'runs'}", "scaling.num_workers=2", "checkpoint.keep=5", *TINY]
    # The built-in set's files (the run writes the same set into its cache).
    root = write_demo_dataset(tmp_path / "expected", images_per_class=4, resolution=16)
    run = _interrupted_run(common, tmp_path, monkeypatch, sorted(p.relative_to(root).as_posix() for p in root.rglob("*.png")),
                           resume_overrides=("scaling.num_workers=1",))
    # The ZeRO-2 state (the CPU default) was re-sharded: the checkpoint resumed from holds 2
    # optimizer shards, the last one 1, and Adam's step counter in every shard and parameter
    # group counts every step of the run (an optimizer restarted fresh on the resume would count
    # only the steps since). keep=5 keeps the 2-worker checkpoints for this.
    from checkpoint_factory import adam_steps

    resumed_at = [e for e in run.events() if e["event"] == "resumed"][0]["step"]
    last = list_checkpoints(run)[-1]
    before, after = Path(run.uri) / checkpoint_dir_name(resumed_at), Path(run.uri) / last.name
    assert last.step == 10 and json.loads(run.read_text(f"{last.name}/model.json"))["world_size"] == 1
    assert len(list((before / "ds").glob("*_optim_states.pt"))) == 2
    assert len(list((after / "ds").glob("*_optim_states.pt"))) == 1
    assert set(adam_steps(before)) == {resumed_at}
    assert set(adam_steps(after)) == {10}


def test_webdataset_on_s3_one_worker_streamed(ray_local, s3_server, tmp_path, monkeypatch):
    bucket = s3_server.create_bucket("raydiff-exact")
    demo = write_demo_dataset(tmp_path / "demo", images_per_class=4, resolution=16)
    # Shards of 7 (the last one holds 5): batches and shuffle windows cross shard boundaries.
    manifest = upload(str(demo), f"s3://{bucket}/shapes", shard_size=("samples", 7), s3cfg=s3_server.s3_config(),
                      progress=False, out=open(os.devnull, "w"))
    common = [f"run.storage={tmp_path / 'runs'}", f"data.source=s3://{bucket}/shapes",
              f"storage.s3.endpoint_url={s3_server.endpoint_url}", f"storage.s3.region={s3_server.region}",
              "data.cache_max_bytes=0", "scaling.num_workers=1", *TINY]
    ids = [f"{s['name']}#{j}" for s in manifest["shards"] for j in range(s["num_samples"])]
    assert len(ids) == 40
    _interrupted_run(common, tmp_path, monkeypatch, ids)
