"""FID / KID: closed forms for known distributions, unbiasedness of the KID estimator, the
Inception loader's contract, and ``raydiff eval`` ranking a trained checkpoint far above an
untrained one on the built-in dataset."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from checkpoint_factory import tiny_config, write_checkpoint_dir
from orchestrator.cli import main
from orchestrator.config import ConfigError
from orchestrator.eval.features import INCEPTION_FILE, InceptionFeatures
from orchestrator.eval.fid import (
    GaussianStats,
    fid_from_features,
    frechet_distance,
    kernel_inception_distance,
    mmd2_unbiased,
    trace_sqrt_product,
)


# -- Fréchet distance ---------------------------------------------------------------------------


def test_frechet_distance_matches_the_closed_form_for_diagonal_gaussians():
    rng = np.random.default_rng(0)
    d = 6
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = rng.uniform(0.2, 3.0, d), rng.uniform(0.2, 3.0, d)
    closed = float(((mu1 - mu2) ** 2).sum() + (s1 + s2 - 2 * np.sqrt(s1 * s2)).sum())
    # Exact when given the moments.
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(closed, rel=1e-12)
    # Estimated from samples: within 2% with 200k samples per side.
    x = mu1 + np.sqrt(s1) * rng.normal(size=(200_000, d))
    y = mu2 + np.sqrt(s2) * rng.normal(size=(200_000, d))
    assert fid_from_features(x, y) == pytest.approx(closed, rel=0.02)
    # Identical sets: zero up to rounding, never negative.
    assert 0.0 <= fid_from_features(x[:5000], x[:5000]) < 1e-10


def test_trace_sqrt_product_for_non_commuting_covariances():
    """For 2x2 S1 S2 with positive eigenvalues, tr sqrt(S1 S2) = sqrt(tr(S1 S2) + 2 sqrt(det S1 det S2))
    (sqrt of the eigenvalues l1, l2: (sqrt l1 + sqrt l2)^2 = l1 + l2 + 2 sqrt(l1 l2))."""
    rng = np.random.default_rng(1)
    for _ in range(20):
        a, b = rng.normal(size=(2, 2)), rng.normal(size=(2, 2))
        s1, s2 = a @ a.T + 0.1 * np.eye(2), b @ b.T + 0.1 * np.eye(2)
        assert not np.allclose(s1 @ s2, s2 @ s1)
        closed = np.sqrt(np.trace(s1 @ s2) + 2 * np.sqrt(np.linalg.det(s1) * np.linalg.det(s2)))
        assert trace_sqrt_product(s1, s2) == pytest.approx(closed, rel=1e-10)
        mu1, mu2 = rng.normal(size=2), rng.normal(size=2)
        assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(frechet_distance(mu2, s2, mu1, s1), rel=1e-10)


def test_frechet_distance_rejects_bad_input():
    with pytest.raises(ValueError, match="shapes do not match"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="at least 2 samples"):
        GaussianStats.of(np.zeros((1, 4)))
    with pytest.raises(ValueError, match="NaN"):
        fid_from_features(np.full((3, 2), np.nan), np.zeros((3, 2)))


# -- KID ----------------------------------------------------------------------------------------


def _kernel(a: np.ndarray, b: np.ndarray) -> float:
    """k(a, b) = (a·b / d + 1)^3, written out independently of orchestrator.eval.fid."""
    return (sum(float(u) * float(v) for u, v in zip(a, b)) / len(a) + 1.0) ** 3


def _biased_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """The V-statistic (diagonals included): biased upwards by O(1/m)."""
    k = lambda p, q: (p @ q.T / p.shape[1] + 1.0) ** 3  # noqa: E731
    return float(k(x, x).mean() + k(y, y).mean() - 2 * k(x, y).mean())


def test_kid_is_unbiased_for_two_samples_of_one_distribution():
    rng = np.random.default_rng(2)
    unbiased, biased = [], []
    for _ in range(400):
        x, y = rng.normal(size=(40, 8)), rng.normal(size=(40, 8))
        unbiased.append(mmd2_unbiased(x, y))
        biased.append(_biased_mmd2(x, y))
    u, b = np.array(unbiased), np.array(biased)
    se = u.std(ddof=1) / np.sqrt(len(u))
    assert abs(u.mean()) < 3 * se
    # The check has the power to see the V-statistic's bias (which includes k(x, x) terms).
    assert b.mean() > 10 * b.std(ddof=1) / np.sqrt(len(b))


def test_kid_recovers_the_closed_form_mmd2_of_a_known_shift():
    """P uniform on four points, Q the same points shifted: MMD^2 = E k(p,p') + E k(q,q') - 2 E k(p,q)
    over independent draws, a finite sum. The unbiased estimator from small samples averages to it."""
    rng = np.random.default_rng(3)
    pts = rng.normal(size=(4, 3))
    shifted = pts + np.array([0.8, -0.5, 0.3])
    mean_k = lambda a, b: np.mean([_kernel(p, q) for p in a for q in b])  # noqa: E731
    closed = mean_k(pts, pts) + mean_k(shifted, shifted) - 2 * mean_k(pts, shifted)
    assert closed > 0.5
    est = np.array([mmd2_unbiased(pts[rng.integers(0, 4, 12)], shifted[rng.integers(0, 4, 12)]) for _ in range(3000)])
    se = est.std(ddof=1) / np.sqrt(len(est))
    assert abs(est.mean() - closed) < 3 * se
    # The subset protocol on large samples: same value.
    big_x, big_y = pts[rng.integers(0, 4, 4000)], shifted[rng.integers(0, 4, 4000)]
    kid = kernel_inception_distance(big_x, big_y, subsets=50, subset_size=500, seed=0)
    assert kid.mean == pytest.approx(closed, rel=0.05) and kid.subset_size == 500 and kid.std > 0


# -- Inception features -------------------------------------------------------------------------


class _FakeInception(nn.Module):
    """Stands in for NVIDIA's TorchScript Inception (same call: net(img 0..255, return_features=True)
    -> [N, 2048]); returns the channel means and a fixed projection so the test can see its input."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(3, 2045)

    def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        m = img.mean(dim=(2, 3))
        return torch.cat([m, self.proj(m)], dim=1)


def test_inception_torchscript_is_loaded_and_fed_8bit_rgb(tmp_path):
    path = tmp_path / INCEPTION_FILE
    torch.jit.script(_FakeInception()).save(str(path))
    feats = InceptionFeatures(path)
    gray = torch.linspace(-1, 1, 5).reshape(5, 1, 1, 1).expand(5, 1, 8, 8)
    out = feats(gray)
    assert out.shape == (5, 2048) and out.dtype == np.float64
    # [-1, 1] -> 0..255, grey replicated to three channels.
    np.testing.assert_allclose(out[:, :3], np.repeat([[0.0], [64.0], [128.0], [191.0], [255.0]], 3, axis=1))

    torch.save(nn.Linear(2, 2).state_dict(), tmp_path / "pt_inception-2015-12-05-6726825d.pth")
    with pytest.raises(ConfigError, match=f"not a TorchScript file.*{INCEPTION_FILE}.*torchvision"):
        InceptionFeatures(tmp_path / "pt_inception-2015-12-05-6726825d.pth")
    with pytest.raises(ConfigError, match="no such file"):
        InceptionFeatures(tmp_path / "missing.pt")


# -- raydiff eval on the built-in dataset -------------------------------------------------------


def _train_in_process(cfg, images, labels, steps: int):
    """The Denoiser trained with raydiff's objective (model/objectives.py) and EMA, no Ray."""
    from model.conditioning import ClassLabels
    from model.ema import EMA
    from orchestrator.builders import build_denoiser, build_objective

    torch.manual_seed(0)
    model = build_denoiser(cfg.model, cfg.data, 10)
    ema = EMA(model, decay=0.99)
    obj = build_objective(cfg.diffusion)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, len(images), (32,), generator=g)
        loss = obj.training_losses(model, images[idx], ClassLabels(labels[idx], 10), generator=g).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema.update(model)
    ema.copy_to(model)
    return model.eval()


def test_eval_ranks_a_trained_checkpoint_far_above_an_untrained_one(tmp_path, capsys, one_thread):
    from orchestrator.data.demo import DEMO_CLASS_NAMES, write_demo_dataset
    from orchestrator.eval.reference import load_reference
    from orchestrator.builders import build_denoiser

    data = write_demo_dataset(tmp_path / "shapes", 40, 16, 0)
    cfg = tiny_config(f"data.source={data}", "data.format=imagefolder")
    ref = load_reference(cfg.data, limit=10_000)
    assert ref.images.shape == (400, 3, 16, 16) and ref.labels.bincount().tolist() == [40] * 10

    torch.manual_seed(0)
    runs = {"untrained": build_denoiser(cfg.model, cfg.data, 10).eval(), "trained": _train_in_process(cfg, ref.images, ref.labels, 120)}
    scores = {}
    for name, model in runs.items():
        write_checkpoint_dir(tmp_path / name, cfg, model, step=0 if name == "untrained" else 120, num_classes=10,
                             class_names=DEMO_CLASS_NAMES)
        assert main(["eval", "--checkpoint", str(tmp_path / name), "--num", "120", "--steps", "10",
                     "--guidance", "1,3", "--kid-subsets", "20", "--kid-subset-size", "100"]) == 0
        scores[name] = json.loads((tmp_path / name / "eval_fid.json").read_text())
    printed = capsys.readouterr().out
    assert "FID (ref-cnn features)" in printed and "inception" not in printed.lower()

    t, u = scores["trained"], scores["untrained"]
    assert t["features"]["name"] == "ref-cnn" and t["metrics"]["fid"] == "FID (ref-cnn features)"
    assert t["reference"]["num"] == 200 and t["num_samples"] == 120  # CNN on one half, statistics on the other
    assert [(r["steps"], r["guidance"]) for r in t["results"]] == [(10, 1.0), (10, 3.0)]
    for rt, ru in zip(t["results"], u["results"]):
        assert rt["fid"] < ru["fid"] / 4, (rt, ru)
        assert rt["kid"] < ru["kid"] / 8, (rt, ru)


def test_eval_needs_labels_or_inception(tmp_path, capsys):
    from PIL import Image

    from checkpoint_factory import perturbed_model

    folder = tmp_path / "flat"
    folder.mkdir()
    for i in range(4):
        Image.new("RGB", (16, 16), (i * 40, 0, 0)).save(folder / f"{i}.png")
    cfg = tiny_config()
    write_checkpoint_dir(tmp_path / "run", cfg, perturbed_model(cfg, 10, seed=0), step=1, num_classes=10)
    rc = main(["eval", "--checkpoint", str(tmp_path / "run"), "--reference", str(folder), "--num", "4",
               "--steps", "2", "--guidance", "1"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "has no class labels" in err and "--inception PATH" in err
    assert not (Path(tmp_path / "run") / "eval_fid.json").exists()
