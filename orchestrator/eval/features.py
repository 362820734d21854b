"""Feature extractors for FID/KID. Each maps images in [-1, 1] (N, C, H, W) to float64 features
and carries the name its metrics are reported under, so numbers from different networks are
never mixed up.

* ``InceptionFeatures``: the 2048-d pool3 features of the TensorFlow Inception-v3 that FID is
  defined with, from NVIDIA's TorchScript port ``inception-2015-12-05.pt`` (StyleGAN2-ADA,
  clean-fid) given by the user with ``--inception PATH``; nothing is downloaded.
* ``CNNFeatures``: with no Inception weights available offline, a small CNN trained on labelled
  reference images (orchestrator/eval/classifier.py's SmallClassifier) stands in. Its features are
  the last convolution block averaged over space (64-d, the analogue of Inception's pool3), a
  space small enough for well-conditioned covariances with a few hundred samples. Scores are
  reported as "FID (ref-cnn features)": they rank checkpoints on that data set, and are not
  comparable with published Inception FIDs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from orchestrator.config import ConfigError
from orchestrator.eval.classifier import train_classifier

INCEPTION_FILE = "inception-2015-12-05.pt"
INCEPTION_HELP = (
    f"--inception expects NVIDIA's TorchScript Inception-v3, {INCEPTION_FILE} (the file StyleGAN2-ADA and "
    "clean-fid use: https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/"
    f"{INCEPTION_FILE}). pytorch-fid's pt_inception-2015-12-05-6726825d.pth and torchmetrics' "
    "weights-inception-2015-12-05-6726825d.pth are state dicts for torchvision's Inception3 class, "
    "which raydiff does not ship; download the TorchScript file on a machine with internet access and "
    "pass its path"
)


class FeatureExtractor(Protocol):
    name: str  # short id, e.g. "inception" or "ref-cnn"
    dim: int

    def __call__(self, images: torch.Tensor) -> np.ndarray: ...

    def describe(self) -> str: ...


def metric_label(metric: str, features: FeatureExtractor) -> str:
    """How a score is printed: 'FID (ref-cnn features)', 'KID (inception features)'."""
    return f"{metric} ({features.name} features)"


class InceptionFeatures:
    name = "inception"
    dim = 2048

    def __init__(self, path: str | Path, device: torch.device | str = "cpu", batch_size: int = 64):
        p = Path(path).expanduser()
        if not p.is_file():
            raise ConfigError(f"--inception {path}: no such file. {INCEPTION_HELP}")
        try:
            self.net = torch.jit.load(str(p), map_location=device).eval()
        except Exception as e:  # noqa: BLE001 - any load failure gets the same explanation
            raise ConfigError(f"--inception {path} is not a TorchScript file ({type(e).__name__}). {INCEPTION_HELP}") from None
        self.device, self.batch_size, self.path = torch.device(device), batch_size, str(p)
        probe = self._forward(torch.zeros(1, 3, 64, 64))
        if probe.shape != (1, self.dim):
            raise ConfigError(f"--inception {path}: returned features of shape {tuple(probe.shape)}, expected "
                              f"(1, {self.dim}). {INCEPTION_HELP}")

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        try:
            return self.net(x.to(self.device), return_features=True).reshape(x.shape[0], -1)
        except Exception as e:  # noqa: BLE001 - a TorchScript file with another interface
            raise ConfigError(f"--inception {self.path}: calling it as net(images, return_features=True) failed "
                              f"({type(e).__name__}). {INCEPTION_HELP}") from None

    def describe(self) -> str:
        return f"TorchScript Inception-v3 pool3 features from {self.path}, {self.dim}-d"

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> np.ndarray:
        out = []
        for i in range(0, len(images), self.batch_size):
            x = images[i : i + self.batch_size].float()
            # The network takes 8-bit pixel values (0..255, as float) and resizes to 299x299 itself;
            # rounding makes generated images what their PNGs would be.
            x = ((x.clamp(-1, 1) + 1) * 127.5).round()
            if x.shape[1] == 1:
                x = x.expand(-1, 3, -1, -1)
            out.append(self._forward(x).double().cpu())
        return torch.cat(out).numpy()


class CNNFeatures:
    name = "ref-cnn"

    def __init__(self, classifier: torch.nn.Module, *, val_accuracy: float, trained_on: int,
                 device: torch.device | str = "cpu", batch_size: int = 256):
        self.clf = classifier.to(device).eval()
        self.val_accuracy, self.trained_on = val_accuracy, trained_on
        self.device, self.batch_size = torch.device(device), batch_size
        self.dim = int(self.clf.head.in_features // 16)  # channels of the last block (AdaptiveAvgPool2d(4))

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> np.ndarray:
        out = []
        for i in range(0, len(images), self.batch_size):
            x = images[i : i + self.batch_size].float().to(self.device)
            out.append(self.clf.features(x).mean(dim=(2, 3)).double().cpu())
        return torch.cat(out).numpy()

    @classmethod
    def train(cls, images: torch.Tensor, labels: torch.Tensor, num_classes: int, *, seed: int = 0,
              device: torch.device | str = "cpu") -> "CNNFeatures":
        """Train the judge's classifier on (images, labels) (a held-out 10% gives its accuracy)."""
        clf, val_acc = train_classifier(images, labels, num_classes, seed=seed)
        return cls(clf, val_accuracy=val_acc, trained_on=len(images), device=device)

    def describe(self) -> str:
        return (f"SmallClassifier trained on {self.trained_on} reference images "
                f"(held-out accuracy {self.val_accuracy:.1%}), last conv block averaged over space, {self.dim}-d")
