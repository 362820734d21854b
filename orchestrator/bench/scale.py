"""``raydiff bench scale``: the costs that grow with the dataset and the run, without the data.

A dataset of ``--samples`` samples in ``--units`` WebDataset shards is described by a synthetic
``manifest.json`` (what ``raydiff data upload`` writes; no shard exists), and every phase runs
the code training runs:

* **listing + planning**: ``inspect_dataset`` (listing, format detection, the manifest) and
  ``make_train_reader`` (training units, validation split, the epoch order), as the driver does;
* **per rank, steps 0 and n/2**: each of ``--workers`` ranks, from a fresh copy of the reader
  (as it arrives through the object store), computes the ids of its micro-batch of the epoch's
  first step and of a middle step (``TrainReader.rank_ids``, what ``TrainReader.batches`` reads
  by);
* **resume**: a checkpoint's ``TrainState`` at a random step, saved and loaded as JSON, resumed on
  another world size: every rank's first step, checked to be exactly the global batch the old
  world size trained at that step;
* **log read-back**: a metrics log of ``--parts`` parts on a local S3 server (moto, as
  ``raydiff data serve-s3``), read before and after the compaction a checkpoint does
  (``RunDir.compact_logs``), counting S3 requests.

Each phase prints its time and peak traced memory (``tracemalloc``: Python and numpy
allocations) beside the limits of issue 22, and the process's peak resident memory at the end.
"""

from __future__ import annotations

import argparse
import json
import pickle
import resource
import socket
import sys
import tempfile
import time
import tracemalloc
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

# Limits (issue 22): per rank, order and positions of a step; the whole benchmark.
RANK_LIMIT_S, RANK_LIMIT_MB = 1.0, 100.0
TOTAL_LIMIT_S, RSS_LIMIT_MB = 60.0, 1024.0


@dataclass
class Phase:
    name: str
    seconds: float
    peak_mb: float
    limit: str = ""
    ok: bool = True
    detail: dict[str, Any] = field(default_factory=dict)


@contextmanager
def _measured(out: dict[str, float]) -> Iterator[None]:
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    t0 = time.perf_counter()
    yield
    out["seconds"] = time.perf_counter() - t0
    out["peak_mb"] = max(0, tracemalloc.get_traced_memory()[1] - base) / 2**20


def synthetic_counts(samples: int, units: int, seed: int = 0) -> np.ndarray:
    """``units`` shard sizes that add up to ``samples``, uneven (+-10 % around the mean) like a
    real upload's, so unit boundaries fall anywhere in batches and windows."""
    if units < 1 or samples < units:
        raise ValueError(f"--samples ({samples}) must be at least --units ({units}), which must be at least 1")
    w = np.random.default_rng(seed).uniform(0.9, 1.1, units)
    counts = np.floor(w / w.sum() * samples).astype(np.int64)
    counts[: samples - int(counts.sum())] += 1  # the rounding remainder (fewer than `units`)
    return counts


def write_manifest(root: Path, counts: np.ndarray) -> None:
    """What ``raydiff data upload`` writes: shard names and sample counts (no shard exists)."""
    root.mkdir(parents=True, exist_ok=True)
    shards = [{"name": f"shard-{i:07d}.tar", "num_samples": int(n)} for i, n in enumerate(counts.tolist())]
    (root / "manifest.json").write_text(json.dumps({"format": "webdataset", "shards": shards}))


def _listing_and_planning(source: str, window: int) -> tuple[Phase, Any]:
    from orchestrator.config import DataConfig
    from orchestrator.data import inspect_dataset
    from orchestrator.data.reader import make_train_reader

    cfg = DataConfig(source=source, local_shuffle_buffer=window)
    m: dict[str, float] = {}
    with _measured(m):
        info = inspect_dataset(cfg)
        reader = make_train_reader(cfg, info)
    return Phase("listing + planning", m["seconds"], m["peak_mb"],
                 detail={"units": len(reader.order.counts), "samples": reader.total}), reader


def _per_rank(reader: Any, *, batch: int, workers: int, epoch: int) -> tuple[Phase, np.ndarray]:
    """Every rank's ids for steps 0 and n/2, each rank from its own copy of the reader (unpickled,
    as ``ray.get`` gives it: no epoch layout cached). Returns the global batches of both steps."""
    blob = pickle.dumps(reader)
    n = reader.steps_per_epoch(batch)
    mid = n // 2
    times, peaks, got = [], [], []
    for rank in range(workers):
        r = pickle.loads(blob)
        m: dict[str, float] = {}
        with _measured(m):
            ids = [r.rank_ids(epoch, 0, global_batch=batch, world=workers, rank=rank, first_step=s, steps=1)[0]
                   for s in (0, mid)]
        times.append(m["seconds"])
        peaks.append(m["peak_mb"])
        got.append(np.stack(ids))
        del r
    worst_s, worst_mb = max(times), max(peaks)
    phase = Phase(f"per rank: steps 0 and {mid} of {n}", worst_s, worst_mb,
                  f"< {RANK_LIMIT_S:g} s, < {RANK_LIMIT_MB:g} MB per rank",
                  worst_s < RANK_LIMIT_S and worst_mb < RANK_LIMIT_MB,
                  {"ranks": workers, "mean_s": float(np.mean(times)), "all_ranks_s": float(np.sum(times)),
                   "reader_pickle_mb": len(blob) / 2**20})
    return phase, np.concatenate(got, axis=1)  # [2, batch]: the global batches of steps 0 and mid


def _resume(reader: Any, *, batch: int, workers: int, new_workers: int, epoch: int, seed: int) -> Phase:
    """A checkpoint at a random step of the epoch, resumed on ``new_workers``: each new rank's first
    step after it, concatenated, must be the old world's global batch at that step."""
    from orchestrator.data.position import ORDER_VERSION
    from orchestrator.train.state import TrainState

    n = reader.steps_per_epoch(batch)
    step = int(np.random.default_rng(seed).integers(1, n))
    saved = TrainState(step=step, samples_seen=step * batch, epoch=epoch, batch_in_epoch=step,
                       samples_in_epoch=step * batch, data_order=ORDER_VERSION)
    state_json = json.dumps(saved.as_dict())
    blob = pickle.dumps(reader)
    old = np.concatenate([reader.rank_ids(epoch, step * batch, global_batch=batch, world=workers, rank=r,
                                          first_step=0, steps=1)[0] for r in range(workers)])
    times, peaks, new = [], [], []
    for rank in range(new_workers):
        r = pickle.loads(blob)
        m: dict[str, float] = {}
        with _measured(m):
            s = TrainState(**json.loads(state_json))
            ids = r.rank_ids(s.epoch, s.epoch_position(batch), global_batch=batch, world=new_workers, rank=rank,
                             first_step=0, steps=1, order_version=s.order_version(batch))[0]
        times.append(m["seconds"])
        peaks.append(m["peak_mb"])
        new.append(ids)
        del r
    exact = bool(np.array_equal(np.concatenate(new), old))
    worst_s, worst_mb = max(times), max(peaks)
    return Phase(f"resume at step {step}: {workers} -> {new_workers} ranks", worst_s, worst_mb,
                 f"< {RANK_LIMIT_S:g} s, < {RANK_LIMIT_MB:g} MB per rank; exact",
                 exact and worst_s < RANK_LIMIT_S and worst_mb < RANK_LIMIT_MB,
                 {"exact": exact, "state_bytes": len(state_json), "mean_s": float(np.mean(times))})


def _log_readback(parts: int) -> list[Phase]:
    """``parts`` metrics parts on a local moto server, read back before and after compaction."""
    from orchestrator.config import S3Config
    from orchestrator.storage.clients import s3_client
    from orchestrator.storage.files import write_bytes
    from orchestrator.storage.jsonl import PARTS_SUFFIX, part_name, read_records
    from orchestrator.storage.local_server import moto_s3_server_class
    from orchestrator.storage.rundir import METRICS_LOG, RunDir
    from orchestrator.storage.uri import join

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = moto_s3_server_class()(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        cfg = S3Config(endpoint_url=f"http://127.0.0.1:{port}", region="us-east-1",
                       access_key_id="testing", secret_access_key="testing")  # moto's dummy keys
        client = s3_client(cfg)
        bucket = f"raydiff-bench-scale-{uuid.uuid4().hex[:8]}"  # moto's store is per process, not per server
        client.create_bucket(Bucket=bucket)
        run = f"s3://{bucket}/runs/long"
        prefix = join(run, f"{METRICS_LOG}{PARTS_SUFFIX}")
        t0 = time.time_ns()
        with ThreadPoolExecutor(8) as pool:  # parts as JsonlLog flushes them, one record each
            list(pool.map(lambda i: write_bytes(join(prefix, part_name(t0 + i, 1)),
                                                json.dumps({"step": i + 1, "loss": 0.1}).encode() + b"\n", cfg),
                          range(parts)))
        requests: list[str] = []

        def count(**_: Any) -> None:
            requests.append("")

        client.meta.events.register("before-send.s3", count)
        out = []
        for name, action in (("log read-back, not compacted", None), ("compaction (a checkpoint)", "compact"),
                             ("log read-back, compacted", None)):
            requests.clear()
            m: dict[str, float] = {}
            with _measured(m):
                if action:
                    RunDir(run, cfg).compact_logs()
                else:
                    n = len(read_records(run, METRICS_LOG, cfg))
            ok = action is not None or n == parts
            detail = {"requests": len(requests), "parts": parts}
            limit = "< 100 requests" if name.endswith(", compacted") else ""
            if limit:
                ok = ok and len(requests) < 100
            out.append(Phase(name, m["seconds"], m["peak_mb"], limit, ok, detail))
        client.meta.events.unregister("before-send.s3", count)
        return out
    finally:
        server.stop()


def run_bench(*, samples: int, units: int, workers: int, batch: int, parts: int, window: int = 512,
              resume_workers: int | None = None, seed: int = 0) -> dict[str, Any]:
    if batch % workers:
        raise ValueError(f"--batch {batch} is not divisible by --workers {workers}")
    new_workers = resume_workers or max(1, workers // 2)
    if batch % new_workers:
        raise ValueError(f"--batch {batch} is not divisible by --resume-workers {new_workers}")
    t_start = time.perf_counter()
    tracemalloc.start()
    try:
        with tempfile.TemporaryDirectory(prefix="raydiff-bench-scale-") as tmp:
            m: dict[str, float] = {}
            with _measured(m):
                counts = synthetic_counts(samples, units, seed)
                write_manifest(Path(tmp) / "data", counts)
            phases = [Phase("synthetic manifest (not training)", m["seconds"], m["peak_mb"],
                            detail={"bytes": (Path(tmp) / "data" / "manifest.json").stat().st_size})]
            plan, reader = _listing_and_planning(str(Path(tmp) / "data"), window)
            phases.append(plan)
        epoch = 3
        if reader.steps_per_epoch(batch) < 2:
            raise ValueError(f"--samples {samples} hold fewer than 2 batches of --batch {batch}")
        rank_phase, _ = _per_rank(reader, batch=batch, workers=workers, epoch=epoch)
        phases.append(rank_phase)
        phases.append(_resume(reader, batch=batch, workers=workers, new_workers=new_workers, epoch=epoch, seed=seed))
        del reader
        if parts:
            phases += _log_readback(parts)
    finally:
        tracemalloc.stop()
    total_s = time.perf_counter() - t_start
    rss_mb = peak_rss_mb()
    return {"samples": samples, "units": units, "workers": workers, "batch": batch, "parts": parts,
            "window": window, "phases": [asdict(p) for p in phases], "total_s": total_s, "peak_rss_mb": rss_mb,
            "ok": all(p.ok for p in phases) and total_s < TOTAL_LIMIT_S and rss_mb < RSS_LIMIT_MB}


def peak_rss_mb() -> float:
    """This process's peak resident memory. On Linux /proc's VmHWM, of this process's memory
    only: ``ru_maxrss`` there keeps the parent's resident memory at the fork (a benchmark started
    from a 1.5 GB process read 1,511 MB against VmHWM's 11 MB). ``ru_maxrss`` elsewhere (bytes on
    macOS)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**10  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 2**10)


def format_results(res: dict[str, Any]) -> str:
    lines = [f"raydiff bench scale: {res['samples']:,} samples in {res['units']:,} units, {res['workers']} workers, "
             f"global batch {res['batch']}, shuffle window {res['window']}, {res['parts']:,} log parts",
             f"{'phase':46s} {'time':>9s} {'peak MB':>8s}  limit", "-" * 96]
    for p in res["phases"]:
        extra = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in p["detail"].items())
        mark = "" if not p["limit"] else ("ok" if p["ok"] else "OVER")
        lines.append(f"{p['name']:46s} {p['seconds']:8.3f}s {p['peak_mb']:8.1f}  {p['limit']} {mark}".rstrip()
                     + (f"\n{'':46s}   {extra}" if extra else ""))
    lines.append("-" * 96)
    lines.append(f"{'whole benchmark':46s} {res['total_s']:8.1f}s {res['peak_rss_mb']:8.0f}  "
                 f"< {TOTAL_LIMIT_S:g} s, peak RSS < {RSS_LIMIT_MB:g} MB {'ok' if res['ok'] else 'OVER'}")
    return "\n".join(lines)


def cmd_bench_scale(args: argparse.Namespace) -> int:
    from orchestrator.config import ConfigError

    try:
        res = run_bench(samples=args.samples, units=args.units, workers=args.workers, batch=args.batch,
                        parts=args.parts, window=args.window, resume_workers=args.resume_workers, seed=args.seed)
    except ValueError as e:
        raise ConfigError(f"{e}. Fix: change the bench's options") from None
    print(format_results(res), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 0 if res["ok"] else 1
