"""The small CNN both judges train on the real images (judge.py sees colour, shape_judge.py a
colour-blind view) and the feature extractor falls back to (features.py)."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

# Training noise of random strength up to this: the judge must recognise the class of a sample
# that still carries some residual noise.
NOISE_AUG_MAX = 0.4


class SmallClassifier(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, width: int = 32):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4),
        )
        self.head = nn.Linear(2 * width * 16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


def train_classifier(images: torch.Tensor, labels: torch.Tensor, num_classes: int, *, epochs: int = 4,
                     seed: int = 0, train_view: Callable[[torch.Tensor], torch.Tensor] | None = None,
                     val_view: Callable[[torch.Tensor], torch.Tensor] | None = None,
                     noise_max: float = NOISE_AUG_MAX) -> tuple[SmallClassifier, float]:
    """Returns the classifier and its accuracy on a held-out 10% of the real images.

    ``train_view`` / ``val_view`` transform the images the classifier sees (the shape judge's
    colour-blind view, with a random colour mix per training image); default: the images."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(images), generator=g)
    n_val = max(1, len(images) // 10)
    val, tr = perm[:n_val], perm[n_val:]
    train_view = train_view or (lambda x: x)
    val_view = val_view or (lambda x: x)
    torch.manual_seed(seed)
    clf = SmallClassifier(val_view(images[:1]).shape[1], num_classes)
    opt = torch.optim.Adam(clf.parameters(), lr=2e-3)
    for _ in range(epochs):
        order = tr[torch.randperm(len(tr), generator=g)]
        for i in range(0, len(order), 128):
            idx = order[i : i + 128]
            x = train_view(images[idx])
            flip = torch.rand(len(idx), generator=g) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            # Gaussian noise of random strength: the judge must recognise the class of a sample
            # that still carries some residual noise, not reject it for its texture.
            sigma = torch.rand(len(idx), generator=g)[:, None, None, None] * noise_max
            x = x + sigma * torch.randn(x.shape, generator=g)
            loss = F.cross_entropy(clf(x), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return clf, accuracy(clf, val_view(images[val]), labels[val])


@torch.no_grad()
def accuracy(clf: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    clf.eval()
    pred = torch.cat([clf(images[i : i + 256]).argmax(1) for i in range(0, len(images), 256)])
    return float((pred == labels).float().mean())
