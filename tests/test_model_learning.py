"""End-to-end learning test: train a tiny class-conditional denoiser on a 2-D mixture of
four Gaussians with DiffusionObjective, then sample with every sampler and check the
samples statistically (means, spread, mode assignment, mode coverage).

Data: mode k has mean MODES[k] (corners of a square of side 1 inside [-1, 1]², so x0
clipping is inactive) and isotropic std 0.1; label = mode index. Modes are 10 std apart,
so a sample's nearest mode identifies where the model put it with no ambiguity.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from model.conditioning import ClassLabels
from model.guidance import CFGDenoiser
from model.objectives import DiffusionObjective
from model.samplers import DDIMOptions, DDPMOptions, initial_noise, sample, timesteps_for
from model.schedules import make_schedule

MODES = torch.tensor([[-0.5, -0.5], [0.5, -0.5], [-0.5, 0.5], [0.5, 0.5]])
STD = 0.1
K = len(MODES)
T = 100  # short chain: cheap to train and sample on CPU, ᾱ_T ≈ 0 with the cosine schedule
N_PER_CLASS = 250


class MLPDenoiser(nn.Module):
    """x (2-D) + sinusoidal t embedding + learned class embedding (K classes + null)."""

    def __init__(self, hidden: int = 128, emb: int = 32):
        super().__init__()
        self.emb = emb
        self.label_emb = nn.Embedding(K + 1, emb)
        self.net = nn.Sequential(
            nn.Linear(2 + 2 * emb, hidden), nn.SiLU(),
            nn.Linear(hidden, hidden), nn.SiLU(),
            nn.Linear(hidden, hidden), nn.SiLU(),
            nn.Linear(hidden, 2),
        )

    def forward(self, x, t, cond=None):
        labels = torch.full((x.shape[0],), K, dtype=torch.long) if cond is None else cond.labels
        freqs = torch.exp(-math.log(1000.0) * torch.arange(self.emb // 2) / (self.emb // 2))
        ang = t.float()[:, None] * freqs[None] * (1000.0 / T)
        temb = torch.cat([ang.sin(), ang.cos()], dim=1)
        return self.net(torch.cat([x, temb, self.label_emb(labels)], dim=1))


def _data(n, g):
    labels = torch.randint(0, K, (n,), generator=g)
    return MODES[labels] + STD * torch.randn(n, 2, generator=g), labels


STEPS = 1000


@pytest.fixture(scope="module")
def trained():
    # A tiny MLP is fastest single-threaded; intra-op threading only adds overhead and
    # suffers badly on a shared 2-core machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        g = torch.Generator().manual_seed(0)
        schedule = make_schedule("cosine", T)
        # label_dropout 0.5 (higher than the usual 0.1) so the unconditional branch, which
        # must represent all four modes, gets enough of the short training budget.
        obj = DiffusionObjective(schedule, "eps", "uniform", cond_dropout=0.5)
        model = MLPDenoiser()
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        lr_sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, STEPS)
        for _ in range(STEPS):
            x0, labels = _data(256, g)
            out = obj.training_losses(model, x0, ClassLabels(labels, K), generator=g)
            opt.zero_grad()
            out.loss.backward()
            opt.step()
            lr_sched.step()
        yield model.eval(), schedule
    finally:
        torch.set_num_threads(threads)


# clip_sample=False: clipping x̂0 to [-1, 1] is an image-range prior. With it, diffusers'
# DDIM (which we match) keeps the *unclipped* ε̂, so strongly guided, clipped x̂0 and ε̂
# disagree and η=0 DDIM drifts off the modes; without clipping all samplers are exact.
SAMPLER_SETTINGS = {
    "ddpm": (T, DDPMOptions(clip_sample=False)),
    "ddim": (25, DDIMOptions(eta=0.0, clip_sample=False)),
}


def _draw(name, model, schedule, n, labels, *, seed, guidance=1.0):
    steps, options = SAMPLER_SETTINGS[name]
    g = torch.Generator().manual_seed(seed)
    cond = None if labels is None else ClassLabels(labels, K)
    return sample(CFGDenoiser(model, cond, guidance), initial_noise((n, 2), generator=g), schedule,
                  timesteps_for("leading", steps, T), prediction="eps", options=options, generator=g)


def _nearest_mode(x):
    return torch.cdist(x, MODES).argmin(dim=1)


@pytest.mark.parametrize("name", sorted(SAMPLER_SETTINGS))
def test_conditional_samples_match_modes(trained, name):
    model, schedule = trained
    labels = torch.arange(K).repeat_interleave(N_PER_CLASS)
    x = _draw(name, model, schedule, len(labels), labels, seed=1)
    assert torch.isfinite(x).all()
    for k in range(K):
        xs = x[labels == k]
        # Mean: the sampling error of a 250-sample mean is 0.1/sqrt(250) ≈ 0.006; we allow
        # 0.05 (half a data std) for model error after a few hundred CPU steps. A model
        # that ignored the label would be off by >= 0.5.
        assert (xs.mean(0) - MODES[k]).abs().max().item() < 0.05, (name, k, xs.mean(0))
        # Covariance: per-axis std within a factor 2 of the true 0.1, i.e. in [0.05, 0.2]
        # (measured 0.074..0.100 across samplers and seeds; short training can blur), and
        # correlation |rho| < 0.3 (true 0). A collapsed sampler gives std ~0, an
        # unconverged one ~0.5.
        cov = torch.cov(xs.T)
        std = cov.diagonal().sqrt()
        assert ((std > 0.05) & (std < 0.2)).all(), (name, k, std)
        rho = cov[0, 1] / (std[0] * std[1])
        assert abs(rho.item()) < 0.3, (name, k, rho)
        # Assignment: >= 95% of class-k samples land nearest to mode k.
        assert (_nearest_mode(xs) == k).float().mean().item() >= 0.95, (name, k)


@pytest.mark.parametrize("name", sorted(SAMPLER_SETTINGS))
def test_guided_and_unconditional_sampling(trained, name):
    model, schedule = trained
    labels = torch.arange(K).repeat_interleave(N_PER_CLASS)
    guided = _draw(name, model, schedule, len(labels), labels, seed=2, guidance=3.0)
    # Guidance sharpens p(x|c): essentially every sample lands on its class's mode.
    assert (_nearest_mode(guided) == labels).float().mean().item() >= 0.98
    # Unconditional (null class, learned via label dropout): all four modes covered with
    # roughly equal mass. True share 25%, binomial SE with 1000 samples 1.4%; we accept
    # 15%..35% and require samples to sit on modes (within 4 std of the nearest one).
    uncond = _draw(name, model, schedule, K * N_PER_CLASS, None, seed=3)
    share = torch.bincount(_nearest_mode(uncond), minlength=K).float() / len(uncond)
    assert ((share > 0.15) & (share < 0.35)).all(), (name, share)
    dist = torch.cdist(uncond, MODES).min(dim=1).values
    assert (dist < 4 * STD).float().mean().item() >= 0.9, name
