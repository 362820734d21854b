"""`raydiff bench sample`: `raydiff sample`'s generation beside a bare loop of the same forward
passes, in one process, one after the other.

The bare loop is the floor: the network alone, called once per sampling step on the doubled
batch that classifier-free guidance needs (conditional and unconditional halves), at the same
precision, with no sampler arithmetic, no guidance combination and no progress bar. raydiff's
side is `generate_batched`, the function `raydiff sample` and `raydiff eval` call. The ratio is
what raydiff adds to the network's own cost (issue 18 asks for at most 1.5x).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from model.conditioning import class_conditioning
from orchestrator.builders import build_denoiser
from orchestrator.config import apply_overrides, config_to_dict, load_config, validate_config
from orchestrator.eval.generate import generate_batched, pick_device
from orchestrator.sampling import at_precision, sample_dtype


def _setup(args: argparse.Namespace):
    """The network and config: a checkpoint's EMA model, or a fresh registry network (the time
    of a forward pass does not depend on the weights)."""
    overrides = [f"sampling.{k}={v}" for k, v in (("num_steps", args.steps), ("precision", args.precision)) if v]
    if args.checkpoint:
        from orchestrator.eval.loading import load_checkpoint

        ck = load_checkpoint(args.checkpoint)
        cfg = validate_config(apply_overrides(config_to_dict(ck.cfg, reveal_secrets=True), overrides))
        return ck.model, cfg, ck.num_classes
    cfg = load_config(None, [f"model.name={args.model}", f"data.channels={args.channels}",
                             f"data.resolution={args.resolution}", *overrides])
    torch.manual_seed(0)
    return build_denoiser(cfg.model, cfg.data, args.classes).eval(), cfg, args.classes


def _bare_loop(model: torch.nn.Module, cfg, cond, num: int, dtype: torch.dtype, device: torch.device,
               steps: int) -> float:
    net = at_precision(model, dtype).to(device).eval()
    side = cfg.data.resolution
    guided = cond is not None and cfg.sampling.guidance_scale != 1.0
    both = cond.cat(cond.null_like()).to(device) if guided else (cond.to(device) if cond is not None else None)
    x = torch.randn(2 * num if guided else num, cfg.data.channels, side, side, device=device)
    t0 = time.perf_counter()
    with torch.no_grad():
        for t in torch.linspace(cfg.diffusion.num_timesteps - 1, 0, steps).long().tolist():
            net(x, torch.full((x.shape[0],), t, device=device), both)
    return time.perf_counter() - t0


def run_sample_bench(args: argparse.Namespace) -> dict[str, Any]:
    device = pick_device(args.device)
    model, cfg, num_classes = _setup(args)
    model = model.to(device)
    dtype = sample_dtype(cfg.sampling.precision, device)
    per = args.per_class
    labels = None if num_classes is None else torch.arange(num_classes).repeat_interleave(per)
    num = per if labels is None else len(labels)
    cond = class_conditioning(labels, num_classes)
    # Untimed: the first forward pass at a batch shape selects and caches its kernels (oneDNN on
    # CPU, cuDNN on GPU); both sides then run warm.
    _bare_loop(model, cfg, cond, num, dtype, device, 1)
    bare = _bare_loop(model, cfg, cond, num, dtype, device, cfg.sampling.num_steps)
    t0 = time.perf_counter()
    generate_batched(model, cfg, cond, num, seed=0, device=device, progress=False)
    ours = time.perf_counter() - t0
    return {"images": num, "steps": cfg.sampling.num_steps, "guidance": cfg.sampling.guidance_scale,
            "precision": str(dtype).removeprefix("torch."), "device": str(device), "model": cfg.model.name,
            "bare_s": bare, "raydiff_s": ours, "ratio": ours / bare}


def format_table(r: dict[str, Any]) -> str:
    return "\n".join([
        f"{r['images']} images, {r['model']}, {r['steps']} steps, guidance {r['guidance']}, "
        f"network in {r['precision']} on {r['device']}",
        f"{'bare loop of the forward passes':34s} {r['bare_s']:8.2f} s",
        f"{'raydiff sample (generate_batched)':34s} {r['raydiff_s']:8.2f} s",
        f"raydiff / bare: {r['ratio']:.2f}x",
    ])


def cmd_bench_sample(args: argparse.Namespace) -> int:
    r = run_sample_bench(args)
    print(format_table(r), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=1))
    return 0
