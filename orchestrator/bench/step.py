"""``raydiff bench step``: raydiff's training step against the loop a careful user writes.

In one process and one run, on identical random data (4 batches rotated):

- ``plain``: the reference loop on the same registry network: fp32 weights, ``torch.autocast``
  (fp16 on GPU, bf16 on CPUs with bf16 units), ``GradScaler`` for fp16, ``AdamW`` (fused on
  GPU), gradient clipping 1.0, eps-MSE; ``plain-compiled`` is the same with
  ``torch.compile(model)``.
- ``raydiff``: ``TrainStep`` exactly as ``raydiff train`` builds it (DeepSpeed engine, precision,
  ZeRO stage and mixed-precision mode from the plan, the objective, EMA, the metrics window
  flushed every 10 steps); ``raydiff-compiled`` adds ``precision.compile=true``.
- ``raydiff-ray``: the same step inside a one-worker Ray Train run fed by Ray Data.

Printed per variant: images/s, ratio to the plain eager loop (and to the compiled one), MFU
against a half-precision matmul rate measured in the same run, peak GPU memory and time to the
first step. Ratios are what to compare across machines; absolute rates drift.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import socket
from dataclasses import asdict
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile

from model.conditioning import ClassLabels
from orchestrator.bench.timing import Result, sync
from orchestrator.builders import build_denoiser
from orchestrator.config import DataConfig, TrainConfig, load_config
from orchestrator.plan import Plan, make_plan

ROTATE = 4  # distinct batches, reused round-robin


def make_batches(data: DataConfig, batch: int, num_classes: int, device: torch.device, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    c, r = data.channels, data.resolution
    return [{"image": (torch.rand(batch, c, r, r, generator=g) * 2 - 1).to(device),
             "label": torch.randint(0, num_classes, (batch,), generator=g).to(device)} for _ in range(ROTATE)]


PROFILE_STEPS = 5


def _timed(step: Callable[[int], Any], *, warmup: int, steps: int, batch: int, device: torch.device,
           t_build: float, profile: str | None = None) -> tuple[float, float]:
    """Runs ``step(i)`` for warm-up then timed steps; returns (images/s, seconds to first step).
    With ``profile`` (a label), a few more steps run under torch.profiler afterwards and the
    busiest operators are printed: where the time goes, outside the timed window."""
    step(0)
    sync(device)
    first = time.perf_counter() - t_build
    for i in range(1, warmup):
        step(i)
    sync(device)
    t0 = time.perf_counter()
    for i in range(steps):
        step(warmup + i)
    sync(device)
    rate = batch * steps / (time.perf_counter() - t0)
    if profile:
        print_profile(profile, lambda i: step(warmup + steps + i), device)
    return rate, first


def print_profile(label: str, step: Callable[[int], Any], device: torch.device, out=None) -> None:
    out = out or sys.stdout
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        for i in range(PROFILE_STEPS):
            step(i)
        sync(device)
    wall = (time.perf_counter() - t0) / PROFILE_STEPS
    events = prof.key_averages()
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    busy = sum(getattr(e, key) for e in events) / 1e6 / PROFILE_STEPS
    print(f"--- profile {label}: {wall * 1e3:.1f} ms/step wall, {busy * 1e3:.1f} ms/step "
          f"{'GPU busy' if device.type == 'cuda' else 'CPU self time'}", file=out)
    print(events.table(sort_by=key, row_limit=12, max_name_column_width=60), file=out)
    if device.type == "cuda":
        print(events.table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=60), file=out)


def _autocast_dtype(plan: Plan) -> torch.dtype | None:
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(plan.precision)


def plain_loop(cfg: TrainConfig, plan: Plan, batches: list[dict], device: torch.device, *, num_classes: int,
               compile: bool, warmup: int, steps: int, profile: bool = False) -> Result:
    """The hand-written reference (see the module docstring)."""
    t_build = time.perf_counter()
    torch.manual_seed(cfg.seed)
    model = build_denoiser(cfg.model, cfg.data, num_classes).to(device)
    fwd = torch.compile(model) if compile else model
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, fused=device.type == "cuda")
    dtype = _autocast_dtype(plan)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    alphas = torch.linspace(0.9999, 0.02, cfg.diffusion.num_timesteps, device=device)

    conds = [ClassLabels(b["label"], num_classes) for b in batches]  # built once, outside the timed step

    def step(i: int) -> None:
        b = batches[i % ROTATE]
        x0, y = b["image"], conds[i % ROTATE]
        t = torch.randint(0, cfg.diffusion.num_timesteps, (x0.shape[0],), device=device)
        noise = torch.randn_like(x0)
        a = alphas[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            out = fwd(xt, t, y)
        loss = torch.nn.functional.mse_loss(out.float(), noise)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        scaler.step(opt)
        scaler.update()

    name = "plain-compiled" if compile else "plain"
    _reset_peak(device)
    rate, first = _timed(step, warmup=warmup, steps=steps, batch=x_batch(batches), device=device, t_build=t_build,
                         profile=name if profile else None)
    return Result(name, rate, first, _peak(device), steps, x_batch(batches))


def raydiff_step(cfg: TrainConfig, plan: Plan, batches: list[dict], device: torch.device, *, num_classes: int,
                 warmup: int, steps: int, name: str = "raydiff", sync_check: bool = False,
                 profile: bool = False) -> Result:
    """``TrainStep`` plus the metrics window, as the Ray Train worker runs them."""
    from orchestrator.train.metrics import MetricsWindow
    from orchestrator.train.state import TrainState
    from orchestrator.train.step import TrainStep

    t_build = time.perf_counter()
    ts = TrainStep(cfg, plan, num_classes, device=device)
    window = MetricsWindow(cfg.diffusion.loss_bins, ts.objective.num_timesteps, device)
    state = TrainState()

    def step(i: int) -> None:
        out = ts.step(batches[i % ROTATE], i)
        state.step += 1
        window.add(out, out.t.shape[0], 0.0)
        if state.step % cfg.logging.every_steps == 0:
            window.flush(ts.engine, state, ts.grad_norm)

    _reset_peak(device)
    rate, first = _timed(step, warmup=warmup, steps=steps, batch=x_batch(batches), device=device, t_build=t_build,
                         profile=name if profile else None)
    note = f"ZeRO {plan.zero_stage}, {plan.precision} {'autocast' if plan.autocast else 'engine'}"
    if sync_check and device.type == "cuda":
        note += "; " + host_sync_check(ts, window, batches[0])
    return Result(name, rate, first, _peak(device), steps, x_batch(batches), note)


def host_sync_check(ts, window, batch: dict) -> str:
    """Run raydiff's part of a step (random draws, flip, objective, forward, metrics window)
    under ``torch.cuda.set_sync_debug_mode("error")``: any host read of a GPU value raises.
    DeepSpeed's backward/optimizer step is outside: its fp16 overflow check reads one flag by
    design (as torch's GradScaler does)."""
    g = ts.generator(0)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        x0 = ts._flip(batch["image"], g)
        cond = ClassLabels(batch["label"], ts.num_classes) if ts.num_classes is not None else None
        out = ts.objective.training_losses(ts._forward, x0, cond, generator=g)
        window.add(out, x0.shape[0], 0.0)
        verdict = "no host sync in raydiff's step code"
    except RuntimeError as e:
        verdict = f"HOST SYNC: {str(e).splitlines()[0]}"
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return verdict


def x_batch(batches: list[dict]) -> int:
    return int(batches[0]["image"].shape[0])


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def flops_per_image(cfg: TrainConfig, num_classes: int, device: torch.device) -> float:
    """Forward + backward FLOPs of one image, counted by torch's FlopCounterMode on a batch of 2."""
    from torch.utils.flop_counter import FlopCounterMode  # not loaded by the rest of the CLI

    model = build_denoiser(cfg.model, cfg.data, num_classes).to(device)
    c, r = cfg.data.channels, cfg.data.resolution
    x = torch.randn(2, c, r, r, device=device)
    t = torch.randint(0, cfg.diffusion.num_timesteps, (2,), device=device)
    y = ClassLabels(torch.randint(0, num_classes, (2,), device=device), num_classes)
    with FlopCounterMode(display=False) as fc:
        model(x, t, y).float().pow(2).mean().backward()
    return fc.get_total_flops() / 2


def matmul_rate(device: torch.device, dtype: torch.dtype) -> float:
    """Dense matmul FLOP/s of this device in ``dtype`` (8192^3 on GPU, 1024^3 on CPU)."""
    n, reps = (8192, 20) if device.type == "cuda" else (1024, 5)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def init_single_process_group(device: torch.device) -> None:
    """A one-process torch.distributed group (Ray Train makes the real one): DeepSpeed needs it."""
    if dist.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if device.type == "cuda" else "cpu")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1,
                            device_id=device if device.type == "cuda" else None)


def bench_config(model: str, batch: int, latent: bool, overrides: list[str]) -> TrainConfig:
    base = [f"model.name={model}", f"optim.batch_size={batch}", "scaling.num_workers=1", "optim.warmup_steps=0"]
    cfg = load_config(None, [*base, *overrides])
    if latent:
        # 4x32x32 latents (SD VAE at 256 px): the DiT-XL/2 setting of the reference numbers.
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"channels": 4})})
    return cfg


def run_bench(model: str, batch: int, *, steps: int, warmup: int, compile: bool = False, ray: bool = True,
              latent: bool = False, num_classes: int = 10, overrides: list[str] = (), sync_check: bool = True,
              profile: bool = False, out=None) -> dict[str, Any]:
    out = out or sys.stdout
    cfg = bench_config(model, batch, latent, list(overrides))
    plan = make_plan(cfg)
    device = torch.device("cuda", 0) if plan.device == "gpu" else torch.device("cpu")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    init_single_process_group(device)
    batches = make_batches(cfg.data, batch, num_classes, device)
    half = _autocast_dtype(plan) or torch.float32
    rate = matmul_rate(device, half)
    flops = flops_per_image(cfg, num_classes, device)
    common = {"num_classes": num_classes, "warmup": warmup, "steps": steps, "profile": profile}
    results = [plain_loop(cfg, plan, batches, device, compile=False, **common)]
    if compile:
        results.append(plain_loop(cfg, plan, batches, device, compile=True, **{**common, "profile": False}))
    results.append(raydiff_step(cfg, plan, batches, device, sync_check=sync_check, **common))
    if compile:
        ccfg = cfg.model_copy(update={"precision": cfg.precision.model_copy(update={"compile": True})})
        results.append(raydiff_step(ccfg, plan, batches, device, name="raydiff-compiled", **{**common, "profile": False}))
    if ray:
        from orchestrator.bench.step_ray import raydiff_in_ray_train

        results.append(raydiff_in_ray_train(cfg, plan, num_classes=num_classes, warmup=warmup, steps=steps))
    report = {
        "model": model, "batch": batch, "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "precision": plan.precision, "matmul_tflops": rate / 1e12,
        "train_gflop_per_image": flops / 1e9, "results": [asdict(r) for r in results],
        "date": time.strftime("%Y-%m-%d"),
    }
    print_table(report, out)
    return report


def print_table(report: dict[str, Any], out) -> None:
    res = report["results"]
    base = next(r for r in res if r["variant"] == "plain")["images_per_s"]
    comp = next((r["images_per_s"] for r in res if r["variant"] == "plain-compiled"), None)
    flops, rate = report["train_gflop_per_image"] * 1e9, report["matmul_tflops"] * 1e12
    print(f"{report['model']} batch {report['batch']} on {report['device']} (torch {report['torch']}, "
          f"{report['precision']}); {report['train_gflop_per_image']:.1f} GFLOP/img fwd+bwd; "
          f"matmul {report['matmul_tflops']:.2f} TFLOP/s", file=out)
    print(f"{'variant':<18}{'img/s':>10}{'x eager':>9}{'x compiled':>12}{'MFU':>7}{'peak GiB':>10}{'1st step s':>12}  note",
          file=out)
    for r in res:
        x_comp = f"{r['images_per_s'] / comp:.2f}" if comp else "-"
        mem = f"{r['peak_mem_gib']:.1f}" if r["peak_mem_gib"] is not None else "-"
        mfu = r["images_per_s"] * flops / rate
        print(f"{r['variant']:<18}{r['images_per_s']:>10.1f}{r['images_per_s'] / base:>9.2f}{x_comp:>12}"
              f"{mfu:>7.1%}{mem:>10}{r['first_step_s']:>12.1f}  {r['note']}", file=out)


def cmd_bench_step(args: argparse.Namespace) -> int:
    cuda = torch.cuda.is_available()
    steps = args.steps or (40 if cuda else 3)
    warmup = args.warmup or (10 if cuda else 1)
    report = run_bench(args.model, args.batch, steps=steps, warmup=warmup, compile=args.compile, ray=not args.no_ray,
                       latent=args.latent, overrides=args.overrides, profile=args.profile)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0
