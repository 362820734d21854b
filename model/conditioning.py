"""What a network is conditioned on, as one object that every layer passes through unopened.

The objective (label dropout), classifier-free guidance (the unconditional half), the samplers,
the sample grids and the exports handle a :class:`Conditioning` only through the operations
below; only the network (model/networks.py) looks inside and maps it to its backbone's inputs
(``class_labels`` for class labels). A new kind of conditioning (text embeddings fed to
cross-attention, say) is a new subclass plus the network that reads it; nothing between them
changes. ``None`` stands for "no conditioning": the input of an unconditional model.

The unconditional input of classifier-free guidance (Ho & Salimans 2022) is a learned "null"
conditioning of the same kind: the extra class index for class labels (DiT's ``LabelEmbedding``),
the empty prompt's embedding for text (diffusers' ``StableDiffusionPipeline``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Self

import numpy as np
import torch
from torch import Tensor

from ._checks import check_range


class Conditioning(ABC):
    """A batch of per-sample conditioning inputs; every operation returns a new object."""

    @property
    @abstractmethod
    def batch_size(self) -> int:
        """Number of samples conditioned."""

    @abstractmethod
    def to(self, device: torch.device | str) -> Self:
        """The same conditioning on ``device``."""

    @abstractmethod
    def null_like(self) -> Self:
        """The unconditional input (the learned null conditioning) for as many samples."""

    @abstractmethod
    def drop(self, mask: Tensor) -> Self:
        """Samples where the boolean ``mask`` [B] is True replaced by the null conditioning
        (training-time dropout, Ho & Salimans 2022, Algorithm 1)."""

    @abstractmethod
    def cat(self, other: Self) -> Self:
        """This batch followed by ``other`` (one forward pass for both halves of guidance)."""

    @abstractmethod
    def __getitem__(self, index: slice | Tensor) -> Self:
        """The samples selected by a slice or an index tensor (sub-batches, a rank's share)."""


@dataclass(frozen=True)
class ClassLabels(Conditioning):
    """Class indices [B] in [0, null_index]; ``null_index`` (the number of classes) is the
    learned null class that an unconditional input feeds."""

    labels: Tensor
    null_index: int

    def __post_init__(self) -> None:
        if isinstance(self.null_index, bool) or not isinstance(self.null_index, int) or self.null_index < 1:
            raise ValueError(f"null_index must be a positive int (the number of classes), got {self.null_index!r}")
        labels = torch.as_tensor(self.labels)
        if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.ndim != 1:
            raise ValueError(f"labels must be a 1-D integer tensor, got dtype {labels.dtype} "
                             f"shape {tuple(labels.shape)}")
        n = self.null_index
        check_range(labels, 0, n, f"labels must lie in [0, {n}] ({n} = null class)")
        object.__setattr__(self, "labels", labels.long())

    @property
    def batch_size(self) -> int:
        return int(self.labels.shape[0])

    def to(self, device: torch.device | str) -> ClassLabels:
        return ClassLabels(self.labels.to(device), self.null_index)

    def null_like(self) -> ClassLabels:
        return ClassLabels(torch.full_like(self.labels, self.null_index), self.null_index)

    def drop(self, mask: Tensor) -> ClassLabels:
        if mask.shape != self.labels.shape:
            raise ValueError(f"mask must have shape ({self.batch_size},), got {tuple(mask.shape)}")
        return ClassLabels(torch.where(mask, torch.full_like(self.labels, self.null_index), self.labels),
                           self.null_index)

    def cat(self, other: ClassLabels) -> ClassLabels:
        if not isinstance(other, ClassLabels) or other.null_index != self.null_index:
            raise ValueError(f"can only concatenate ClassLabels with null_index {self.null_index}, got {other!r}")
        return ClassLabels(torch.cat([self.labels, other.labels.to(self.labels.device)]), self.null_index)

    def __getitem__(self, index: slice | Tensor) -> ClassLabels:
        return ClassLabels(self.labels[index], self.null_index)


def class_conditioning(labels: Tensor | np.ndarray | None, num_classes: int | None) -> ClassLabels | None:
    """The conditioning of a model with ``num_classes`` classes (None: unconditional, and any
    labels the data carries are not used), whose null class is index ``num_classes``."""
    if num_classes is None:
        return None
    if labels is None:
        raise ValueError(f"a class-conditional model ({num_classes} classes) needs labels")
    if isinstance(labels, np.ndarray):
        labels = torch.from_numpy(labels)
    return ClassLabels(labels, num_classes)


@dataclass(frozen=True)
class TextEmbeddings(Conditioning):
    """A frozen text encoder's output for B prompts: ``hidden_states`` [B, L, D] (what
    cross-attention reads), ``mask`` [B, L] (True at real tokens, False at padding) and the
    empty prompt's embedding ``null_hidden`` [L, D] / ``null_mask`` [L], which is the
    unconditional input of classifier-free guidance: Stable Diffusion and PixArt train the
    unconditional branch by replacing captions with the empty prompt (caption dropout) and guide
    against it at sampling (diffusers' ``StableDiffusionPipeline``, ``negative_prompt=""``).

    Every prompt is padded to the same length L (the tokenizer's ``max_length``), so batches
    concatenate without re-padding.
    """

    hidden_states: Tensor
    mask: Tensor
    null_hidden: Tensor
    null_mask: Tensor

    def __post_init__(self) -> None:
        h, m = self.hidden_states, torch.as_tensor(self.mask)
        nh, nm = self.null_hidden, torch.as_tensor(self.null_mask)
        if h.ndim != 3 or not h.dtype.is_floating_point:
            raise ValueError(f"hidden_states must be a float tensor [B, L, D], got dtype {h.dtype} shape {tuple(h.shape)}")
        if tuple(m.shape) != tuple(h.shape[:2]):
            raise ValueError(f"mask must have shape {tuple(h.shape[:2])} (B, L), got {tuple(m.shape)}")
        if tuple(nh.shape) != tuple(h.shape[1:]):
            raise ValueError(f"null_hidden (the empty prompt's embedding) must have shape {tuple(h.shape[1:])} "
                             f"(L, D), got {tuple(nh.shape)}")
        if tuple(nm.shape) != (h.shape[1],):
            raise ValueError(f"null_mask must have shape ({h.shape[1]},), got {tuple(nm.shape)}")
        object.__setattr__(self, "mask", m.to(device=h.device, dtype=torch.bool))
        object.__setattr__(self, "null_hidden", nh.to(device=h.device, dtype=h.dtype))
        object.__setattr__(self, "null_mask", nm.to(device=h.device, dtype=torch.bool))

    @property
    def batch_size(self) -> int:
        return int(self.hidden_states.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.hidden_states.shape[1])

    @property
    def dim(self) -> int:
        return int(self.hidden_states.shape[2])

    def _with(self, hidden: Tensor, mask: Tensor) -> TextEmbeddings:
        return TextEmbeddings(hidden, mask, self.null_hidden, self.null_mask)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> TextEmbeddings:
        """On ``device`` (and with hidden states in ``dtype`` when given)."""
        h = self.hidden_states.to(device=device, dtype=dtype or self.hidden_states.dtype)
        return TextEmbeddings(h, self.mask.to(device), self.null_hidden.to(device), self.null_mask.to(device))

    def null_like(self) -> TextEmbeddings:
        b = self.batch_size
        return self._with(self.null_hidden.expand(b, -1, -1).clone(), self.null_mask.expand(b, -1).clone())

    def drop(self, mask: Tensor) -> TextEmbeddings:
        if tuple(mask.shape) != (self.batch_size,):
            raise ValueError(f"mask must have shape ({self.batch_size},), got {tuple(mask.shape)}")
        mask = mask.to(self.hidden_states.device, torch.bool)
        hidden = torch.where(mask[:, None, None], self.null_hidden[None], self.hidden_states)
        keep = torch.where(mask[:, None], self.null_mask[None], self.mask)
        return self._with(hidden, keep)

    def cat(self, other: TextEmbeddings) -> TextEmbeddings:
        if not isinstance(other, TextEmbeddings) or other.hidden_states.shape[1:] != self.hidden_states.shape[1:]:
            raise ValueError(f"can only concatenate TextEmbeddings of shape [*, {self.seq_len}, {self.dim}], "
                             f"got {other!r}")
        dev = self.hidden_states.device
        return self._with(torch.cat([self.hidden_states, other.hidden_states.to(dev, self.hidden_states.dtype)]),
                          torch.cat([self.mask, other.mask.to(dev)]))

    def __getitem__(self, index: slice | Tensor) -> TextEmbeddings:
        if isinstance(index, Tensor):
            index = index.to(self.hidden_states.device)
        return self._with(self.hidden_states[index], self.mask[index])

    def __repr__(self) -> str:
        return (f"TextEmbeddings(batch={self.batch_size}, length={self.seq_len}, dim={self.dim}, "
                f"dtype={self.hidden_states.dtype}, device={self.hidden_states.device})")


def text_conditioning(hidden: Tensor | np.ndarray, mask: Tensor | np.ndarray,
                      null: TextEmbeddings) -> TextEmbeddings:
    """Precomputed embeddings (``raydiff data encode``: [B, L, D] and [B, L]) as
    :class:`TextEmbeddings` whose null is ``null``'s (the empty prompt of the same encoder)."""
    hidden = torch.as_tensor(np.asarray(hidden) if not isinstance(hidden, Tensor) else hidden)
    mask = torch.as_tensor(np.asarray(mask) if not isinstance(mask, Tensor) else mask)
    if hidden.ndim != 3 or tuple(hidden.shape[1:]) != (null.seq_len, null.dim):
        raise ValueError(f"precomputed text embeddings have shape {tuple(hidden.shape)} but the text encoder "
                         f"gives [B, {null.seq_len}, {null.dim}]: re-encode the captions with the same "
                         "model.text_encoder and model.text_max_length (raydiff data encode)")
    return TextEmbeddings(hidden.to(null.hidden_states.dtype), mask, null.null_hidden, null.null_mask)
