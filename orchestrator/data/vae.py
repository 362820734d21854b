"""The VAE of latent diffusion: find and check a local diffusers ``AutoencoderKL`` directory,
load it (never from a model hub), encode images to scaled latents and decode them back.

``raydiff data encode`` (``encode.py``) encodes with it in Ray Data actors; sample grids of a
latent model (``orchestrator/sampling.py``) decode with ``latents_to_images``: the VAE recorded
in the dataset's ``latents.json``, loaded once per process on the sampling device. Where that
VAE is not on this machine (a cluster node without the directory) or is not the one that encoded
the data (config hash), grids show latent channels 0-2 instead (``latent_preview``), with one
warning: a missing decoder must not stop a training run at its first grid. Scaling follows diffusers' latent
pipelines: ``latent = (mean - shift_factor) * scaling_factor`` and back
``z = latent / scaling_factor + shift_factor`` (``shift_factor`` is unset for SD 1.x/2.x/XL VAEs).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator.data.formats.latents import PREVIEW_RANGE, read_manifest
from orchestrator.data.info import DataError

if TYPE_CHECKING:
    import torch

    from orchestrator.config import DataConfig

log = logging.getLogger("raydiff")

_WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
_EXPECTED = ("a diffusers AutoencoderKL directory: config.json with \"_class_name\": \"AutoencoderKL\" and "
             "diffusion_pytorch_model.safetensors, as AutoencoderKL.save_pretrained writes it (or a pipeline "
             "directory with such a vae/ folder)")


@dataclass(frozen=True)
class VaeSpec:
    """A checked VAE directory and the numbers that encoding and decoding need."""

    path: str  # absolute directory holding config.json and the weights
    config: dict[str, Any]
    config_sha256: str  # of the architecture keys (those not starting with "_")
    in_channels: int
    latent_channels: int
    downsample: int  # image side / latent side
    scaling_factor: float
    shift_factor: float | None

    def latent_size(self, resolution: int) -> int:
        return resolution // self.downsample


def resolve_vae(path: str, *, what: str = "--vae") -> VaeSpec:
    """Check that ``path`` is a local diffusers ``AutoencoderKL`` directory (a pipeline directory
    with a ``vae/`` folder is accepted too); ``DataError`` naming the path and what is expected."""
    if "://" in path:
        raise DataError(f"{what} {path}: the VAE must be a local directory (nothing is downloaded at run time). "
                        f"Fix: copy {_EXPECTED} to this machine and pass its path")
    p = Path(os.path.expanduser(path)).resolve()
    if p.is_dir() and not (p / "config.json").is_file() and (p / "vae" / "config.json").is_file():
        p = p / "vae"
    if not p.is_dir():
        raise DataError(f"{what} {path}: no such directory. Fix: pass {_EXPECTED}")
    try:
        config = json.loads((p / "config.json").read_text())
    except FileNotFoundError:
        raise DataError(f"{what} {path}: no config.json there. Fix: pass {_EXPECTED}") from None
    except ValueError as e:
        raise DataError(f"{what} {path}: config.json is not valid JSON ({e}). Fix: pass {_EXPECTED}") from None
    cls = config.get("_class_name") if isinstance(config, dict) else None
    if cls != "AutoencoderKL":
        raise DataError(f"{what} {path}: config.json describes {cls or 'no diffusers model'!s}, not an AutoencoderKL. "
                        f"Fix: pass {_EXPECTED}")
    if not any((p / w).is_file() for w in _WEIGHT_FILES):
        raise DataError(f"{what} {path}: no weights ({' or '.join(_WEIGHT_FILES)}). Fix: pass {_EXPECTED}")
    arch = {k: v for k, v in config.items() if not k.startswith("_")}
    shift = config.get("shift_factor")
    return VaeSpec(
        path=str(p),
        config=config,
        config_sha256=hashlib.sha256(json.dumps(arch, sort_keys=True).encode()).hexdigest(),
        in_channels=int(config.get("in_channels", 3)),
        latent_channels=int(config.get("latent_channels", 4)),
        # One 2x downsampling per encoder block but the last (diffusers' Encoder).
        downsample=2 ** (len(config.get("block_out_channels", (64,))) - 1),
        scaling_factor=float(config.get("scaling_factor", 0.18215)),
        shift_factor=None if shift is None else float(shift),
    )


def load_vae(path: str, device: "torch.device | str" = "cpu") -> Any:
    """``AutoencoderKL.from_pretrained`` from the local directory only, in eval mode on
    ``device``, fp32 (SD-family VAEs overflow in fp16)."""
    from diffusers import AutoencoderKL

    # low_cpu_mem_usage=False: the fast path needs `accelerate`, and without it diffusers
    # falls back to this anyway, with a warning.
    vae = AutoencoderKL.from_pretrained(path, local_files_only=True, low_cpu_mem_usage=False)
    return vae.to(device).eval().requires_grad_(False)


def encode_mean(vae: Any, images: "torch.Tensor", scaling_factor: float, shift_factor: float | None) -> "torch.Tensor":
    """Scaled latents of images in [-1, 1]: the posterior mean (deterministic; see encode.py)."""
    import torch

    with torch.inference_mode():
        mean = vae.encode(images).latent_dist.mean
        if shift_factor is not None:
            mean = mean - shift_factor
        return mean * scaling_factor


def decode_latents(vae: Any, latents: "torch.Tensor", scaling_factor: float, shift_factor: float | None, *,
                   chunk_pixels: int = 1 << 20) -> "torch.Tensor":
    """Images in [-1, 1] (clamped) from scaled latents, decoded in chunks of about
    ``chunk_pixels`` output pixels (bounds the decoder's activation memory)."""
    import torch

    n, _, h, w = latents.shape
    side = h * (2 ** (len(vae.config.block_out_channels) - 1))
    per = max(1, chunk_pixels // (side * side))
    dev = next(vae.parameters()).device
    out = []
    with torch.inference_mode():
        for i in range(0, n, per):
            z = latents[i : i + per].to(dev, torch.float32) / scaling_factor
            if shift_factor is not None:
                z = z + shift_factor
            out.append(vae.decode(z).sample.clamp(-1, 1).float().cpu())
    return torch.cat(out) if out else latents.new_zeros((0, vae.config.out_channels, side, side))


def latent_preview(latents: "torch.Tensor") -> "torch.Tensor":
    """Latent channels 0-2 as an image in [-1, 1] (fixed scale: ``PREVIEW_RANGE`` is white)."""
    idx = [min(i, latents.shape[1] - 1) for i in range(3)]
    return (latents[:, idx].float() / PREVIEW_RANGE).clamp(-1, 1)


# (data.source, device) -> (VAE, scaling factor, shift factor), or None: no usable VAE there.
_DECODERS: dict[tuple[str, str], tuple[Any, float, float | None] | None] = {}


def _decoder(data: "DataConfig", device: "torch.device | str") -> tuple[Any, float, float | None] | None:
    key = (data.source, str(device))
    if key not in _DECODERS:
        try:
            m = read_manifest(data.source, data.s3)
            spec = resolve_vae(m["vae"]["path"], what="the VAE recorded in latents.json,")
            if spec.config_sha256 != m["vae"].get("config_sha256"):
                raise DataError(f"the VAE at {spec.path} is not the one that encoded the data (its config differs)")
            _DECODERS[key] = (load_vae(spec.path, device), float(m["scaling_factor"]), m.get("shift_factor"))
        except DataError as e:
            log.warning("latent sample grids show latent channels 0-2, not decoded images: %s", e)
            _DECODERS[key] = None
    return _DECODERS[key]


def latents_to_images(latents: "torch.Tensor", data: "DataConfig", *, device: "torch.device | str" = "cpu") -> "torch.Tensor":
    """Images in [-1, 1] decoded by the VAE of ``data.source``'s manifest, or ``latent_preview``
    where that VAE cannot be used here."""
    dec = _decoder(data, device)
    return latent_preview(latents) if dec is None else decode_latents(dec[0], latents, dec[1], dec[2])
