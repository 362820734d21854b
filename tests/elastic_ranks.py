"""Run raydiff's TrainStep on N local processes (gloo, no Ray) and write a checkpoint, for the
elastic-resume tests (tests/test_elastic_resume.py).

    python tests/elastic_ranks.py WORLD OUT_ROOT [--resume CHECKPOINT_ROOT] [--steps K] SETUP [SETUP ...]

For each SETUP (a name in SETUPS: precision and ZeRO stage), in OUT_ROOT/SETUP: fresh, train K
steps on seeded random batches, then write the checkpoint. With --resume: load
CHECKPOINT_ROOT/SETUP with raydiff's read_checkpoint (re-sharding when its world size differs),
write it back unchanged, then train K steps and record the losses in losses.json. Checkpoints go
through the real write_checkpoint/read_checkpoint path. Several setups share one launch: process
start-up (torch, DeepSpeed, diffusers imports) is most of the cost on a small machine.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


SETUPS = {
    "bf16-zero2": ["precision.dtype=bf16", "precision.zero_stage=2"],  # the CPU default where bf16 is native
    "fp32-zero2": ["precision.dtype=fp32", "precision.zero_stage=2"],  # the CPU default without bf16
    # Without ZeRO, DeepSpeed 0.19 keeps the whole optimizer in the model-states file: no shards.
    "bf16-zero0": ["precision.dtype=bf16", "precision.zero_stage=0"],
    "fp32-zero0": ["precision.dtype=fp32", "precision.zero_stage=0"],
    "fp32-zero1": ["precision.dtype=fp32", "precision.zero_stage=1"],
    "bf16-zero3": ["precision.dtype=bf16", "precision.zero_stage=3"],
}


def _batch(plan, step: int, rank: int) -> dict[str, torch.Tensor]:
    # The same global batch whatever the world size: rank r takes rows r*m..(r+1)*m of it.
    g = torch.Generator().manual_seed(1000 + step)
    images = torch.rand(plan.micro_batch_size * plan.num_workers, 3, 16, 16, generator=g) * 2 - 1
    labels = torch.randint(0, 10, (images.shape[0],), generator=g)
    m = plan.micro_batch_size
    return {"image": images[rank * m:(rank + 1) * m], "label": labels[rank * m:(rank + 1) * m]}


def _rank(rank: int, world: int, port: int, a: argparse.Namespace) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), DS_ACCELERATOR="cpu")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    from orchestrator.config import load_config
    from orchestrator.train.launch import keep_unused_libraries_out

    # As in a training worker: diffusers without PEFT and transformers, which these setups never use.
    keep_unused_libraries_out(load_config(None, ["model.name=unet-tiny"]).model_dump())
    import logging

    for name in ("DeepSpeed", "deepspeed"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for setup in a.setups:
        _run(setup, rank, world, a)
    dist.barrier()
    dist.destroy_process_group()


def _run(setup: str, rank: int, world: int, a: argparse.Namespace) -> None:
    from orchestrator.config import load_config
    from orchestrator.plan import make_plan
    from orchestrator.train.checkpoint.files import read_checkpoint, write_checkpoint
    from orchestrator.train.state import TrainState
    from orchestrator.train.step import TrainStep

    cfg = load_config(None, ["model.name=unet-tiny", "data.resolution=16", "scaling.device=cpu", "optim.batch_size=4",
                             "optim.warmup_steps=0", f"scaling.num_workers={world}", *SETUPS[setup]])
    plan = make_plan(cfg)
    train = TrainStep(cfg, plan, 10, device=torch.device("cpu"), rank=rank)
    state = TrainState()
    out = Path(a.out) / setup
    if a.resume:
        state = read_checkpoint(Path(a.resume) / setup, engine=train.engine, ema=train.ema)
        write_checkpoint(out, engine=train.engine, ema=train.ema, state=state, cfg=cfg, num_classes=10, rank=rank)
    losses = []
    for _ in range(a.steps):
        res = train.step(_batch(plan, state.step, rank), state.step)
        loss = res.loss.detach().float().clone()
        dist.all_reduce(loss)
        losses.append(float(loss) / world)
        state.step += 1
    if not a.resume:
        write_checkpoint(out, engine=train.engine, ema=train.ema, state=state, cfg=cfg, num_classes=10, rank=rank)
    elif rank == 0:
        (out / "losses.json").write_text(json.dumps(losses))
    train.engine.destroy()
    dist.barrier()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("world", type=int)
    p.add_argument("out")
    p.add_argument("--resume")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("setups", nargs="+", choices=sorted(SETUPS))
    a = p.parse_intermixed_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank, args=(a.world, port, a), nprocs=a.world)


if __name__ == "__main__":
    main()
