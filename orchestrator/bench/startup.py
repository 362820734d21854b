"""``raydiff bench startup``: time to first step of a fresh run, by phase, beside a plain loop's.

Both are measured from the moment a new process is spawned, as a user waits for them:

* the plain loop: a new Python process imports torch, builds the same registry network, an AdamW
  optimizer and one batch of the same size, and takes one optimizer step (what a hand-written
  script pays before it trains);
* raydiff: ``raydiff train`` with a new run name, two steps (the first is not the last, whose
  checkpoint and grid would count), no evaluation; its phases come from
  the run's ``events.jsonl`` (train/startup.py), with the process's own start (interpreter and
  imports, up to the driver's ``started`` event) as the first phase.

Runs are sequential and repeated (``--repeats``), so the two are measured side by side on the
same machine and load; the table prints each phase's median.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from orchestrator.storage.jsonl import read_records
from orchestrator.storage.rundir import EVENTS_LOG
from orchestrator.train.startup import startup_breakdown

# The plain loop, run with ``python -c``: argv = model, channels, resolution, batch. Unconditional
# (a class embedding does not change what start-up costs), so it needs no conditioning object.
_PLAIN = """
import json, sys, time
t = {"interpreter": time.time()}
import torch
t["import_torch"] = time.time()
from model.registry import build_model
name, c, r, b = sys.argv[1], *map(int, sys.argv[2:])
net = build_model(name, in_channels=c, image_size=r, num_classes=None)
opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
x, tt = torch.randn(b, c, r, r), torch.randint(0, 1000, (b,))
t["build"] = time.time()
loss = torch.nn.functional.mse_loss(net(x, tt, None), x)
loss.backward()
opt.step()
t["first_step"] = time.time()
print("PLAIN " + json.dumps(t), flush=True)
"""


def _plain_once(model: str, channels: int, resolution: int, batch: int) -> dict[str, float]:
    t0 = time.time()
    out = subprocess.run([sys.executable, "-c", _PLAIN, model, str(channels), str(resolution), str(batch)],
                         capture_output=True, text=True, check=True)
    marks = json.loads(next(line for line in out.stdout.splitlines() if line.startswith("PLAIN "))[6:])
    phases, prev = {}, t0
    for name, at in marks.items():
        phases[name] = at - prev
        prev = at
    return phases


def _raydiff_once(storage: Path, name: str, overrides: list[str]) -> tuple[dict[str, float], float]:
    t0 = time.time()
    cmd = [sys.executable, "-m", "orchestrator", "train", f"run.name={name}", f"run.storage={storage}",
           "optim.steps=2", "run.evaluate=false", "checkpoint.every_steps=1000", "sampling.every_steps=1000",
           "logging.progress=false", *overrides]
    out = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.time() - t0
    if out.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` exited {out.returncode}:\n{(out.stdout + out.stderr)[-3000:]}")
    events = read_records(str(storage / name), EVENTS_LOG)
    started = next(float(e["time"]) for e in events if e.get("event") == "started")
    phases = {"process_start": started - t0, **dict(startup_breakdown(events))}
    return phases, wall


def _median(runs: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def run_startup_bench(args: argparse.Namespace) -> dict[str, Any]:
    from orchestrator.config import load_config

    cfg = load_config(None, list(args.overrides))
    batch = cfg.optim.batch_size
    plain, ray_runs, walls = [], [], []
    with tempfile.TemporaryDirectory(prefix="raydiff-bench-startup-") as tmp:
        for i in range(args.repeats):
            plain.append(_plain_once(cfg.model.name, cfg.data.channels, cfg.data.resolution, batch))
            phases, wall = _raydiff_once(Path(tmp), f"startup-{i}", list(args.overrides))
            ray_runs.append(phases)
            walls.append(wall)
    result = {"plain": _median(plain), "raydiff": _median(ray_runs), "raydiff_command_s": statistics.median(walls),
              "repeats": args.repeats, "model": cfg.model.name, "batch": batch}
    result["plain_total_s"] = sum(result["plain"].values())
    result["raydiff_total_s"] = sum(result["raydiff"].values())
    return result


def format_table(r: dict[str, Any]) -> str:
    lines = [f"time to first step, median of {r['repeats']} (model {r['model']}, batch {r['batch']}), seconds",
             f"{'phase':<26}{'plain loop':>12}{'raydiff':>12}"]
    for k, v in r["plain"].items():
        lines.append(f"{'plain: ' + k:<26}{v:>12.1f}{'':>12}")
    for k, v in r["raydiff"].items():
        lines.append(f"{'raydiff: ' + k:<26}{'':>12}{v:>12.1f}")
    lines.append(f"{'total':<26}{r['plain_total_s']:>12.1f}{r['raydiff_total_s']:>12.1f}")
    lines.append(f"raydiff / plain: {r['raydiff_total_s'] / r['plain_total_s']:.1f}x; whole `raydiff train` command "
                 f"(2 steps, the last one's checkpoint and grid, shutdown): {r['raydiff_command_s']:.1f} s")
    return "\n".join(lines)


def cmd_bench_startup(args: argparse.Namespace) -> int:
    r = run_startup_bench(args)
    print(format_table(r), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=1))
    return 0
