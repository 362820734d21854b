"""Resolve what a config means on the hardware at hand: device, precision (and why), resources
and the batch split.

The plan holds only what resolution decides; everything else is read from the config. The same
plan is printed by ``raydiff train --dry-run`` and used by the trainer, so what the dry run says
is what runs.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Literal

from orchestrator import param_counts
from orchestrator.config import ConfigError, DataConfig, ModelConfig, PrecisionConfig, ScalingConfig, TrainConfig

Precision = Literal["fp32", "bf16", "fp16"]
Device = Literal["cpu", "gpu"]


@dataclass(frozen=True)
class Plan:
    device: Device
    device_reason: str
    precision: Precision
    precision_reason: str
    num_workers: int
    cpus_per_worker: float
    gpus_per_worker: float
    micro_batch_size: int
    zero_stage: int
    zero_reason: str
    # fp32 weights + torch.autocast (DeepSpeed torch_autocast) instead of DeepSpeed's fp16/bf16 engine.
    autocast: bool
    mixed_reason: str
    # Text models (orchestrator/text.py): the frozen encoder, and where the training step's text
    # embeddings come from: "precomputed" (stored by `raydiff data encode`) or "in-worker"
    # (captions encoded per micro-batch); None for models without text.
    text_encoder: str | None = None
    text_embeddings: Literal["in-worker", "precomputed"] | None = None
    text_reason: str = ""

    def as_dict(self) -> dict:
        return asdict(self)

    def describe(self, cfg: TrainConfig, run_uri: str) -> str:
        return "\n".join(
            [
                f"run directory   : {run_uri}",
                f"workers         : {self.num_workers} x ({self.cpus_per_worker:g} CPU, {self.gpus_per_worker:g} GPU)",
                f"device          : {self.device} ({self.device_reason})",
                f"precision       : {self.precision} ({self.precision_reason})",
                f"mixed precision : {'torch autocast, fp32 weights' if self.autocast else 'DeepSpeed engine'} ({self.mixed_reason})",
                f"DeepSpeed ZeRO  : stage {self.zero_stage} ({self.zero_reason})",
                *network_lines(cfg),
                f"batch           : {cfg.optim.batch_size} global = {self.num_workers} x {self.micro_batch_size}",
                f"steps           : {cfg.optim.steps}",
                f"checkpoints     : every {cfg.checkpoint.every_steps} steps, keep last {cfg.checkpoint.keep}",
                f"sample grids    : every {cfg.sampling.every_steps} steps and at the end",
                *([f"text encoder    : {self.text_encoder}{' = the captioned demo data' + chr(39) + 's own' if self.text_encoder == 'builtin' else ''} "
                   f"(frozen, {self.precision}, not trained or checkpointed)",
                   f"text embeddings : {self.text_embeddings} ({self.text_reason})"] if self.text_embeddings else []),
            ]
        )


def cpu_has_bf16() -> bool:
    """True when the CPU has native bf16 arithmetic (AVX512-BF16 or AMX), where bf16 autocast is
    faster than fp32; without it bf16 is emulated and slower."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def local_gpus() -> bool:
    """Whether torch can use a GPU here. Asked of the GPU drivers first, through Ray's own
    accelerator managers (NVML, AMD SMI: milliseconds), so that a machine without GPUs decides
    without importing torch (1.2 s on the path to every run's first step on 2 cores, issue 18);
    where a driver reports GPUs, torch decides (a CPU-only torch build cannot use them)."""
    try:
        from ray._private.accelerators import AMDGPUAcceleratorManager, NvidiaGPUAcceleratorManager

        managers = (NvidiaGPUAcceleratorManager, AMDGPUAcceleratorManager)
        no_gpus = not any(m.get_current_node_num_accelerators() for m in managers)
    except Exception:  # noqa: BLE001 - a Ray without them, or a probe that fails: torch decides
        no_gpus = False
    if no_gpus:
        return False
    import torch

    return torch.cuda.is_available()


def _cluster_has_gpus(ray_address: str | None) -> bool | None:
    """GPU presence without starting anything: locally from the GPU drivers (and torch where they
    report GPUs); on a cluster only once connected."""
    if ray_address is None:
        return local_gpus()
    try:
        import ray

        if ray.is_initialized():
            return ray.cluster_resources().get("GPU", 0) > 0
    except Exception:  # noqa: BLE001 - a plan must not fail because Ray is absent
        return None
    return None


def resolve_device(scaling: ScalingConfig) -> tuple[Device, str]:
    s = scaling
    if s.device != "auto":
        return s.device, "set by scaling.device"
    has_gpu = _cluster_has_gpus(s.ray_address)
    if has_gpu is None:
        return "gpu", "auto: assumed for a remote cluster; set scaling.device=cpu for CPU clusters"
    return ("gpu", "auto: GPUs found") if has_gpu else ("cpu", "auto: no GPU found")


def resolve_precision(cfg: TrainConfig, device: Device) -> tuple[Precision, str]:
    """The one place that decides precision, and the one place that rejects fp16 on CPU."""
    p = cfg.precision.dtype
    if p == "auto":
        if device == "gpu":
            return "fp16", "auto on GPU: fp16 with dynamic loss scaling (DeepSpeed fp16 engine)"
        if cpu_has_bf16():
            return "bf16", "auto on CPU: DeepSpeed refuses fp16 on CPU; this CPU has native bf16 (AVX512-BF16/AMX)"
        return "fp32", "auto on CPU: DeepSpeed refuses fp16 on CPU and this CPU has no native bf16"
    if p == "fp16" and device == "cpu":
        raise ConfigError(
            "precision.dtype=fp16 but training runs on CPU "
            f"({'scaling.device=cpu' if cfg.scaling.device == 'cpu' else 'no GPU found'}): DeepSpeed supports "
            "fp16 only on GPUs. Fix: precision.dtype=bf16, fp32 or auto"
        )
    return p, "set by precision.dtype"


# Bytes of training state per parameter under mixed precision with Adam: fp32 weights or master
# copy (4) + moments (8) + gradients and half weights (4) = 16 (Rajbhandari et al. 2020, sec. 3.1).
STATE_BYTES_PER_PARAM = 16
# Unpartitioned state may take this share of one GPU; the rest is left to activations.
ZERO0_MEMORY_SHARE = 0.25
# Assumed memory of a GPU that cannot be queried from here (a remote cluster's): an A100-40GB.
DEFAULT_GPU_BYTES = 40 << 30


def network_code_to_import(cfg: TrainConfig) -> tuple[str, ...]:
    """What ``parameter_counts`` will import (diffusers and, through it, peft and transformers:
    2-3 s on 2 cores), for the driver to import in the background while its other start-up work
    (storage checks, the lease, Ray's start, mostly waiting on other processes) goes on, instead
    of the plan waiting for it afterwards (issue 18; orchestrator/background_import.py). Nothing
    when the count is cached (orchestrator/param_counts.py)."""
    return () if param_counts.lookup(cfg.model, cfg.data) is not None else ("orchestrator.builders",)


def parameter_counts(model: ModelConfig, data: DataConfig) -> tuple[int, int]:
    """(trainable, total) parameters of the configured network, counted on the meta device (no
    memory, no compute). A registry network is counted with 10 classes when conditional. A count
    made before is read from raydiff's cache (orchestrator/param_counts.py)."""
    cached = param_counts.lookup(model, data)
    if cached is not None:
        return cached
    import torch

    from orchestrator.builders import build_denoiser, trainable_parameters

    if model.pretrained is not None:
        from model.pretrained import read_pretrained

        num_classes = read_pretrained(model.pretrained).num_classes
    else:
        num_classes = 10 if data.conditional else None
    with torch.device("meta"):
        net = build_denoiser(model, data, num_classes, weights=False)
    counts = trainable_parameters(net)
    param_counts.remember(model, data, counts)
    return counts


def parameter_count(model: ModelConfig, data: DataConfig) -> int:
    """Parameters of the configured network (all of them, trainable or frozen)."""
    return parameter_counts(model, data)[1]


def network_lines(cfg: TrainConfig) -> list[str]:
    """What the plan says about the network: where it comes from, what a pretrained directory
    fixed (model/pretrained.py), and how many parameters train."""
    m = cfg.model
    trainable, total = parameter_counts(m, cfg.data)
    share = f"{trainable:,} trainable of {total:,} ({trainable / max(total, 1):.2%})"
    if m.pretrained is None:
        custom = m.unet if m.unet is not None else m.dit
        extra = f" with model.{'unet' if m.unet is not None else 'dit'} {custom}" if custom is not None else ""
        return [f"network         : {m.name}{extra} (registry, random init), {share} parameters"]
    from model.pretrained import read_pretrained

    info = read_pretrained(m.pretrained)
    lines = [f"network         : {info.network_class} from {info.model_dir} (model.pretrained)"]
    for key, (value, where) in info.taken().items():
        show = str(value).lower() if isinstance(value, bool) else value
        lines.append(f"  from pretrained: {key}={show} ({where})")
    if info.scheduler_file is None:
        lines.append("  no scheduler in the directory: diffusion.* (schedule, prediction) come from the config")
    elif info.scheduler_class:
        # The sampler is not a property of the trained network: any sampler runs on its schedule.
        lines.append(f"  sampling       : sampling.sampler={cfg.sampling.sampler} (the directory's {info.scheduler_class} "
                     "is not used: samplers share the schedule)")
    if m.lora.rank:
        lines.append(f"  LoRA adapters  : rank {m.lora.rank}, alpha {m.lora.scale_alpha:g} on {', '.join(m.lora.targets)}"
                     " (the pretrained weights stay frozen)")
    else:
        lines.append("  full fine-tuning: every weight trains (model.lora.rank=0)")
    lines.append(f"parameters      : {share}")
    return lines


def _gpu_bytes(scaling: ScalingConfig) -> int:
    if scaling.ray_address is None:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_properties(0).total_memory
    return DEFAULT_GPU_BYTES


def resolve_zero_stage(cfg: TrainConfig, device: Device) -> tuple[int, str]:
    z = cfg.precision.zero_stage
    if z != "auto":
        return z, "set by precision.zero_stage"
    if device == "cpu":
        return 2, "auto on CPU: gradients and optimizer state partitioned over the workers"
    need = parameter_count(cfg.model, cfg.data) * STATE_BYTES_PER_PARAM
    budget = _gpu_bytes(cfg.scaling) * ZERO0_MEMORY_SHARE
    if need <= budget:
        return 0, (f"auto: {need / 2**30:.1f} GiB of weights, gradients and Adam state fit in "
                   f"{ZERO0_MEMORY_SHARE:.0%} of one GPU; no partitioning overhead")
    return 2, f"auto: {need / 2**30:.1f} GiB of training state is over {ZERO0_MEMORY_SHARE:.0%} of one GPU"


def resolve_mixed(pcfg: PrecisionConfig, precision: Precision, zero_stage: int, device: Device) -> tuple[bool, str]:
    m = pcfg.mixed
    if precision == "fp32":
        return False, "fp32: nothing to mix"
    if m == "autocast":
        if zero_stage != 0:
            raise ConfigError(f"precision.mixed=autocast needs ZeRO stage 0, resolved {zero_stage}. "
                              "Fix: precision.zero_stage=0 or precision.mixed=engine")
        return True, "set by precision.mixed"
    if m == "engine":
        return False, "set by precision.mixed"
    if device == "gpu" and zero_stage == 0:
        return True, "auto: stage 0 on GPU, fp32 weights with torch autocast and a GradScaler"
    return False, "auto: DeepSpeed's half-precision engine (ZeRO partitioning or CPU)"


def resolve_text(cfg: TrainConfig, precision: Precision) -> tuple[str | None, str | None, str]:
    """(encoder, where the step's text embeddings come from, why) for a text model."""

    if not cfg.model.text_conditioned:
        return None, None, ""
    enc = cfg.model.text_encoder
    half = "" if precision == "fp32" else f" in {precision}"
    from orchestrator.text import stored_text_embeddings

    stored = stored_text_embeddings(cfg.data)
    if stored:
        where = f"{stored.get('encoder', '?')}, shape {stored.get('shape', '?')}"
        return enc, "precomputed", (f"the dataset stores caption embeddings ({where}; raydiff data encode): no encoder "
                                    "runs in the training step; each worker encodes only the empty prompt and the "
                                    "grid prompts, once")
    return enc, "in-worker", (f"the data carries captions: each worker encodes its micro-batch under no_grad{half}; "
                              "`raydiff data encode --text-encoder` stores embeddings once instead")


def make_plan(cfg: TrainConfig) -> Plan:
    device, device_reason = resolve_device(cfg.scaling)
    precision, precision_reason = resolve_precision(cfg, device)
    zero_stage, zero_reason = resolve_zero_stage(cfg, device)
    autocast, mixed_reason = resolve_mixed(cfg.precision, precision, zero_stage, device)
    text_encoder, text_embeddings, text_reason = resolve_text(cfg, precision)
    return Plan(
        device=device,
        device_reason=device_reason,
        precision=precision,
        precision_reason=precision_reason,
        num_workers=cfg.scaling.num_workers,
        cpus_per_worker=cfg.scaling.cpus_per_worker,
        gpus_per_worker=cfg.scaling.gpus_per_worker if device == "gpu" else 0,
        # The config rejects a batch that does not split evenly over the workers.
        micro_batch_size=cfg.optim.batch_size // cfg.scaling.num_workers,
        zero_stage=zero_stage,
        zero_reason=zero_reason,
        autocast=autocast,
        mixed_reason=mixed_reason,
        text_encoder=text_encoder,
        text_embeddings=text_embeddings,
        text_reason=text_reason,
    )


def local_logical_cpus(scaling: ScalingConfig) -> int:
    """Logical CPUs for a local Ray: training workers plus room for Ray Data's decode tasks.

    On a 2-core laptop, workers holding whole CPUs would leave none for Ray Data and the run would
    stall, so we over-commit logical CPUs (threads are capped per worker in the trainer).
    """
    need = int(scaling.num_workers * scaling.cpus_per_worker + 0.999) + 2
    return max(os.cpu_count() or 1, need)
