"""`raydiff bench ...`: the benchmarks' arguments, with each benchmark imported only when it runs.

The benchmarks import torch, diffusers and Ray at module level; defining their arguments here
keeps those imports out of every other command's start-up (issue 18) and out of `--help`.
"""

from __future__ import annotations

import argparse
from typing import Any

from model.choices import MODEL_NAMES
from orchestrator.bench.quality_arms import ARMS
from orchestrator.cli.lazy import handler
from orchestrator.storage.flags import add_s3_args


def register(sub: Any) -> None:
    bench = sub.add_parser("bench", help="benchmarks that print ratios measured side by side")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True, metavar="BENCH")
    for add in (_data, _step, _startup, _sample, _quality):
        add(bench_sub)


def _data(bench_subparsers: Any) -> argparse.ArgumentParser:
    p = bench_subparsers.add_parser("data", help="input pipeline images/s per core vs a plain PIL loop")
    p.add_argument("uri", metavar="URI", help="dataset (local path or s3://...)")
    p.add_argument("--limit", type=int, default=2000, help="images to use (image folders; 0 = all)")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--cores", type=int, default=None, help="CPU cores for Ray (default: all)")
    p.add_argument("--repeats", type=int, default=3, help="timed passes per side (best one counts)")
    add_s3_args(p)
    p.set_defaults(func=handler("orchestrator.bench.data:cmd_bench_data"))
    return p


def _step(bench_subparsers: Any) -> argparse.ArgumentParser:
    p = bench_subparsers.add_parser("step", help="raydiff's training step vs a plain (and compiled) PyTorch loop")
    p.add_argument("--model", default="unet-tiny", help="registry model (e.g. unet-cifar, dit-b2, dit-xl2)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=0, help="timed steps (default 40 on GPU, 3 on CPU)")
    p.add_argument("--warmup", type=int, default=0, help="untimed steps first (default 10 on GPU, 1 on CPU)")
    p.add_argument("--compile", action="store_true", help="add the torch.compile variants")
    p.add_argument("--latent", action="store_true", help="4x32x32 latents instead of RGB images")
    p.add_argument("--no-ray", action="store_true", help="skip the Ray Train + Ray Data variant")
    p.add_argument("--profile", action="store_true", help="print torch.profiler tables of the eager variants")
    p.add_argument("--json", help="also write the results as JSON to this file")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="raydiff config overrides for its step")
    p.set_defaults(func=handler("orchestrator.bench.step:cmd_bench_step"))
    return p


def _startup(bench_subparsers: Any) -> argparse.ArgumentParser:
    p = bench_subparsers.add_parser("startup", help="time to first step of a fresh run by phase, beside a plain loop's")
    p.add_argument("--repeats", type=int, default=3, help="runs of each, alternating (the table shows medians)")
    p.add_argument("--json", help="also write the results as JSON to this file")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value",
                   help="raydiff config overrides (the plain loop uses the same network, data shape and batch)")
    p.set_defaults(func=handler("orchestrator.bench.startup:cmd_bench_startup"))
    return p


def _sample(bench_subparsers: Any) -> argparse.ArgumentParser:
    p = bench_subparsers.add_parser("sample", help="raydiff sample's generation vs a bare loop of the same forward passes")
    p.add_argument("--checkpoint", help="a run or checkpoint directory (default: a fresh --model network)")
    p.add_argument("--model", default="unet-demo", choices=MODEL_NAMES, metavar="MODEL",
                   help="registry network when no --checkpoint is given (default unet-demo)")
    p.add_argument("--classes", type=int, default=10, help="classes of the fresh network (default 10, as the demo)")
    p.add_argument("--channels", type=int, default=1, choices=(1, 3), help="image channels of the fresh network")
    p.add_argument("--resolution", type=int, default=32, help="image side of the fresh network")
    p.add_argument("--per-class", type=int, default=20, help="images per class (default 20: 200 for 10 classes)")
    p.add_argument("--steps", type=int, default=0, help="sampling steps (default: the config's, 25)")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), help="sampling.precision (default auto)")
    p.add_argument("--device", default="auto", help="auto (a GPU when present), cpu, cuda or cuda:N")
    p.add_argument("--json", help="also write the results as JSON to this file")
    p.set_defaults(func=handler("orchestrator.bench.sample:cmd_bench_sample"))
    return p


def _quality(bench_subparsers: Any) -> argparse.ArgumentParser:
    p = bench_subparsers.add_parser(
        "quality", help="sample quality vs training progress for weighting, schedule, prediction, guidance, sampler")
    p.add_argument("--quick", action="store_true", help="reduced CI setting: 16x16, a few steps, one seed")
    p.add_argument("--seeds", type=int, default=0, help="number of seeds (default: 1)")
    p.add_argument("--steps", type=int, default=0, help="training steps per arm (default 600; quick 24)")
    p.add_argument("--eval-every", type=int, default=0, help="score every N steps (default 200; quick 12)")
    p.add_argument("--model", default="", choices=("",) + MODEL_NAMES, metavar="MODEL",
                   help="registry network for every arm (default unet-demo; quick unet-tiny)")
    p.add_argument("--arms", default="", help="comma-separated subset of " + ",".join(a.name for a in ARMS))
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--out", default="bench-quality", help="folder for quality.csv, quality.txt and quality.png")
    p.set_defaults(func=handler("orchestrator.bench.quality:cmd_bench_quality"))
    return p
