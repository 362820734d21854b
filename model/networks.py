"""Uniform wrapper around diffusers backbones: ``Denoiser.forward(x, t, cond) -> Tensor``.

The denoiser is the one place that opens the conditioning object (model/conditioning.py) and
maps it to the backbone's inputs: :class:`ClassLabels` become ``class_labels``;
:class:`TextEmbeddings` become ``encoder_hidden_states`` for cross-attention (Rombach et al.
2022, Sec. 3.3), with ``encoder_attention_mask`` for the PixArt DiT (PixArt-alpha masks padded
T5 tokens) but not for the U-Net: Stable Diffusion's U-Net attends to all L positions of the
padded CLIP output (causal attention makes the padded states a function of the real tokens), and
a U-Net exported to diffusers' ``StableDiffusionPipeline`` must see what it saw in training. Class
conditioning reserves one extra embedding row, index ``num_classes``, as the learned "null"
class used by label dropout during training and by classifier-free guidance at sampling
(Ho & Salimans 2022, Sec. 3.2; DiT's ``LabelEmbedding`` does the same).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from .conditioning import ClassLabels, Conditioning, TextEmbeddings

BackboneKind = Literal["unet", "dit", "unet-text", "pixart"]
TEXT_KINDS = ("unet-text", "pixart")


class Denoiser(nn.Module):
    """Wraps ``UNet2DModel`` / ``DiTTransformer2DModel`` (class labels) or ``UNet2DConditionModel``
    / ``PixArtTransformer2DModel`` (text, cross-attention) behind ``forward(x, t, cond=None)``.

    * ``t``: LongTensor [B] (or a 0-d tensor / int, broadcast to the batch).
    * ``cond``: :class:`ClassLabels` [B] whose ``null_index`` is ``num_classes`` (the null
      class). For a class-conditional model ``cond=None`` means "unconditional" and feeds the
      null class. An unconditional model (num_classes None) rejects any conditioning. A text
      model (``text_dim`` set) takes :class:`TextEmbeddings` of width ``text_dim`` only: its
      unconditional input is the empty prompt's embedding (``cond.null_like()``).
    * returns a tensor of the same shape as ``x`` (eps / v / x0, as the objective defines).
    """

    def __init__(
        self,
        backbone: nn.Module,
        kind: BackboneKind,
        *,
        in_channels: int,
        image_size: int,
        num_classes: int | None,
        text_dim: int | None = None,
    ) -> None:
        super().__init__()
        if kind not in ("unet", "dit", "unet-text", "pixart"):
            raise ValueError(f"kind must be one of unet, dit, unet-text, pixart; got {kind!r}")
        if (kind in TEXT_KINDS) != (text_dim is not None) or (text_dim is not None and num_classes is not None):
            raise ValueError(f"a {kind} backbone needs text_dim {'set' if kind in TEXT_KINDS else 'None'} "
                             f"and num_classes None for text models, got text_dim={text_dim}, num_classes={num_classes}")
        self.backbone = backbone
        self.kind: BackboneKind = kind
        self.in_channels = int(in_channels)
        self.image_size = int(image_size)
        self.num_classes = num_classes
        self.null_label = num_classes
        # Hidden size of the text encoder whose TextEmbeddings this network reads (None: no text).
        self.text_dim = text_dim

    @property
    def is_text(self) -> bool:
        return self.text_dim is not None

    def _text(self, cond: Conditioning | None, batch: int, x: Tensor) -> TextEmbeddings:
        if not isinstance(cond, TextEmbeddings):
            raise ValueError(f"this model is text-conditioned: it takes TextEmbeddings (the empty prompt's for "
                             f"unconditional samples), got {type(cond).__name__}")
        if cond.dim != self.text_dim:
            raise ValueError(f"text embeddings of width {cond.dim} given to a model built for a text encoder "
                             f"of hidden size {self.text_dim}: use the model.text_encoder it was trained with")
        if cond.batch_size != batch:
            raise ValueError(f"conditioning for {cond.batch_size} samples given with a batch of {batch}")
        # Under autocast the backbone casts; with half-precision weights (DeepSpeed's engine)
        # the states must already be in the weights' dtype.
        dtype = x.dtype if x.dtype.is_floating_point else None
        return cond.to(x.device, dtype)

    def _labels(self, cond: Conditioning | None, batch: int, device: torch.device) -> Tensor | None:
        if self.num_classes is None:
            if cond is not None:
                raise ValueError(f"this model is unconditional (num_classes=None) but {type(cond).__name__} was given")
            if self.kind == "dit":
                # diffusers' DiT (norm_type "ada_norm_zero") always embeds a class label;
                # an unconditional DiT is built with a single class and always sees label 0.
                return torch.zeros(batch, dtype=torch.long, device=device)
            return None
        if cond is None:
            return torch.full((batch,), self.null_label, dtype=torch.long, device=device)
        if not isinstance(cond, ClassLabels):
            raise ValueError(f"this model is class-conditional: it takes ClassLabels, got {type(cond).__name__}")
        if cond.null_index != self.num_classes:
            raise ValueError(f"ClassLabels with null_index {cond.null_index} given to a model with "
                             f"{self.num_classes} classes (null class {self.num_classes})")
        if cond.batch_size != batch:
            raise ValueError(f"conditioning for {cond.batch_size} samples given with a batch of {batch}")
        return cond.labels.to(device)

    def forward(self, x: Tensor, t: Tensor | int, cond: Conditioning | None = None) -> Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected x of shape (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        b = x.shape[0]
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(b)
        if t.shape != (b,):
            raise ValueError(f"t must be a scalar or have shape ({b},), got {tuple(t.shape)}")
        if self.is_text:
            text = self._text(cond, b, x)
            if self.kind == "unet-text":
                return self.backbone(x, t, encoder_hidden_states=text.hidden_states).sample
            return self.backbone(x, encoder_hidden_states=text.hidden_states, timestep=t,
                                 added_cond_kwargs={"resolution": None, "aspect_ratio": None},
                                 encoder_attention_mask=text.mask.to(x.dtype)).sample
        class_labels = self._labels(cond, b, x.device)
        if self.kind == "unet":
            out = self.backbone(x, t, class_labels=class_labels).sample
        else:
            out = self.backbone(x, timestep=t, class_labels=class_labels).sample
        return out
