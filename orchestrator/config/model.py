"""The model section: a registry network or a pretrained diffusers directory, LoRA adapters,
and diffusers constructor arguments beyond the registry (docs/fine-tuning.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, field_validator, model_validator

from model.choices import ModelName, is_text_model
from model.pretrained import DEFAULT_LORA_TARGETS, PretrainedError, read_pretrained
from orchestrator.config.base import _Strict


class LoraConfig(_Strict):
    """LoRA adapters (Hu et al. 2022) on a pretrained network (model/pretrained.py): only the
    adapters train, are checkpointed and EMA'd."""

    # 0 = off (the whole network trains).
    rank: int = Field(0, ge=0, le=1024)
    # Scale alpha / rank on the adapters' output; None = rank (scale 1, diffusers' LoRA scripts).
    alpha: float | None = Field(None, gt=0)
    # Layer names (suffixes) to adapt: diffusers' attention projections by default.
    targets: list[str] = Field(default_factory=lambda: list(DEFAULT_LORA_TARGETS), min_length=1)

    @property
    def scale_alpha(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha)


class ModelConfig(_Strict):
    # The CPU demo's network: faster per image than unet-tiny on a CPU core, with 4x its
    # parameters (model/registry.py, BENCHMARKS.md "Built-in demo").
    name: ModelName = "unet-demo"
    # Text-to-image models (model/choices.py TEXT_MODEL_NAMES: unet-text-*, pixart-*): the frozen
    # text encoder (model/text_encoder.py), a local directory holding a transformers CLIP text
    # model or T5 encoder with its tokenizer (or a diffusers pipeline directory with
    # text_encoder/ + tokenizer/), or a hub name. Its hidden size sizes the cross-attention.
    text_encoder: str | None = None
    # Tokens per prompt (prompts are padded/truncated to it); None: the tokenizer's own limit
    # (77 for CLIP, like Stable Diffusion).
    text_max_length: int | None = Field(None, ge=2, le=4096)
    # A local diffusers model or pipeline directory (save_pretrained, `raydiff export`) to start
    # from instead of model.name's random weights: the network, its conditioning, image size, noise
    # schedule and prediction type come from it (docs/fine-tuning.md).
    pretrained: str | None = None
    lora: LoraConfig = LoraConfig()

    @field_validator("pretrained")
    @classmethod
    def _absolute(cls, v: str | None) -> str | None:
        # Ray Train workers run in their own working directory: a relative path must not reach them.
        if v is None:
            return v
        if "://" in v:
            raise ValueError(f"model.pretrained={v!r}: only local directories are read. Fix: download the model "
                             "(e.g. huggingface-cli download NAME --local-dir DIR) and give DIR")
        return str(Path(v).expanduser().absolute())

    # diffusers constructor arguments replacing those of model.name's configuration, for a network
    # size the registry lacks: UNet2DModel's for a unet-* name (e.g. block_out_channels,
    # layers_per_block, down_block_types), DiTTransformer2DModel's for a dit-* name (num_layers,
    # num_attention_heads, attention_head_dim, patch_size). Image size, channels and classes come
    # from the data.
    unet: dict[str, Any] | None = None
    dit: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _architecture_args(self) -> "ModelConfig":
        for kind in ("unet", "dit"):
            args = getattr(self, kind)
            if args is None:
                continue
            if self.pretrained is not None:
                raise ValueError(f"model.{kind} with model.pretrained: the network comes from the pretrained "
                                 f"directory. Fix: drop model.{kind}")
            if not self.name.startswith(f"{kind}-"):
                raise ValueError(f"model.{kind} sets {'UNet2DModel' if kind == 'unet' else 'DiTTransformer2DModel'} "
                                 f"arguments but model.name={self.name}. Fix: choose a {kind}-* model.name")
            from model.registry import architecture_args  # diffusers, only when the section is used

            allowed = architecture_args(kind)
            unknown = sorted(set(args) - set(allowed))
            if unknown:
                raise ValueError(f"model.{kind}: unknown argument(s) {unknown}. Allowed: {', '.join(allowed)}")
        return self

    @property
    def text_conditioned(self) -> bool:
        """A text-to-image network: a text registry model, or a pretrained text-conditioned
        pipeline (UNet2DConditionModel, model/pretrained.py)."""
        if is_text_model(self.name):
            return True
        if self.pretrained is None:
            return False
        from model.pretrained import is_text_pretrained

        return is_text_pretrained(self.pretrained)

    @model_validator(mode="after")
    def _lora_needs_pretrained(self) -> "ModelConfig":
        if self.lora.rank and self.pretrained is None:
            raise ValueError(f"model.lora.rank={self.lora.rank} without model.pretrained would train adapters on "
                             "random frozen weights. Fix: set model.pretrained=DIR, or model.lora.rank=0")
        return self


def apply_pretrained(cfg: Any) -> None:
    """Keys a pretrained model fixes (model/pretrained.py) are taken from it, in place on the
    TrainConfig ``cfg``; one set to another value is refused, naming both values and the fix."""
    if cfg.model.pretrained is None:
        return
    try:
        info = read_pretrained(cfg.model.pretrained)
    except PretrainedError as e:
        raise ValueError(f"model.pretrained: {e}") from None
    if info.text_dim is not None:
        _check_text_pipeline(cfg, info)
    for key, (value, where) in info.taken().items():
        section, field = key.split(".")
        sub = getattr(cfg, section)
        current = getattr(sub, field)
        if key == "model.text_encoder" and current is not None and "://" not in current and \
                Path(current).expanduser().resolve() == Path(value).resolve():
            current = value  # the same directory, written another way
        if field in sub.model_fields_set and current != value:
            show = str(value).lower() if isinstance(value, bool) else value
            raise ValueError(f"{key}={str(current).lower() if isinstance(current, bool) else current} contradicts "
                             f"model.pretrained={cfg.model.pretrained}: the pretrained model has {key}={show} "
                             f"({where}). Fix: drop {key} (it is taken from the pretrained model) or set "
                             f"{key}={show}")
        if current != value:
            setattr(sub, field, value)


def _check_text_pipeline(cfg: Any, info: Any) -> None:
    """A text-conditioned pipeline's needs the generic keys cannot say: a text encoder, and latent
    data encoded with its VAE when it has one (Stable Diffusion denoises the VAE's latents)."""
    if info.text_encoder is None and not cfg.model.text_encoder:
        raise ValueError(f"model.pretrained={cfg.model.pretrained} is a text-conditioned {info.network_class} without "
                         "text_encoder/ + tokenizer/ folders. Fix: set model.text_encoder to the text encoder it was "
                         f"trained with (a directory with a model of hidden size {info.text_dim} and its tokenizer)")
    if info.vae is not None and cfg.data.format != "latents":
        raise ValueError(f"model.pretrained={cfg.model.pretrained} has a VAE ({info.vae}): its {info.network_class} "
                         f"denoises {info.in_channels}-channel latents, not pixels, but data.format={cfg.data.format}. "
                         f"Fix: encode the images with that VAE (`raydiff data encode SRC OUT --vae {info.vae}`) and "
                         "train with data.source=OUT data.format=latents")
