"""A judge of *shape*, blind to colour: does a generated sample show the shape of its class?

The class judge (judge.py) sees colour, and on the built-in set colour alone separates most
classes, so a row of correctly coloured blobs on grey noise scores well there. This judge sees
only a per-image normalised grey-level image: the shape against its background. It is trained on
the real images with the grey level taken as a *random* mix of the colour channels (a random
colour-to-grey projection per image, so no channel weighting identifies the class) and
evaluated with the plain channel mean. Per-image normalisation (zero mean, unit variance)
removes the remaining brightness cue; a sample whose background is grey noise stays noise after
it, and is not recognised.

On the built-in set each class has its own shape (orchestrator/data/demo.py), so the shape
family is the class label. For data sets whose classes are not shapes the score is still the
fraction of samples recognised from their grey-level structure, and means less.
"""

from __future__ import annotations

import torch

from orchestrator.eval.classifier import SmallClassifier, train_classifier

# Training noise of random strength up to this (in units of the normalised image): samples
# are judged with a little residual noise, not rejected for it; more would teach the judge
# to read shapes through the noisy backgrounds this judge exists to penalise.
NOISE_AUG_MAX = 0.3
# Dirichlet concentration of the random channel weights: 2 keeps most mixes away from
# "one channel only", where a dark-blue shape could vanish into a dark background.
MIX_CONCENTRATION = 2.0
# The score a demo run must reach for its shapes to count as recognisable (README, issue 13).
SHAPE_THRESHOLD = 0.6


def shape_view(images: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """[N, C, H, W] in [-1, 1] -> [N, 1, H, W]: channel mix (``weights`` [N, C] summing to 1,
    default the mean), then zero mean and unit variance per image."""
    x = images.float()
    if weights is None:
        g = x.mean(dim=1, keepdim=True)
    else:
        g = (x * weights[:, :, None, None]).sum(dim=1, keepdim=True)
    mu = g.mean(dim=(1, 2, 3), keepdim=True)
    sd = g.std(dim=(1, 2, 3), keepdim=True)
    # A flat image (std 0) stays flat instead of becoming NaN.
    return (g - mu) / (sd + 1e-3)


class ShapeJudge:
    """Train with :meth:`train`, score samples with :meth:`score`."""

    def __init__(self, classifier: SmallClassifier, val_accuracy: float):
        self.clf = classifier.eval()
        self.val_accuracy = val_accuracy

    @classmethod
    def train(cls, images: torch.Tensor, labels: torch.Tensor, num_classes: int, *, epochs: int = 6,
              seed: int = 0) -> "ShapeJudge":
        """Train on real ``images`` (a held-out 10% gives ``val_accuracy``, judged like samples)."""
        conc = torch.full((images.shape[1],), MIX_CONCENTRATION)

        def random_mix(x: torch.Tensor) -> torch.Tensor:  # a new colour-to-grey mix per image
            return shape_view(x, torch.distributions.Dirichlet(conc).sample((len(x),)) if x.shape[1] > 1 else None)

        clf, val_acc = train_classifier(images, labels, num_classes, epochs=epochs, seed=seed, train_view=random_mix,
                                        val_view=shape_view, noise_max=NOISE_AUG_MAX)
        return cls(clf, val_acc)

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        self.clf.eval()
        return torch.cat([self.clf(shape_view(images[i : i + 256])).argmax(1) for i in range(0, len(images), 256)])

    def score(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[float, list[float]]:
        """(fraction of samples whose shape is recognised as their class, per-class fractions)."""
        hit = (self.predict(images) == labels).float()
        classes = int(labels.max()) + 1 if len(labels) else 0
        return float(hit.mean()), [float(hit[labels == c].mean()) if (labels == c).any() else float("nan")
                                   for c in range(classes)]
