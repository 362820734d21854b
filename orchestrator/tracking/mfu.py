"""Model FLOPs utilisation: the share of the GPUs' peak that the model's own arithmetic uses.

FLOPs per training image are estimated as 3x the forward FLOPs of the denoiser at batch 1
(backward costs about twice the forward: Kaplan et al. 2020, Sec. 2.1; PaLM, App. B), with the
forward counted by ``torch.utils.flop_counter`` (2 FLOPs per multiply-add, convolutions,
matmuls and attention) on the meta device, so nothing is computed. Peaks are NVIDIA's dense
fp16/bf16 tensor-core figures; MFU is omitted on CPU, in fp32, and on GPUs not in the table,
rather than guessed. The EMA update, data transfer and optimizer are not model FLOPs.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch
from torch.utils.flop_counter import FlopCounterMode

from orchestrator.builders import build_denoiser
from orchestrator.config import DataConfig, ModelConfig

from model.conditioning import class_conditioning

if TYPE_CHECKING:
    from orchestrator.config import TrainConfig

# (substring of torch.cuda.get_device_name(), dense fp16/bf16 FLOP/s); first match wins, so
# the specific variants come before the family name.
PEAK_HALF_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM
    ("H200", 989e12),
    ("GH200", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
)


def peak_flops(device_name: str, precision: str) -> float | None:
    if precision not in ("fp16", "bf16"):
        return None
    for key, flops in PEAK_HALF_FLOPS:
        if key in device_name:
            return flops
    return None


def train_flops_per_image(model_cfg: ModelConfig, data: DataConfig, num_classes: int | None) -> float:
    """3x the denoiser's forward FLOPs for one image (see the module docstring)."""
    with torch.device("meta"):
        model = build_denoiser(model_cfg, data, num_classes)
        c, r = data.channels, data.resolution
        x = torch.zeros(1, c, r, r)
        t = torch.zeros(1, dtype=torch.long)
        y = class_conditioning(torch.zeros(1, dtype=torch.long), num_classes)
        if getattr(model, "text_dim", None) is not None:
            # Cross-attention over one prompt of the tokenizer's length (77 unless set). The
            # frozen text encoder's forward is not training work of the denoiser: not counted.
            from model.conditioning import TextEmbeddings

            length = model_cfg.text_max_length or 77
            y = TextEmbeddings(torch.zeros(1, length, model.text_dim), torch.ones(1, length, dtype=torch.bool),
                               torch.zeros(length, model.text_dim), torch.ones(length, dtype=torch.bool))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x, t, y)
    return 3.0 * counter.get_total_flops()


class MfuMeter:
    """MFU from a record's global images/s, for ``world`` GPUs of one kind; ``None`` when not
    defined here (see the module docstring)."""

    def __init__(self, cfg: "TrainConfig", num_classes: int | None, *, device: torch.device, precision: str,
                 world: int):
        self.peak = None
        if device.type == "cuda":
            self.peak = peak_flops(torch.cuda.get_device_name(device), precision)
        self.flops_per_image = 0.0
        if self.peak:
            try:
                self.flops_per_image = train_flops_per_image(cfg.model, cfg.data, num_classes)
            except Exception as e:  # noqa: BLE001 - a model the counter cannot trace: no MFU, training goes on
                logging.getLogger("raydiff.tracking").warning("raydiff: MFU is not reported: counting %s's FLOPs "
                                                              "failed (%s: %s)", cfg.model.name, type(e).__name__, e)
                self.peak = None
        self.world = world

    def __call__(self, images_per_s: float) -> float | None:
        if not self.peak:
            return None
        return images_per_s * self.flops_per_image / (self.peak * self.world)
