"""The validation loss: fixed timesteps and noise, independent of weighting, prediction type and
number of ranks; labels go in without dropout."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.conditioning import ClassLabels
from model.objectives import DiffusionObjective
from model.schedules import make_schedule
from orchestrator.train.validation import Validator, validation_timesteps


def _images(n=6, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, size=(n, 3, 8, 8)).astype(np.float32)


class Oracle(torch.nn.Module):
    """Knows the held-out images: recovers the exact noise from x_t and answers in its
    parameterisation, so its validation loss is ~0 whatever the prediction type."""

    def __init__(self, objective: DiffusionObjective, x0: torch.Tensor):
        super().__init__()
        self.objective, self.x0 = objective, x0

    def forward(self, x_t, t, cond):
        labels = cond.labels
        # Find each row's image: the one whose noise estimate is smallest in norm is not unique,
        # so the test passes labels = image index.
        x0 = self.x0[labels]
        a = self.objective.schedule.alpha(t).float().view(-1, 1, 1, 1)
        s = self.objective.schedule.sigma(t).float().view(-1, 1, 1, 1)
        eps = (x_t - a * x0) / s
        pred = self.objective.prediction
        return eps if pred == "eps" else x0 if pred == "x0" else a * eps - s * x0


def test_timesteps_are_evenly_spaced_midpoints():
    assert validation_timesteps(1000, 4).tolist() == [125, 375, 625, 875]
    assert validation_timesteps(10, 20).tolist() == list(range(10))  # capped at T, no duplicates


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_oracle_scores_zero_for_every_prediction_type(prediction):
    sched = make_schedule("linear", 100)
    obj = DiffusionObjective(sched, prediction, "min_snr")
    imgs = _images()
    v = Validator(imgs, ClassLabels(torch.arange(6), 6), obj, timesteps=5, seed=3, batch_size=4)
    out = v.run(Oracle(obj, torch.from_numpy(imgs)))
    assert out["val_loss"] < 1e-6 and len(out["val_loss_per_t"]) == 5


def test_same_model_same_number_whatever_weighting_and_repeat():
    torch.manual_seed(0)
    net = torch.nn.Conv2d(3, 3, 3, padding=1)
    model = lambda x, t, cond: net(x)  # noqa: E731
    imgs = _images()
    results = []
    for weighting in ("uniform", "min_snr", "p2"):
        obj = DiffusionObjective(make_schedule("linear", 100), "eps", weighting)
        v = Validator(imgs, None, obj, timesteps=4, seed=1)
        results += [v.run(model)["val_loss"], v.run(model)["val_loss"]]
    assert max(results) - min(results) < 1e-7
    # Other noise (another data.seed) gives another number: the noise is really fixed by the seed.
    obj = DiffusionObjective(make_schedule("linear", 100), "eps", "uniform")
    assert abs(Validator(imgs, None, obj, timesteps=4, seed=2).run(model)["val_loss"] - results[0]) > 1e-6


def test_ranks_split_images_and_sum_to_the_single_process_result():
    obj = DiffusionObjective(make_schedule("cosine", 50), "v", "uniform", cond_dropout=0.9)
    imgs, labels = _images(7), ClassLabels(torch.arange(7) % 10, 10)
    seen: list[torch.Tensor] = []

    def model(x, t, cond):
        seen.append(cond.labels.clone())
        return torch.tanh(x * 0.5)

    whole = Validator(imgs, labels, obj, timesteps=3, seed=0, batch_size=5).partial(model)
    parts = [Validator(imgs, labels, obj, timesteps=3, seed=0, rank=r, world=3, batch_size=2).partial(model)
             for r in range(3)]
    assert torch.allclose(sum(parts), whole, atol=1e-5)
    assert whole[3:].sum().item() == 7 * 3  # every (image, timestep) pair once
    # Labels reach the model as they are: no classifier-free-guidance dropout in validation.
    assert all(bool((lab < 10).all()) for lab in seen)
