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
