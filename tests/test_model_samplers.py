"""Our DDPM / DDIM samplers must reproduce diffusers' DDPMScheduler / DDIMScheduler.

Comparisons feed both implementations identical model outputs and identical noise
(same seeded CPU generator; both draw noise in the same order and shape), and require
agreement to 1e-5. diffusers keeps ᾱ in float32 while we keep it in float64: the tables
themselves are compared in test_alpha_tables_agree / test_rescaled_schedule_matches...,
and the step/loop tests hand diffusers our float64 table (see _diffusers).
"""

from __future__ import annotations

import inspect

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from model.samplers import (
    DDIMOptions,
    DDPMOptions,
    ddim_sample,
    ddim_step,
    ddpm_sample,
    ddpm_step,
    initial_noise,
    sample,
    timesteps_for,
)
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
        got, x0 = ddpm_step(out, t, prev_t, x, sched, prediction=prediction, options=DDPMOptions(clip_sample=clip),
                            noise=noise)
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
        opts = DDIMOptions(eta=eta, clip_sample=clip, use_clipped_model_output=clipped_eps)
        got, x0 = ddim_step(out, t, t - stride, x, sched, prediction=prediction, options=opts, noise=z)
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
    g = torch.Generator().manual_seed(7)
    got = ddpm_sample(
        toy_model, initial_noise(SHAPE, generator=g), sched, timesteps_for(spacing, n, sched.num_timesteps),
        prediction=prediction, options=DDPMOptions(clip_sample=clip), generator=g,
    )
    torch.testing.assert_close(got, expected, **TOL)


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("kind,zts,prediction,spacing,n,clip", LOOP_CASES)
def test_ddim_loop_matches(kind, zts, prediction, spacing, n, clip, eta):
    sched = make_schedule(kind, zero_terminal_snr=zts)
    ref = _diffusers(DDIMScheduler, sched, prediction, spacing, clip)
    expected = _diffusers_loop(ref, n, seed=11, eta=eta)
    g = torch.Generator().manual_seed(11)
    got = ddim_sample(
        toy_model, initial_noise(SHAPE, generator=g), sched, timesteps_for(spacing, n, sched.num_timesteps),
        prediction=prediction, options=DDIMOptions(eta=eta, clip_sample=clip), generator=g,
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
    ts = timesteps_for("leading", 20, 1000)
    a = ddim_sample(toy_model, x_T, sched, ts, prediction="eps", generator=torch.Generator().manual_seed(1))
    b = ddim_sample(toy_model, x_T, sched, ts, prediction="eps", generator=torch.Generator().manual_seed(999))
    c = ddim_sample(toy_model, x_T, sched, ts, prediction="eps")
    assert torch.equal(a, b) and torch.equal(a, c)


def test_seeded_sampling_is_reproducible():
    sched = make_schedule("cosine")
    ts = timesteps_for("leading", 10, 1000)

    def draw(options, seed):
        g = torch.Generator().manual_seed(seed)
        x = initial_noise(SHAPE, generator=g)
        return sample(toy_model, x, sched, ts, prediction="v", options=options, generator=g)

    for options in (DDPMOptions(), DDIMOptions(), DDIMOptions(eta=1.0)):
        a, b, c = draw(options, 5), draw(options, 5), draw(options, 6)
        assert torch.equal(a, b)
        assert not torch.equal(a, c)


def test_sample_dispatches_on_the_options_type():
    sched = make_schedule("linear", 100)
    ts = timesteps_for("trailing", 10, 100)
    for options, sampler in ((DDPMOptions(clip_sample=False), ddpm_sample), (DDIMOptions(eta=0.5), ddim_sample)):
        g1, g2 = torch.Generator().manual_seed(2), torch.Generator().manual_seed(2)
        x = initial_noise(SHAPE, generator=torch.Generator().manual_seed(1))
        got = sample(toy_model, x, sched, ts, prediction="v", options=options, generator=g1)
        assert torch.equal(got, sampler(toy_model, x, sched, ts, prediction="v", options=options, generator=g2))


@pytest.mark.parametrize("sampler", [ddpm_sample, ddim_sample, sample])
def test_one_sampler_signature_with_few_parameters(sampler):
    params = inspect.signature(sampler).parameters
    assert len(params) <= 8
    assert list(params)[:4] == ["model", "x", "schedule", "timesteps"]
    # Nothing a sampler would accept only to reject: DDPM has no eta, labels or guidance.
    assert not {"eta", "labels", "guidance_scale", "null_label", "use_clipped_model_output"} & set(params)
    assert inspect.signature(ddpm_sample).parameters.keys() == inspect.signature(ddim_sample).parameters.keys()


def test_samplers_call_the_model_with_x_and_a_batch_of_timesteps():
    calls = []

    def model(x, t):
        calls.append(t.clone())
        return toy_model(x, t)

    ts = timesteps_for("leading", 4, 100)
    ddim_sample(model, initial_noise(SHAPE), make_schedule("linear", 100), ts, prediction="eps")
    assert [c.tolist() for c in calls] == [[int(t)] * SHAPE[0] for t in ts]


def test_bad_arguments_raise():
    sched = make_schedule("linear", 100)
    with pytest.raises(ValueError, match="num_steps"):
        timesteps_for("leading", 0, 100)
    with pytest.raises(ValueError, match="spacing"):
        timesteps_for("quadratic", 10, 100)  # type: ignore[arg-type]
    x, ts = initial_noise(SHAPE), timesteps_for("leading", 10, 100)
    with pytest.raises(ValueError, match="unknown sampler"):
        sample(toy_model, x, sched, ts, prediction="eps", options="euler")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="prediction"):
        ddim_sample(toy_model, x, sched, ts, prediction="score")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="eta"):
        DDIMOptions(eta=-0.5)
    with pytest.raises(TypeError):
        DDPMOptions(eta=0.0)  # type: ignore[call-arg]  # ancestral DDPM has no eta to set
    with pytest.raises(ValueError, match="descending"):
        ddpm_sample(toy_model, x, sched, ts.flip(0), prediction="eps")
    with pytest.raises(ValueError, match="descending"):
        ddpm_sample(toy_model, x, sched, [100, 50], prediction="eps")
    with pytest.raises(ValueError, match="shape"):
        initial_noise((0, 2, 4, 4))
    with pytest.raises(ValueError, match="output shape"):
        ddim_sample(lambda x, t: x[:, :1], x, sched, ts, prediction="eps")
    zts = make_schedule("linear", 100, zero_terminal_snr=True)
    with pytest.raises(ValueError, match="SNR = 0"):
        ddim_sample(toy_model, x, zts, timesteps_for("trailing", 10, 100), prediction="eps")
