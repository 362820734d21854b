"""Our DDPM / DDIM samplers must reproduce diffusers' DDPMScheduler / DDIMScheduler.

Comparisons feed both implementations identical model outputs and identical noise
(same seeded CPU generator; both draw noise in the same order and shape), and require
agreement to 1e-5. diffusers keeps ᾱ in float32 while we keep it in float64: the tables
themselves are compared in test_alpha_tables_agree / test_rescaled_schedule_matches...,
and the step/loop tests hand diffusers our float64 table (see _diffusers).
"""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from model.samplers import SAMPLERS, ddim_sample, ddim_step, ddpm_sample, ddpm_step, sample, timesteps_for
from model.schedules import make_schedule

PRED_TO_DIFFUSERS = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}
TOL = dict(rtol=1e-5, atol=1e-5)
SHAPE = (3, 2, 4, 4)


def _diffusers(cls, schedule, prediction, spacing, clip, *, rescale=False, named=None):
    kw = dict(
        num_train_timesteps=schedule.num_timesteps,
        prediction_type=PRED_TO_DIFFUSERS[prediction],
        clip_sample=clip,
        timestep_spacing=spacing,
        steps_offset=0,
        rescale_betas_zero_snr=rescale,
    )
    if named is None:
        kw["trained_betas"] = schedule.betas.numpy()
    else:
        kw["beta_schedule"] = named
    if cls is DDIMScheduler:
        kw["set_alpha_to_one"] = True
    ref = cls(**kw)
    if named is None and not rescale:
        # diffusers stores ᾱ in float32 (its computation from our betas is checked in
        # test_alpha_tables_agree). Give it our float64 table so that these tests compare
        # the *update rules*: with float32 ᾱ, DDIM at η=1 evaluates sqrt(1 - ᾱ_prev - σ²)
        # of a nearly cancelling difference and differs from exact arithmetic by ~1e-4.
        ref.alphas_cumprod = schedule.alphas_cumprod.clone()
        ref.one = torch.tensor(1.0, dtype=torch.float64)
        if cls is DDIMScheduler:
            ref.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64)
    return ref


def toy_model(x, t, labels=None):
    """A fixed nonlinear function of (x, t): stands in for a trained network."""
    tt = t.float().reshape(-1, *([1] * (x.ndim - 1)))
    return 0.8 * torch.sin(1.3 * x + tt / 97.0) + 0.1 * torch.cos(tt / 13.0)


@pytest.mark.parametrize("kind,named", [("linear", "linear"), ("cosine", "squaredcos_cap_v2")])
def test_alpha_tables_agree(kind, named):
    sched = make_schedule(kind)
    ref = DDPMScheduler(beta_schedule=named)
    torch.testing.assert_close(sched.alphas_cumprod.float(), ref.alphas_cumprod, rtol=2e-5, atol=1e-7)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("n", [1, 3, 7, 10, 50, 999, 1000])
def test_timesteps_match_diffusers(spacing, n):
    ref = DDIMScheduler(timestep_spacing=spacing)
    ref.set_timesteps(n)
    assert timesteps_for(spacing, n, 1000).tolist() == ref.timesteps.tolist()
    ref2 = DDPMScheduler(timestep_spacing=spacing)
    ref2.set_timesteps(n)
    assert timesteps_for(spacing, n, 1000).tolist() == ref2.timesteps.tolist()


STEP_CASES = [
    # (schedule kind, zero_terminal, prediction, spacing, num_steps, clip)
    ("linear", False, "eps", "leading", 1000, True),
    ("linear", False, "eps", "leading", 50, False),
    ("linear", False, "v", "trailing", 20, True),
    ("cosine", False, "x0", "linspace", 25, True),
    ("cosine", False, "v", "leading", 10, False),
    ("linear", True, "v", "trailing", 10, False),
    ("cosine", True, "x0", "linspace", 13, True),
]


@pytest.mark.parametrize("kind,zts,prediction,spacing,n,clip", STEP_CASES)
def test_ddpm_single_steps_match(kind, zts, prediction, spacing, n, clip):
    sched = make_schedule(kind, zero_terminal_snr=zts)
    ref = _diffusers(DDPMScheduler, sched, prediction, spacing, clip)
    ref.set_timesteps(n)
    ts = ref.timesteps.tolist()
    gen = torch.Generator().manual_seed(0)
    for i in sorted({0, 1, len(ts) // 2, len(ts) - 1}):
        if i >= len(ts):
            continue
        t = ts[i]
        if prediction == "eps" and float(sched.alphas_cumprod[t]) == 0.0:
            continue
        prev_t = ts[i + 1] if i + 1 < len(ts) else -1
        x = torch.randn(SHAPE, generator=gen)
        out = torch.randn(SHAPE, generator=gen)
        expected = ref.step(out, t, x, generator=torch.Generator().manual_seed(123))
        noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(123))
        got, x0 = ddpm_step(out, t, prev_t, x, sched, prediction=prediction, clip_sample=clip, noise=noise)
        torch.testing.assert_close(x0, expected.pred_original_sample, **TOL)
        torch.testing.assert_close(got, expected.prev_sample, **TOL)


@pytest.mark.parametrize("clipped_eps", [False, True])
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("kind,zts,prediction,spacing,n,clip", STEP_CASES)
def test_ddim_single_steps_match(kind, zts, prediction, spacing, n, clip, eta, clipped_eps):
    sched = make_schedule(kind, zero_terminal_snr=zts)
    ref = _diffusers(DDIMScheduler, sched, prediction, spacing, clip)
    ref.set_timesteps(n)
    ts = ref.timesteps.tolist()
    stride = sched.num_timesteps // n
    gen = torch.Generator().manual_seed(1)
    for i in sorted({0, 1, len(ts) // 2, len(ts) - 1}):
        if i >= len(ts):
            continue
        t = ts[i]
        if prediction == "eps" and float(sched.alphas_cumprod[t]) == 0.0:
            continue
        x = torch.randn(SHAPE, generator=gen)
        out = torch.randn(SHAPE, generator=gen)
        z = torch.randn(SHAPE, generator=gen)
        expected = ref.step(out, t, x, eta=eta, variance_noise=z if eta > 0 else None,
                            use_clipped_model_output=clipped_eps)
        got, x0 = ddim_step(out, t, t - stride, x, sched, prediction=prediction, eta=eta, clip_sample=clip, noise=z,
                            use_clipped_model_output=clipped_eps)
        torch.testing.assert_close(x0, expected.pred_original_sample, **TOL)
        torch.testing.assert_close(got, expected.prev_sample, **TOL)


def _diffusers_loop(ref, n, *, seed, eta=None):
    g = torch.Generator().manual_seed(seed)
    ref.set_timesteps(n)
    x = torch.randn(SHAPE, generator=g)  # diffusers' randn_tensor == torch.randn on CPU
    for t in ref.timesteps:
        out = toy_model(x, torch.full((SHAPE[0],), int(t)))
        if eta is None:
            x = ref.step(out, t, x, generator=g).prev_sample
        else:
            x = ref.step(out, t, x, eta=eta, generator=g).prev_sample
    return x


LOOP_CASES = [
    ("linear", False, "eps", "leading", 1000, True),
    ("linear", False, "eps", "trailing", 40, False),
    ("cosine", False, "v", "linspace", 30, True),
    ("linear", True, "v", "trailing", 25, True),
    ("cosine", False, "x0", "leading", 16, True),
]


@pytest.mark.parametrize("kind,zts,prediction,spacing,n,clip", LOOP_CASES)
def test_ddpm_loop_matches(kind, zts, prediction, spacing, n, clip):
    sched = make_schedule(kind, zero_terminal_snr=zts)
    ref = _diffusers(DDPMScheduler, sched, prediction, spacing, clip)
    expected = _diffusers_loop(ref, n, seed=7)
    got = ddpm_sample(
        toy_model, sched, SHAPE, prediction=prediction, num_steps=n, spacing=spacing,
        generator=torch.Generator().manual_seed(7), clip_sample=clip,
    )
    torch.testing.assert_close(got, expected, **TOL)


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("kind,zts,prediction,spacing,n,clip", LOOP_CASES)
def test_ddim_loop_matches(kind, zts, prediction, spacing, n, clip, eta):
    sched = make_schedule(kind, zero_terminal_snr=zts)
    ref = _diffusers(DDIMScheduler, sched, prediction, spacing, clip)
    expected = _diffusers_loop(ref, n, seed=11, eta=eta)
    got = ddim_sample(
        toy_model, sched, SHAPE, prediction=prediction, num_steps=n, spacing=spacing, eta=eta,
        generator=torch.Generator().manual_seed(11), clip_sample=clip,
    )
    torch.testing.assert_close(got, expected, **TOL)


def test_rescaled_schedule_matches_diffusers_rescale():
    sched = make_schedule("linear")
    zts = make_schedule("linear", zero_terminal_snr=True)
    ref = _diffusers(DDIMScheduler, sched, "v", "trailing", False, rescale=True)
    torch.testing.assert_close(zts.alphas_cumprod.float(), ref.alphas_cumprod, rtol=1e-5, atol=1e-7)


def test_ddim_eta0_is_deterministic_and_generator_independent():
    sched = make_schedule("linear")
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    kw = dict(prediction="eps", num_steps=20, noise=x_T)
    a = ddim_sample(toy_model, sched, SHAPE, generator=torch.Generator().manual_seed(1), **kw)
    b = ddim_sample(toy_model, sched, SHAPE, generator=torch.Generator().manual_seed(999), **kw)
    c = ddim_sample(toy_model, sched, SHAPE, **kw)
    assert torch.equal(a, b) and torch.equal(a, c)


def test_seeded_sampling_is_reproducible():
    sched = make_schedule("cosine")
    kw = dict(prediction="v", num_steps=10)
    for name in SAMPLERS:
        a = sample(name, toy_model, sched, SHAPE, generator=torch.Generator().manual_seed(5), **kw)
        b = sample(name, toy_model, sched, SHAPE, generator=torch.Generator().manual_seed(5), **kw)
        c = sample(name, toy_model, sched, SHAPE, generator=torch.Generator().manual_seed(6), **kw)
        assert torch.equal(a, b)
        assert not torch.equal(a, c)


def test_guidance_scale_ignored_without_labels():
    sched = make_schedule("linear", 100)
    kw = dict(prediction="eps", num_steps=10, noise=torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)))
    assert torch.equal(ddim_sample(toy_model, sched, SHAPE, guidance_scale=4.0, **kw), ddim_sample(toy_model, sched, SHAPE, **kw))


def test_bad_arguments_raise():
    sched = make_schedule("linear", 100)
    with pytest.raises(ValueError, match="num_steps"):
        timesteps_for("leading", 0, 100)
    with pytest.raises(ValueError, match="spacing"):
        timesteps_for("quadratic", 10, 100)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown sampler"):
        sample("euler", toy_model, sched, SHAPE, prediction="eps")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="prediction"):
        ddim_sample(toy_model, sched, SHAPE, prediction="score")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="null_label"):
        ddim_sample(toy_model, sched, SHAPE, prediction="eps", labels=torch.zeros(3, dtype=torch.long), guidance_scale=3.0)
    with pytest.raises(ValueError, match="eta"):
        ddpm_sample(toy_model, sched, SHAPE, prediction="eps", eta=0.0)
    zts = make_schedule("linear", 100, zero_terminal_snr=True)
    with pytest.raises(ValueError, match="SNR = 0"):
        ddim_sample(toy_model, zts, SHAPE, prediction="eps", spacing="trailing", num_steps=10)
