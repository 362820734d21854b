"""TrainStep outside Ray: raydiff's own gradient clipping (foreach, stage 0) must equal
DeepSpeed's, step for step."""

from __future__ import annotations

import pytest
import torch

from orchestrator.bench.step import init_single_process_group, make_batches
from orchestrator.config import load_config
from orchestrator.plan import make_plan
from orchestrator.train import engine as engine_mod
from orchestrator.train import step as step_mod


def _train(cfg, plan, batches, steps=3):
    ts = step_mod.TrainStep(cfg, plan, 10, device=torch.device("cpu"))
    norms = []
    for i in range(steps):
        ts.step(batches[i % len(batches)], i)
        norms.append(None if ts.grad_norm is None else float(ts.grad_norm))
    return ts, [p.detach().clone() for p in ts.engine.module.parameters()], norms


def test_own_foreach_clipping_matches_deepspeed_clipping(monkeypatch):
    init_single_process_group(torch.device("cpu"))
    cfg = load_config(None, ["model.name=unet-tiny", "scaling.device=cpu", "scaling.num_workers=1", "optim.batch_size=4",
                             "precision.dtype=fp32", "precision.zero_stage=0", "optim.grad_clip=0.05",
                             "optim.warmup_steps=0"])
    plan = make_plan(cfg)
    assert engine_mod.clips_outside_engine(plan)
    assert engine_mod.deepspeed_config(cfg.optim, cfg.precision, plan)["gradient_clipping"] == 0.0
    batches = make_batches(cfg.data, 4, 10, torch.device("cpu"))
    ours, w_ours, norms = _train(cfg, plan, batches)
    assert ours.own_clip and all(n is not None and n > 0.05 for n in norms)  # clipping was active
    assert ours.engine.enable_backward_allreduce is False  # one process: no all-reduce copies

    monkeypatch.setattr(step_mod, "clips_outside_engine", lambda plan: False)
    monkeypatch.setattr(engine_mod, "clips_outside_engine", lambda plan: False)
    theirs, w_theirs, _ = _train(cfg, plan, batches)
    assert not theirs.own_clip
    assert engine_mod.deepspeed_config(cfg.optim, cfg.precision, plan)["gradient_clipping"] == pytest.approx(0.05)
    for a, b in zip(w_ours, w_theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
