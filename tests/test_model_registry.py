"""Every registry model builds, runs forward + backward with and without labels, and
reports its parameter count. Large DiTs run on batch 1 at 8x8 (16 tokens) to stay cheap;
parameter counts do not depend on the spatial size (DiT's positional table is a
non-trainable buffer, U-Nets are fully convolutional)."""

from __future__ import annotations

import pytest
import torch

from model.conditioning import ClassLabels
from model.networks import Denoiser
from model.registry import MODEL_NAMES, TEXT_MODEL_NAMES, build_model, count_parameters

# Spatial size / batch for the forward+backward check (build is always at 32x32).
RUN = {
    "unet-tiny": (32, 4),
    "unet-demo": (32, 4),
    "unet-small": (32, 2),
    "unet-cifar": (16, 1),
    "dit-s2": (16, 2),
    "dit-b2": (8, 1),
    "dit-l2": (8, 1),
    "dit-xl2": (8, 1),
}
NUM_CLASSES = 10


@pytest.fixture(autouse=True)
def _single_thread():
    # Intra-op threads spin-wait on each other; on a shared, oversubscribed 2-core
    # machine that costs far more than it gains for these small batches.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _check_grads(model):
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def _fwd_bwd(model: Denoiser, size: int, batch: int, labels):
    model.zero_grad(set_to_none=True)
    x = torch.randn(batch, model.in_channels, size, size)
    t = torch.randint(0, 1000, (batch,))
    out = model(x, t, labels)
    assert out.shape == x.shape
    out.square().mean().backward()
    _check_grads(model)
    return out


@pytest.mark.parametrize("name", [n for n in MODEL_NAMES if n not in TEXT_MODEL_NAMES])
def test_build_forward_backward(name):
    torch.manual_seed(0)
    model = build_model(name, in_channels=3, image_size=32, num_classes=NUM_CLASSES)
    n = count_parameters(model)
    print(f"{name}: {n:,} parameters (3x32x32, {NUM_CLASSES} classes + null)")
    assert model.num_classes == NUM_CLASSES and model.null_label == NUM_CLASSES
    assert model.in_channels == 3 and model.image_size == 32
    size, batch = RUN[name]
    model.eval()  # disable dropout so the calls below are comparable
    x = torch.randn(batch, 3, size, size)
    t = torch.randint(0, 1000, (batch,))
    out_cond = model(x, t, ClassLabels(torch.arange(batch) % NUM_CLASSES, NUM_CLASSES))
    # cond=None on a conditional model feeds the null class (unconditional branch).
    out_none = model(x, t, None)
    assert out_cond.shape == out_none.shape == x.shape
    # One backward through both calls: the expensive part for the big DiTs is
    # allocating/filling the gradients, so do it once.
    (out_cond.square().mean() + out_none.square().mean()).backward()
    _check_grads(model)
    with torch.no_grad():
        torch.testing.assert_close(out_none, model(x, t, ClassLabels(torch.full((batch,), NUM_CLASSES), NUM_CLASSES)))


@pytest.mark.parametrize("name", ["unet-tiny", "unet-small", "dit-s2"])
def test_unconditional_and_latent_channels(name):
    torch.manual_seed(0)
    model = build_model(name, in_channels=4, image_size=16)
    assert model.num_classes is None and model.null_label is None
    _fwd_bwd(model, 16, 1, None)
    with pytest.raises(ValueError, match="unconditional"):
        model(torch.randn(1, 4, 16, 16), torch.tensor([1]), ClassLabels(torch.tensor([0]), 1))


def test_unet_cifar_matches_ddpm_parameter_count():
    n = count_parameters(build_model("unet-cifar", in_channels=3, image_size=32))
    print(f"unet-cifar unconditional: {n:,}")
    assert abs(n - 35.7e6) <= 0.1e6  # Ho et al. 2020, App. B: 35.7M


def test_unet_tiny_is_small():
    n = count_parameters(build_model("unet-tiny"))
    assert 1e5 <= n <= 1e6


def test_unet_demo_attends_only_at_the_lowest_resolution():
    """unet-demo's design (model/registry.py): three levels, self-attention only at 8x8 of a 32x32
    input, about 1.8M parameters."""
    model = build_model("unet-demo", image_size=32, num_classes=10)
    assert 1.5e6 <= count_parameters(model) <= 2.0e6
    seen = []
    for m in model.modules():
        if type(m).__name__ == "Attention":
            m.register_forward_hook(lambda mod, args, out: seen.append(args[0].shape))
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32), torch.tensor([10]), ClassLabels(torch.tensor([0]), 10))
    assert seen, "no attention layer ran"
    # diffusers' Attention receives [B, C, H, W] feature maps in the U-Net blocks.
    assert {tuple(s[-2:]) for s in seen} == {(8, 8)}


def test_dit_has_no_internal_label_dropout():
    model = build_model("dit-s2", image_size=8, num_classes=3).train()
    x = torch.randn(16, 3, 8, 8)
    t = torch.full((16,), 10)
    labels = ClassLabels(torch.arange(16) % 3, 3)
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, labels), model(x, t, labels))  # no random drop in train mode


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown model") as err:
        build_model("resnet")  # type: ignore[arg-type]
    assert "unet-tiny" in str(err.value)
    with pytest.raises(ValueError, match="divisible"):
        build_model("unet-cifar", image_size=20)
    with pytest.raises(ValueError, match="divisible"):
        build_model("dit-s2", image_size=15)
    with pytest.raises(ValueError, match="num_classes"):
        build_model("unet-tiny", num_classes=0)
    model = build_model("unet-tiny", num_classes=2)
    with pytest.raises(ValueError, match="labels must lie"):
        model(torch.randn(1, 3, 32, 32), torch.tensor([1]), ClassLabels(torch.tensor([3]), 2))
    with pytest.raises(ValueError, match="expected x"):
        model(torch.randn(1, 4, 32, 32), torch.tensor([1]))


def test_text_models_match_their_published_sizes():
    """Counted on the meta device (no memory). Stable Diffusion v1's U-Net with a 768-wide CLIP
    ViT-L/14 text encoder on 4x64x64 latents has 859,520,964 parameters (the count of
    diffusers' port of the v1 checkpoints); PixArt-alpha's XL-2 with T5-XXL (4096-wide) about
    0.6B (Chen et al. 2023, Table 1: 0.6B), here without its learned-variance channels and
    1024px micro-conditions."""
    with torch.device("meta"):
        sd = build_model("unet-text-sd", in_channels=4, image_size=64, text_dim=768)
        pixart = build_model("pixart-alpha", in_channels=4, image_size=128, text_dim=4096)
    assert count_parameters(sd) == 859_520_964
    assert 0.6e9 <= count_parameters(pixart) <= 0.62e9
    for name in ("unet-text-tiny", "unet-text-demo", "pixart-tiny"):
        assert count_parameters(build_model(name, image_size=32, text_dim=32)) <= 3e6, name


def test_the_tables_build_exactly_the_schema_choices():
    """model/choices.py (torch-free, read by the config schema) and the registry's tables agree."""
    from model import registry
    from model.choices import is_text_model

    tables = (registry._UNETS, registry._DITS, registry._TEXT_UNETS, registry._PIXARTS)
    assert sorted(k for t in tables for k in t) == sorted(MODEL_NAMES)
    assert set(TEXT_MODEL_NAMES) == set(registry._TEXT_UNETS) | set(registry._PIXARTS)
    assert all(is_text_model(n) == (n in TEXT_MODEL_NAMES) for n in MODEL_NAMES)
