"""A frozen text encoder (CLIP text model or T5 encoder) with its tokenizer, loaded with transformers.

Text-to-image diffusion keeps the text encoder frozen (Rombach et al. 2022, Sec. 4.3: a frozen
CLIP ViT-L/14 text encoder for Stable Diffusion; Saharia et al. 2022 and PixArt-alpha: a frozen
T5-XXL encoder): its weights are not in the optimizer and not in checkpoints, it runs in eval
mode under ``no_grad``, and in half precision wherever the denoiser does. Prompts are padded to
``max_length`` tokens so every batch has the same [L, D] shape; the empty prompt's embedding is
computed once and carried as the unconditional input (model/conditioning.py).

``path`` is a local directory holding either the model and its tokenizer side by side, or a
diffusers pipeline layout (``path/text_encoder`` + ``path/tokenizer``); anything else is passed
to ``from_pretrained`` as a hub name. transformers is imported only here, lazily.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from .conditioning import TextEmbeddings

# model_type values of transformers configs this module knows how to load as an encoder.
CLIP_TYPES = ("clip_text_model", "clip")
T5_TYPES = ("t5", "umt5", "mt5")
# Tokenizers without a real limit report a huge model_max_length (int(1e30)); Stable Diffusion's
# CLIP context is 77 tokens.
DEFAULT_MAX_LENGTH = 77


@dataclass(frozen=True)
class EncoderLocation:
    """Where a text encoder's weights and tokenizer live: (path or hub name, subfolder or None)."""

    model: str
    model_subfolder: str | None
    tokenizer: str
    tokenizer_subfolder: str | None


def locate(path: str) -> EncoderLocation:
    """The encoder and tokenizer locations of ``path`` (see the module docstring)."""
    if os.path.isdir(os.path.join(path, "text_encoder")) and os.path.isdir(os.path.join(path, "tokenizer")):
        return EncoderLocation(path, "text_encoder", path, "tokenizer")
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"text encoder directory {path!r} has no config.json and no text_encoder/ + tokenizer/ "
                         "subdirectories: save one with save_pretrained (model and tokenizer), "
                         "or point model.text_encoder at a diffusers pipeline directory")
    return EncoderLocation(path, None, path, None)


def _model_class(model_type: str):
    import transformers

    if model_type in CLIP_TYPES:
        return transformers.CLIPTextModel
    if model_type in T5_TYPES:
        return transformers.T5EncoderModel
    raise ValueError(f"text encoder of type {model_type!r} is not supported; use a CLIP text model "
                     f"({', '.join(CLIP_TYPES)}) or a T5 encoder ({', '.join(T5_TYPES)})")


def encoder_info(path: str) -> dict[str, Any]:
    """Type, hidden size and location of the encoder at ``path`` without loading its weights
    (for building a network's cross-attention and for the plan)."""
    from transformers import AutoConfig

    loc = locate(path)
    kw = {"subfolder": loc.model_subfolder} if loc.model_subfolder else {}
    cfg = AutoConfig.from_pretrained(loc.model, **kw)
    if cfg.model_type == "clip":
        cfg = cfg.text_config
    _model_class(cfg.model_type)
    hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "d_model")
    return {"type": cfg.model_type, "hidden_size": int(hidden), "location": loc,
            "max_position_embeddings": getattr(cfg, "max_position_embeddings", None)}


def _quiet_load(model_class: Any, location: str, **kw: Any) -> Any:
    """``model_class.from_pretrained`` without transformers' "Loading weights" progress bar (a
    frozen encoder loads on every worker and in every command; the bar is noise in their logs).
    The bar's switch is transformers' process-wide setting: restored afterwards."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        return model_class.from_pretrained(location, **kw)
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


class FrozenTextEncoder:
    """``encode(prompts) -> TextEmbeddings``; build with :meth:`from_pretrained`."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, *, max_length: int, device: torch.device) -> None:
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        self.device = torch.device(device)
        # CLIP text models are trained with a causal mask and no padding mask, and Stable
        # Diffusion feeds them none (diffusers passes attention_mask only when the config
        # asks for it); T5 is trained with a padding mask and PixArt passes it.
        cfg = model.config
        self._pass_mask = cfg.model_type in T5_TYPES or bool(getattr(cfg, "use_attention_mask", False))
        self._null = self._encode([""])

    @classmethod
    def from_pretrained(cls, path: str, *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                        max_length: int | None = None) -> FrozenTextEncoder:
        """Load the encoder at ``path`` in ``dtype`` on ``device``; ``max_length`` None takes the
        tokenizer's own limit (77 when it has none), capped at the model's positions."""
        from transformers import AutoTokenizer

        info = encoder_info(path)
        loc: EncoderLocation = info["location"]
        kw = {"subfolder": loc.model_subfolder} if loc.model_subfolder else {}
        if info["type"] in T5_TYPES and dtype == torch.float16:
            # T5's feed-forward activations overflow fp16 (the reason T5 checkpoints ship in
            # bf16/fp32 and PixArt runs T5 in bf16): the same memory, a range that holds them.
            dtype = torch.bfloat16
        model = _quiet_load(_model_class(info["type"]), loc.model, dtype=dtype, **kw)
        tkw = {"subfolder": loc.tokenizer_subfolder} if loc.tokenizer_subfolder else {}
        tokenizer = AutoTokenizer.from_pretrained(loc.tokenizer, **tkw)
        limit = info["max_position_embeddings"]
        if max_length is None:
            own = getattr(tokenizer, "model_max_length", None)
            max_length = own if isinstance(own, int) and 0 < own < 100_000 else DEFAULT_MAX_LENGTH
            if limit:
                max_length = min(max_length, int(limit))
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
            raise ValueError(f"text max_length must be an int >= 2, got {max_length!r}")
        if limit and max_length > limit:
            raise ValueError(f"text max_length {max_length} exceeds the encoder's {limit} positions: "
                             f"set model.text_max_length to at most {limit}")
        if tokenizer.pad_token is None:
            raise ValueError(f"the tokenizer at {path!r} has no pad token; prompts of a batch are padded to "
                             "max_length: save the tokenizer with a pad_token")
        return cls(model.to(device), tokenizer, max_length=max_length, device=torch.device(device))

    @property
    def embedding_dim(self) -> int:
        cfg = self.model.config
        return int(getattr(cfg, "hidden_size", None) or cfg.d_model)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @torch.no_grad()
    def _encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        tok = self.tokenizer(list(prompts), padding="max_length", max_length=self.max_length, truncation=True,
                             return_tensors="pt")
        ids = tok["input_ids"].to(self.device)
        mask = tok["attention_mask"].to(self.device)
        out = self.model(ids, attention_mask=mask if self._pass_mask else None)
        return out.last_hidden_state, mask.bool()

    def null(self) -> TextEmbeddings:
        """The empty prompt's embedding as a batch of one (the unconditional input)."""
        h, m = self._null
        return TextEmbeddings(h, m, h[0], m[0])

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> TextEmbeddings:
        """Embeddings of ``prompts`` (str each; "" is the empty prompt), on the encoder's device
        and in its dtype."""
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompts must be a list of str")
        if not prompts:
            raise ValueError("prompts must not be empty")
        h, m = self._encode(prompts)
        nh, nm = self._null
        return TextEmbeddings(h, m, nh[0], nm[0])
