"""DeepSpeed engine construction from the typed config.

Ray Train has already initialised torch.distributed (gloo on CPU, nccl on GPU) when this runs;
``deepspeed.initialize`` reuses that process group.
"""

from __future__ import annotations

import functools
import logging
import sys
from typing import Any

import torch

from orchestrator.builders import lr_lambda
from orchestrator.config import OptimConfig, PrecisionConfig
from orchestrator.plan import Plan

log = logging.getLogger(__name__)


def clips_outside_engine(plan: Plan) -> bool:
    """Whether raydiff clips gradients itself instead of DeepSpeed.

    Without ZeRO and without DeepSpeed's half-precision engine (autocast or fp32), DeepSpeed
    clips with a Python loop over parameters (``runtime.utils.clip_grad_norm_``: three kernel
    launches per parameter tensor, ~1,000 for the CIFAR U-Net), which on a GPU costs more
    launch time than the arithmetic. torch's foreach clipping does the same in a handful of
    kernels. DeepSpeed's fp16/bf16 and ZeRO optimizers clip on flat buffers and keep doing so.
    """
    return plan.zero_stage == 0 and (plan.autocast or plan.precision == "fp32")


def deepspeed_config(optim: OptimConfig, precision: PrecisionConfig, plan: Plan) -> dict[str, Any]:
    o, p = optim, precision
    ds: dict[str, Any] = {
        "train_batch_size": o.batch_size,
        "train_micro_batch_size_per_gpu": plan.micro_batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0 if clips_outside_engine(plan) else o.grad_clip,
        "zero_optimization": {"stage": plan.zero_stage},
        "steps_per_print": 10**9,  # raydiff logs its own metrics
        "wall_clock_breakdown": False,
    }
    if plan.zero_stage == 3:
        # Small models: gather everything, keep no persistence thresholds that would leave
        # tiny params partitioned across CPU workers.
        ds["zero_optimization"].update({"stage3_param_persistence_threshold": 0})
    if plan.autocast:
        # fp32 weights, torch.autocast in the forward, torch's GradScaler for fp16: the loop a
        # careful user writes by hand, with DeepSpeed still owning the step.
        ds["torch_autocast"] = {"enabled": True, "dtype": "float16" if plan.precision == "fp16" else "bfloat16"}
    elif plan.precision == "fp16":
        ds["fp16"] = {
            "enabled": True,
            "loss_scale": p.loss_scale,
            "initial_scale_power": p.initial_scale_power,
            "loss_scale_window": p.loss_scale_window,
            "hysteresis": p.hysteresis,
            "min_loss_scale": p.min_loss_scale,
        }
    elif plan.precision == "bf16":
        ds["bf16"] = {"enabled": True}
    return ds


def build_engine(optim: OptimConfig, precision: PrecisionConfig, plan: Plan, module: torch.nn.Module):
    """Returns the DeepSpeed engine wrapping ``module``."""
    # Imported here, not at the top: the driver imports this module (through the worker's entry
    # point) and never builds an engine; importing DeepSpeed costs it 2-8 s of start-up.
    import deepspeed

    skip_inference_comm_build()
    compile_muon_kernels_at_first_use()
    o = optim
    # A torch optimizer instead of a DeepSpeed config optimizer: DeepSpeed would otherwise JIT-build
    # FusedAdam (needs a compiler and, on the GPU image, TORCH_CUDA_ARCH_LIST); torch's fused AdamW
    # is as fast on GPU and needs no build.
    fused = plan.device == "gpu"
    decay, no_decay = [], []
    for name, prm in module.named_parameters():
        if not prm.requires_grad:
            continue
        (no_decay if prm.ndim <= 1 or name.endswith(".bias") else decay).append(prm)
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # DeepSpeed drops empty groups (LoRA adapters are all matrices: no biases or norms), and the
    # LR scheduler must see the groups the optimizer ends up with.
    groups = [g for g in groups if g["params"]]
    optimizer = torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, fused=fused)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(optim))
    engine, _, _, _ = deepspeed.initialize(
        model=module,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=deepspeed_config(optim, precision, plan),
        dist_init_required=False,
    )
    if plan.zero_stage == 0 and engine.world_size == 1:
        # One process: DeepSpeed's bucketed all-reduce would flatten every gradient into a
        # buffer and copy it back for nothing.
        engine.enable_backward_allreduce = False
    return engine


def skip_inference_comm_build() -> None:
    """Keep DeepSpeed from JIT-compiling its shared-memory all-reduce at engine start.

    DeepSpeed's comm backend, on the CPU accelerator, compiles ``deepspeed_shm_comm`` (C++, with
    ninja, into ~/.cache/torch_extensions) when it starts. The op serves only
    ``inference_all_reduce`` (tensor-parallel inference layers, deepspeed/module_inject); training
    all-reduces through torch.distributed (gloo here). The build is keyed by the virtual
    environment's path, so every new checkout with its own .venv (``make demo`` in a fresh clone,
    every CI run) recompiled it: 20-30 s of the "engine" start-up phase on 2 idle cores, 250 s
    measured with other runs on the same cores (2026-12-06). Marking the op incompatible is
    DeepSpeed's own switch for "not available here" (``build_shm_op`` then returns None).
    """
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


_MUON_KERNELS = "deepspeed.runtime.zero.muon.original_muon"


def compile_muon_kernels_at_first_use() -> None:
    """Import DeepSpeed's Muon optimizer with its kernels wrapped by ``torch.compile`` when first
    called, not when imported.

    DeepSpeed's ZeRO code imports ``deepspeed.runtime.zero.muon`` whatever the optimizer (the
    optimizer check of ``deepspeed.initialize``, ZeRO-1/2's gradient averaging), and that module
    decorates its Newton-Schulz kernels with ``torch.compile`` at import, which imports
    TorchInductor (``torch._inductor.compile_fx``, sympy): 1.5-1.9 CPU-s of every ZeRO worker's
    engine phase on this project's 2-core machine (issue 18), the default on CPU (ZeRO-2), for
    kernels that only the Muon optimizer runs and raydiff's AdamW never does. The kernels stay
    compiled ones, wrapped at their first call (a Muon run pays the same, later).
    """
    if _MUON_KERNELS in sys.modules:
        return
    from deepspeed.runtime import compiler

    # original_muon decorates with ``compiler.compile()`` (DeepSpeed's "torch.compile where it
    # exists"), read when the module is executed: swapped for the module's import only.
    deepspeed_compile = compiler.compile
    compiler.compile = lambda: CompiledAtFirstCall
    try:
        import deepspeed.runtime.zero.muon.muon_optimizer  # noqa: F401
    except ImportError:  # another DeepSpeed layout: nothing to defer
        pass
    finally:
        compiler.compile = deepspeed_compile


class CompiledAtFirstCall:
    """``torch.compile(fn)``, called for the first time when the function is."""

    def __init__(self, fn) -> None:
        functools.update_wrapper(self, fn)  # sets __wrapped__ = fn
        self._compiled = None

    def __call__(self, *args, **kwargs):
        if self._compiled is None:
            self._compiled = torch.compile(self.__wrapped__)
        return self._compiled(*args, **kwargs)


def loss_scale_of(engine) -> float:
    """Current fp16 loss scale (1.0 when not scaling). Reads a device value: call it once per
    log interval, not per step."""
    scaler = getattr(engine, "torch_autocast_z0_gradscaler", None)
    if scaler is not None:
        return float(scaler.get_scale())
    opt = getattr(engine, "optimizer", None)
    for holder in (opt, getattr(opt, "loss_scaler", None)):
        scale = getattr(holder, "cur_scale", None) if holder is not None else None
        if scale is not None:
            return float(scale)
    return 1.0
