"""Named model configurations: the choices of `model.name` (and `raydiff bench step --model`)."""

from __future__ import annotations

from diffusers import DiTTransformer2DModel, PixArtTransformer2DModel, UNet2DConditionModel, UNet2DModel
from diffusers.models.embeddings import LabelEmbedding
from torch import nn

from .networks import Denoiser
from .choices import MODEL_NAMES, TEXT_MODEL_NAMES, ModelName, is_text_model  # torch-free: the config schema reads them


# U-Net configs. unet-cifar is the DDPM CIFAR-10 network (Ho et al. 2020, App. B: 4
# resolutions 32..4, channel multipliers (1,2,2,2) x 128, 2 res blocks per resolution,
# self-attention at 16x16, dropout 0.1; 35.7M parameters) in diffusers' layout, with the
# remaining settings of google/ddpm-cifar10-32 (the port of the original checkpoint).
_UNETS: dict[str, dict] = {
    "unet-tiny": dict(
        # ~0.45M params, ~0.2 s per forward+backward of a 32x3x32x32 batch on 2 CPU
        # cores: for tests and the CPU demo. Attention only at 16x16 (3 heads of 16).
        block_out_channels=(32, 48),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=16,
    ),
    "unet-demo": dict(
        # ~1.8M params, the CPU demo's network (orchestrator/data/demo.py shapes, 32x32).
        # Three resolutions (32, 16, 8) with self-attention only at 8x8: attention over the
        # 256 tokens of 16x16 dominated unet-tiny's step, so this network has 4x the
        # parameters and a receptive field covering the whole image, yet trains 1.3x faster
        # per image on one CPU core in bf16 (BENCHMARKS.md, "Built-in demo").
        block_out_channels=(32, 64, 96),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=32,
    ),
    "unet-small": dict(
        block_out_channels=(64, 128, 128),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=16,
        attention_head_dim=32,
        dropout=0.1,
    ),
    "unet-cifar": dict(
        block_out_channels=(128, 256, 256, 256),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=32,
        attention_head_dim=None,
        dropout=0.1,
        flip_sin_to_cos=False,
        freq_shift=1,
        downsample_padding=0,
        norm_eps=1e-6,
    ),
}

# DiT configs (Peebles & Xie 2023, Table 1): (depth, hidden size, heads); patch size 2.
_DITS: dict[str, tuple[int, int, int]] = {
    "dit-s2": (12, 384, 6),
    "dit-b2": (12, 768, 12),
    "dit-l2": (24, 1024, 16),
    "dit-xl2": (28, 1152, 16),
}
DIT_PATCH_SIZE = 2


# Text-conditioned U-Nets (diffusers' UNet2DConditionModel: ResNet blocks plus transformer blocks
# of self-attention, cross-attention to the text embeddings and a feed-forward, Rombach et al.
# 2022). cross_attention_dim is the text encoder's hidden size, set at build time.
# NB diffusers' `attention_head_dim` of this class is the number of HEADS (a legacy naming kept
# for Stable Diffusion's configs).
_TEXT_UNETS: dict[str, dict] = {
    "unet-text-tiny": dict(
        # for tests: cross-attention at 16x16 and in the 16x16 middle block.
        block_out_channels=(32, 48),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=2,
    ),
    "unet-text-demo": dict(
        # The CPU text demo at 32x32: unet-demo's layout (attention only at 8x8, where it is
        # cheap; BENCHMARKS.md "Built-in demo") with its attention blocks reading the prompt.
        block_out_channels=(32, 64, 96),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=3,
    ),
    "unet-text-sd": dict(
        # Stable Diffusion v1's U-Net (Rombach et al. 2022, ~860M parameters with a 768-wide
        # CLIP ViT-L/14 text encoder): 4 levels 320..1280, cross-attention at the first three.
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        norm_num_groups=32,
        attention_head_dim=8,
    ),
}

# PixArt-style DiTs (Chen et al. 2023, PixArt-alpha: DiT blocks with adaLN-single timestep
# modulation and cross-attention to T5 embeddings): (depth, hidden size, heads); patch size 2.
_PIXARTS: dict[str, tuple[int, int, int]] = {
    "pixart-tiny": (2, 64, 2),
    "pixart-alpha": (28, 1152, 16),  # PixArt-XL-2, ~600M parameters
}
def count_parameters(module: nn.Module) -> int:
    """Number of parameter elements (all parameters, trainable or not)."""
    return sum(p.numel() for p in module.parameters())


# Constructor arguments raydiff sets itself (from the data and the conditioning): not overridable
# through ``arch`` (model.unet / model.dit).
RESERVED_ARGS: dict[str, frozenset[str]] = {
    "unet": frozenset({"sample_size", "in_channels", "out_channels", "num_class_embeds", "class_embed_type"}),
    "dit": frozenset({"sample_size", "in_channels", "out_channels", "num_embeds_ada_norm", "norm_type"}),
}


def architecture_args(kind: str) -> tuple[str, ...]:
    """The diffusers constructor arguments ``model.unet`` (``kind="unet"``: UNet2DModel) or
    ``model.dit`` (DiTTransformer2DModel) may set, from the constructor's signature."""
    import inspect

    cls = UNet2DModel if kind == "unet" else DiTTransformer2DModel
    names = [n for n in inspect.signature(cls.__init__).parameters if n != "self"]
    return tuple(sorted(n for n in names if n not in RESERVED_ARGS[kind]))


def build_model(
    name: ModelName, *, in_channels: int = 3, image_size: int = 32, num_classes: int | None = None,
    text_dim: int | None = None, arch: dict | None = None,
) -> Denoiser:
    """Build a :class:`Denoiser` by registry name for ``in_channels`` x ``image_size``².

    ``num_classes`` enables class conditioning with an extra null class (index
    ``num_classes``) for classifier-free guidance; None builds an unconditional model.
    Text models (:data:`TEXT_MODEL_NAMES`) need ``text_dim``, the text encoder's hidden size,
    which their cross-attention reads.
    ``arch``: diffusers constructor arguments replacing the named configuration's (a network size
    the registry lacks); keys outside ``architecture_args`` are refused.
    """
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model {name!r}; choose one of {MODEL_NAMES}")
    if arch and is_text_model(name):
        raise ValueError(f"{name}: constructor arguments (model.unet / model.dit) apply to the unet-* and dit-* "
                         "networks, not to the text models")
    kind = "unet" if name in _UNETS else "dit"
    arch = dict(arch or {})
    unknown = sorted(set(arch) - set(architecture_args(kind)))
    if unknown:
        raise ValueError(f"unknown {kind} constructor arguments {unknown}; allowed: {list(architecture_args(kind))}")
    if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
        raise ValueError(f"in_channels must be a positive int, got {in_channels!r}")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1):
        raise ValueError(f"num_classes must be a positive int or None, got {num_classes!r}")
    if is_text_model(name):
        if isinstance(text_dim, bool) or not isinstance(text_dim, int) or text_dim < 1:
            raise ValueError(f"{name} is text-conditioned: text_dim must be the text encoder's hidden size, got {text_dim!r}")
        if num_classes is not None:
            raise ValueError(f"{name} is text-conditioned and takes no class labels (num_classes={num_classes})")
        return _build_text_model(name, in_channels, image_size, text_dim)
    if text_dim is not None:
        raise ValueError(f"{name} is not text-conditioned; choose one of {TEXT_MODEL_NAMES} for text")

    if name in _UNETS:
        cfg = {**_UNETS[name], **arch}
        factor = 2 ** (len(cfg["block_out_channels"]) - 1)
        if image_size % factor:
            raise ValueError(f"{name} downsamples by {factor}; image_size {image_size} is not divisible by it")
        backbone = UNet2DModel(
            sample_size=image_size,
            in_channels=in_channels,
            out_channels=in_channels,
            # One extra embedding row = the null class (see module docstring).
            num_class_embeds=None if num_classes is None else num_classes + 1,
            **cfg,
        )
        return Denoiser(backbone, "unet", in_channels=in_channels, image_size=image_size, num_classes=num_classes)

    depth, hidden, heads = _DITS[name]
    kwargs = {"num_attention_heads": heads, "attention_head_dim": hidden // heads, "num_layers": depth,
              "patch_size": DIT_PATCH_SIZE, **arch}
    if image_size % kwargs["patch_size"]:
        raise ValueError(f"{name} uses patch size {kwargs['patch_size']}; image_size {image_size} is not divisible by it")
    backbone = DiTTransformer2DModel(
        in_channels=in_channels,
        out_channels=in_channels,  # no learned sigma: fixed-variance samplers only
        sample_size=image_size,
        # diffusers' LabelEmbedding (dropout_prob 0.1 by default) allocates
        # num_embeds_ada_norm + 1 rows, the last being its CFG "null" row. We use that row
        # as our null class (index num_classes), exactly as in the original DiT code,
        # instead of adding a second one. Unconditional: one class, label always 0.
        num_embeds_ada_norm=1 if num_classes is None else num_classes,
        **kwargs,
    )
    for m in backbone.modules():
        if isinstance(m, LabelEmbedding):
            if m.embedding_table.num_embeddings != m.num_classes + 1:
                raise RuntimeError("unexpected diffusers LabelEmbedding layout (no null row)")
            # Disable diffusers' internal, unseeded label dropout: DiffusionObjective.drop_cond
            # does it with the caller's generator, and dropping twice would change the rate.
            m.dropout_prob = 0.0
    return Denoiser(backbone, "dit", in_channels=in_channels, image_size=image_size, num_classes=num_classes)


def _build_text_model(name: str, in_channels: int, image_size: int, text_dim: int) -> Denoiser:
    if name in _TEXT_UNETS:
        cfg = dict(_TEXT_UNETS[name])
        factor = 2 ** (len(cfg["block_out_channels"]) - 1)
        if image_size % factor:
            raise ValueError(f"{name} downsamples by {factor}; image_size {image_size} is not divisible by it")
        backbone = UNet2DConditionModel(sample_size=image_size, in_channels=in_channels, out_channels=in_channels,
                                        cross_attention_dim=text_dim, **cfg)
        return Denoiser(backbone, "unet-text", in_channels=in_channels, image_size=image_size, num_classes=None,
                        text_dim=text_dim)
    depth, hidden, heads = _PIXARTS[name]
    if image_size % DIT_PATCH_SIZE:
        raise ValueError(f"{name} uses patch size {DIT_PATCH_SIZE}; image_size {image_size} is not divisible by it")
    backbone = PixArtTransformer2DModel(
        num_attention_heads=heads,
        attention_head_dim=hidden // heads,
        in_channels=in_channels,
        out_channels=in_channels,  # no learned sigma: fixed-variance samplers only
        num_layers=depth,
        sample_size=image_size,
        patch_size=DIT_PATCH_SIZE,
        # The caption projection maps the encoder's width to the model's; cross-attention then
        # runs at the model's width (PixArt-alpha's caption_projection).
        caption_channels=text_dim,
        cross_attention_dim=hidden,
        # PixArt-alpha's resolution/aspect-ratio micro-conditions are for its 1024px multi-aspect
        # stage; square single-resolution training does not use them.
        use_additional_conditions=False,
    )
    return Denoiser(backbone, "pixart", in_channels=in_channels, image_size=image_size, num_classes=None,
                    text_dim=text_dim)
