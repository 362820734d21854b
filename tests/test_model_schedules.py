"""Noise schedules against their closed forms (Ho et al. 2020; Nichol & Dhariwal 2021;
Lin et al. 2023)."""

from __future__ import annotations

import math

import pytest
import torch

from model.schedules import (
    NoiseSchedule,
    cosine_betas,
    linear_betas,
    make_schedule,
    rescale_zero_terminal_snr,
)


def test_linear_endpoints_and_cumprod():
    betas = linear_betas(1000)
    assert betas.dtype == torch.float64 and betas.shape == (1000,)
    assert betas[0].item() == pytest.approx(1e-4, abs=1e-15)
    assert betas[-1].item() == pytest.approx(0.02, abs=1e-15)
    sched = NoiseSchedule(betas)
    for t in (0, 1, 17, 500, 999):
        # ᾱ_t = ∏_{s<=t} (1 - β_s) with β_s = 1e-4 + s (0.02 - 1e-4)/999, written out by hand.
        expected = math.prod(1.0 - (1e-4 + s * (0.02 - 1e-4) / 999) for s in range(t + 1))
        assert sched.alphas_cumprod[t].item() == pytest.approx(expected, rel=1e-12)


def test_cosine_closed_form_and_clipping():
    T, s = 1000, 0.008
    betas = cosine_betas(T, s=s)
    assert betas.dtype == torch.float64
    assert (betas <= 0.999).all() and betas[-1].item() == pytest.approx(0.999)
    sched = NoiseSchedule(betas)
    f = lambda u: math.cos((u + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    for t in (0, 10, 250, 500, 900, 990):  # all before the (only) clipped final beta
        assert sched.alphas_cumprod[t].item() == pytest.approx(f((t + 1) / T) / f(0), rel=1e-10)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
@pytest.mark.parametrize("zts", [False, True])
def test_alpha_bar_monotone_and_snr_endpoints(kind, zts):
    sched = make_schedule(kind, zero_terminal_snr=zts)
    ab = sched.alphas_cumprod
    assert (ab[1:] < ab[:-1]).all()
    t = torch.arange(sched.num_timesteps)
    snr = sched.snr(t)
    assert snr.dtype == torch.float64
    assert (snr[1:] < snr[:-1]).all()
    torch.testing.assert_close(sched.alpha(t) ** 2 + sched.sigma(t) ** 2, torch.ones_like(snr))
    assert snr[0].item() == pytest.approx(ab[0].item() / (1 - ab[0].item()))
    if kind == "linear":
        assert snr[0].item() == pytest.approx((1 - 1e-4) / 1e-4)  # ᾱ_0 = 1 - β_0
    if zts:
        assert snr[-1].item() == 0.0
        assert sched.log_snr(t[-1:]).item() == -math.inf
    else:
        assert 0 < snr[-1].item() < 1e-3


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_zero_terminal_snr_rescale(kind):
    base = make_schedule(kind)
    zts = make_schedule(kind, zero_terminal_snr=True)
    # Lin et al. 2023, Alg. 1: sqrt(ᾱ_0) kept, sqrt(ᾱ_{T-1}) moved to 0, affine in between.
    assert zts.alphas_cumprod[-1].item() == 0.0
    assert zts.snr(torch.tensor([999])).item() == 0.0
    assert zts.alphas_cumprod[0].item() == pytest.approx(base.alphas_cumprod[0].item(), rel=1e-12)
    assert zts.snr(torch.tensor([0])).item() == pytest.approx(base.snr(torch.tensor([0])).item(), rel=1e-9)
    a, a0, aT = base.alphas_cumprod.sqrt(), base.alphas_cumprod[0].sqrt(), base.alphas_cumprod[-1].sqrt()
    torch.testing.assert_close(zts.alphas_cumprod.sqrt(), (a - aT) * a0 / (a0 - aT))
    assert zts.betas[-1].item() == pytest.approx(1.0)
    assert torch.equal(rescale_zero_terminal_snr(base.betas), zts.betas)


def test_accessors_follow_index_device_and_validate():
    sched = make_schedule("linear", 10)
    t = torch.tensor([0, 9, 3])
    assert sched.alpha(t).device == t.device and sched.alpha(t).shape == (3,)
    assert sched.sigma(t)[1].item() == pytest.approx(math.sqrt(1 - sched.alphas_cumprod[9].item()))
    with pytest.raises(ValueError, match="timesteps must lie"):
        sched.snr(torch.tensor([10]))
    with pytest.raises(ValueError, match="integer"):
        sched.snr(torch.tensor([1.0]))


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown schedule kind"):
        make_schedule("quadratic")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_timesteps"):
        linear_betas(1)
    with pytest.raises(ValueError, match="beta_start"):
        linear_betas(10, beta_start=0.1, beta_end=0.01)
    with pytest.raises(ValueError, match="betas"):
        NoiseSchedule(torch.tensor([0.1, 1.5]))
