"""DiffusionObjective: targets, loss weights (min-SNR, P2), conditioning (label) dropout and
timestep bins. Guidance and the conditioning objects: tests/test_model_conditioning.py."""

from __future__ import annotations

import math

import pytest
import torch

from model.conditioning import ClassLabels
from model.objectives import DiffusionObjective, loss_per_timestep_bin, prediction_to_x0_eps
from model.schedules import make_schedule


def _snr_from_betas(betas: list[float], t: int) -> float:
    """SNR computed from scratch in plain Python, independently of NoiseSchedule."""
    ab = 1.0
    for b in betas[: t + 1]:
        ab *= 1.0 - b
    return ab / (1.0 - ab)


TS = [0, 10, 100, 300, 999]


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_min_snr_weights_match_formula(prediction):
    sched = make_schedule("linear")
    betas = [1e-4 + i * (0.02 - 1e-4) / 999 for i in range(1000)]
    gamma = 5.0
    obj = DiffusionObjective(sched, prediction, "min_snr", min_snr_gamma=gamma)
    w = obj.loss_weight(torch.tensor(TS))
    for i, t in enumerate(TS):
        snr = _snr_from_betas(betas, t)
        expected = {"eps": min(snr, gamma) / snr, "v": min(snr, gamma) / (snr + 1), "x0": min(snr, gamma)}[prediction]
        assert w[i].item() == pytest.approx(expected, rel=1e-5)
    assert w.dtype == torch.float32


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_p2_weights_are_one_objective_in_eps_space(prediction):
    sched = make_schedule("cosine")
    k, g = 1.0, 1.0
    t = torch.tensor(TS)
    snr = sched.snr(t)
    w = DiffusionObjective(sched, prediction, "p2", p2_gamma=g, p2_k=k).loss_weight(t).double()
    w_eps = 1.0 / (k + snr) ** g  # Choi et al. 2022, eq. 8
    # Native MSE -> eps MSE factors: eps 1, x0 SNR, v SNR/(SNR+1).
    factor = {"eps": torch.ones_like(snr), "x0": snr, "v": snr / (snr + 1)}[prediction]
    torch.testing.assert_close(w, w_eps * factor, rtol=1e-6, atol=0)


def test_weights_finite_with_zero_terminal_snr():
    sched = make_schedule("linear", zero_terminal_snr=True)
    t = torch.tensor([0, 500, 999])
    for pred in ("eps", "v", "x0"):
        for weighting in ("uniform", "min_snr", "p2"):
            w = DiffusionObjective(sched, pred, weighting).loss_weight(t)
            assert torch.isfinite(w).all(), (pred, weighting)
    # min(SNR, γ)/SNR -> 1 as SNR -> 0 (its limit), not 0/0.
    assert DiffusionObjective(sched, "eps", "min_snr").loss_weight(t)[-1].item() == 1.0
    assert DiffusionObjective(sched, "v", "min_snr").loss_weight(t)[-1].item() == 0.0


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_target_and_conversion_roundtrip(prediction):
    sched = make_schedule("linear")
    obj = DiffusionObjective(sched, prediction)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 3, 5, 5, generator=g, dtype=torch.float64)
    noise = torch.randn(4, 3, 5, 5, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 5, 500, 999])
    x_t = obj.q_sample(x0, t, noise)
    a = math.sqrt(sched.alphas_cumprod[500].item())
    s = math.sqrt(1 - sched.alphas_cumprod[500].item())
    torch.testing.assert_close(x_t[2], a * x0[2] + s * noise[2])
    if prediction == "v":
        torch.testing.assert_close(obj.target(x0, noise, t)[2], a * noise[2] - s * x0[2])
    # A perfect prediction converts back to the true (x0, eps).
    x0_hat, eps_hat = obj.predict_x0_eps(obj.target(x0, noise, t), x_t, t)
    torch.testing.assert_close(x0_hat, x0, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(eps_hat, noise, rtol=1e-6, atol=1e-6)


def test_training_losses_deterministic_and_weighted():
    sched = make_schedule("linear")
    obj = DiffusionObjective(sched, "v", "min_snr", cond_dropout=0.5)
    seen = {}

    def model(x, t, cond):
        seen["labels"] = cond.labels
        return (0.5 * x).to(torch.bfloat16)  # half-precision output: loss must still be fp32

    x0 = torch.randn(64, 2, 4, 4, generator=torch.Generator().manual_seed(1))
    labels = torch.randint(0, 3, (64,), generator=torch.Generator().manual_seed(2))
    a = obj.training_losses(model, x0, ClassLabels(labels, 3), generator=torch.Generator().manual_seed(3))
    labels_a = seen["labels"]
    b = obj.training_losses(model, x0, ClassLabels(labels, 3), generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.per_sample, b.per_sample) and torch.equal(a.t, b.t) and torch.equal(labels_a, seen["labels"])
    assert a.loss.dtype == torch.float32 and a.per_sample.shape == (64,) and not a.per_sample.requires_grad
    # Dropped labels become the null class 3, kept ones are unchanged.
    dropped = labels_a == 3
    assert 10 < int(dropped.sum()) < 54
    assert torch.equal(labels_a[~dropped], labels[~dropped])
    # The dropout mask is the third draw of the generator (after t and the noise), as before.
    g = torch.Generator().manual_seed(3)
    torch.randint(0, 1000, (64,), generator=g), torch.randn(x0.shape, generator=g)
    assert torch.equal(dropped, torch.rand(64, generator=g) < 0.5)
    # Recompute the loss by hand from the returned t.
    noise = None
    g = torch.Generator().manual_seed(3)
    t = torch.randint(0, 1000, (64,), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    assert torch.equal(t, a.t)
    x_t = obj.q_sample(x0, t, noise)
    out = (0.5 * x_t).to(torch.bfloat16).float()
    target = obj.target(x0, noise, t)
    mse = ((out - target) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(a.per_sample, mse * obj.loss_weight(t))
    torch.testing.assert_close(a.loss, (mse * obj.loss_weight(t)).mean())


def test_unconditional_objective_passes_none_and_validates():
    obj = DiffusionObjective(make_schedule("linear", 100), "eps", cond_dropout=0.5)
    calls = []
    g = torch.Generator().manual_seed(0)
    obj.training_losses(lambda x, t, c: calls.append(c) or x, torch.zeros(2, 1, 2, 2), generator=g)
    assert calls == [None]
    # Unconditional training draws no dropout mask: the generator moved by t and the noise only.
    ref = torch.Generator().manual_seed(0)
    torch.randint(0, 100, (2,), generator=ref), torch.randn(2, 1, 2, 2, generator=ref)
    assert torch.equal(torch.rand(3, generator=g), torch.rand(3, generator=ref))
    assert obj.drop_cond(None, generator=g) is None
    with pytest.raises(ValueError, match="conditioning has 3 entries"):
        obj.training_losses(lambda x, t, c: x, torch.zeros(2, 1, 2, 2), ClassLabels(torch.tensor([0, 1, 0]), 2))
    with pytest.raises(ValueError, match="output shape"):
        obj.training_losses(lambda x, t, l: x[:, :0], torch.zeros(2, 1, 2, 2))
    with pytest.raises(ValueError, match="prediction"):
        DiffusionObjective(make_schedule(), "score")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="weighting"):
        DiffusionObjective(make_schedule(), "eps", "snr")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="cond_dropout"):
        DiffusionObjective(make_schedule(), cond_dropout=1.5)


def test_loss_per_timestep_bin():
    t = torch.tensor([0, 99, 100, 950, 999, 500])
    per = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    sums, counts = loss_per_timestep_bin(t, per, 1000, num_bins=10)
    assert sums.tolist() == [3.0, 3.0, 0, 0, 0, 6.0, 0, 0, 0, 9.0]
    assert counts.tolist() == [2, 1, 0, 0, 0, 1, 0, 0, 0, 2]
    with pytest.raises(ValueError):
        loss_per_timestep_bin(torch.tensor([1000]), torch.tensor([1.0]), 1000)


def test_prediction_conversion_broadcasts_per_sample_coefficients():
    x_t = torch.randn(3, 2)
    out = torch.randn(3, 2)
    alpha = torch.tensor([0.9, 0.5, 0.1], dtype=torch.float64)
    sigma = (1 - alpha**2).sqrt()
    x0, eps = prediction_to_x0_eps("v", out, x_t, alpha, sigma)
    torch.testing.assert_close(x0[1], 0.5 * x_t[1] - sigma[1].float() * out[1])
