"""The conditioning object (ClassLabels), classifier-free guidance as a model wrapper
(CFGDenoiser), and the unconditional path (conditioning None) through network and sampler."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.conditioning import ClassLabels, class_conditioning
from model.guidance import CFGDenoiser
from model.registry import build_model
from model.samplers import DDIMOptions, ddim_sample, initial_noise, timesteps_for
from model.schedules import make_schedule


def test_class_labels_null_drop_cat_index():
    c = ClassLabels(torch.tensor([0, 1, 2, 1]), null_index=3)
    assert c.batch_size == 4 and c.labels.dtype == torch.long
    assert c.null_like().labels.tolist() == [3, 3, 3, 3] and c.null_like().null_index == 3
    dropped = c.drop(torch.tensor([True, False, True, False]))
    assert dropped.labels.tolist() == [3, 1, 3, 1]
    assert c.labels.tolist() == [0, 1, 2, 1]  # operations return new objects
    both = c.cat(c.null_like())
    assert both.labels.tolist() == [0, 1, 2, 1, 3, 3, 3, 3] and both.batch_size == 8
    assert c[1:3].labels.tolist() == [1, 2] and c[torch.tensor([3, 0])].labels.tolist() == [1, 0]
    assert c.to("cpu").labels.device.type == "cpu"
    assert ClassLabels(np.array([2, 0]), 3).labels.tolist() == [2, 0]


def test_class_labels_reject_bad_input():
    with pytest.raises(ValueError, match="labels must lie"):
        ClassLabels(torch.tensor([0, 4]), 3)
    with pytest.raises(ValueError, match="labels must lie"):
        ClassLabels(torch.tensor([-1]), 3)
    with pytest.raises(ValueError, match="1-D integer"):
        ClassLabels(torch.tensor([0.0, 1.0]), 3)
    with pytest.raises(ValueError, match="1-D integer"):
        ClassLabels(torch.zeros(2, 2, dtype=torch.long), 3)
    with pytest.raises(ValueError, match="null_index"):
        ClassLabels(torch.tensor([0]), 0)
    c = ClassLabels(torch.tensor([0, 1]), 3)
    with pytest.raises(ValueError, match="null_index 3"):
        c.cat(ClassLabels(torch.tensor([0]), 5))
    with pytest.raises(ValueError, match="mask"):
        c.drop(torch.tensor([True]))


def test_class_conditioning_for_a_model():
    assert class_conditioning(torch.tensor([0, 1]), None) is None  # unconditional model: labels unused
    assert class_conditioning(None, None) is None
    c = class_conditioning(np.array([1, 0]), 2)
    assert isinstance(c, ClassLabels) and c.null_index == 2 and c.labels.tolist() == [1, 0]
    with pytest.raises(ValueError, match="needs labels"):
        class_conditioning(None, 2)


class _LabelModel(torch.nn.Module):
    """Output depends nonlinearly on x, t and the label so guidance is non-trivial."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(5, 3)
        self.batches: list[int] = []

    def forward(self, x, t, cond):
        self.batches.append(x.shape[0])
        e = self.emb(cond.labels)[:, :, None, None] if cond is not None else 0.0
        return torch.tanh(x * 1.7 + e) + t.float()[:, None, None, None] / 1000.0


def test_guidance_wrapper_is_the_manual_combination_in_one_2b_forward():
    torch.manual_seed(0)
    model = _LabelModel()
    x = torch.randn(4, 3, 2, 2)
    t = torch.tensor([1, 200, 500, 999])
    c = ClassLabels(torch.tensor([0, 1, 2, 3]), 4)
    with torch.no_grad():
        cond = model(x, t, c)
        uncond = model(x, t, c.null_like())
        assert not torch.allclose(cond, uncond)
        for w in (0.0, 3.0, 7.5):
            model.batches = []
            got = CFGDenoiser(model, c, w)(x, t)
            assert model.batches == [8]  # cond and uncond halves in ONE forward of 2B
            torch.testing.assert_close(got, uncond + w * (cond - uncond), rtol=0, atol=1e-6)
        torch.testing.assert_close(CFGDenoiser(model, c, 0.0)(x, t), uncond, rtol=0, atol=1e-6)
        model.batches = []
        torch.testing.assert_close(CFGDenoiser(model, c, 1.0)(x, t), cond, rtol=0, atol=0)
        assert model.batches == [4]  # w = 1 is the conditional model alone
        # A 0-d timestep broadcasts to the batch, as the network's forward does.
        torch.testing.assert_close(CFGDenoiser(model, c, 3.0)(x, torch.tensor(500)),
                                   CFGDenoiser(model, c, 3.0)(x, torch.full((4,), 500)))
    with pytest.raises(ValueError, match="conditioning for 4 samples"):
        CFGDenoiser(model, c, 2.0)(x[:2], t[:2])


def test_guidance_scale_ignored_without_conditioning():
    model = _LabelModel()
    x, t = torch.randn(2, 3, 2, 2), torch.tensor([3, 700])
    with torch.no_grad():
        torch.testing.assert_close(CFGDenoiser(model, None, 4.0)(x, t), model(x, t, None), rtol=0, atol=0)
    assert model.batches == [2, 2]


@pytest.mark.parametrize("name", ["unet-tiny", "dit-s2"])
def test_unconditional_path_through_network_guidance_and_sampler(name):
    torch.manual_seed(0)
    net = build_model(name, in_channels=3, image_size=8).eval()
    sched = make_schedule("linear", 100)
    ts = timesteps_for("trailing", 3, 100)
    x = initial_noise((2, 3, 8, 8), generator=torch.Generator().manual_seed(1))
    out = ddim_sample(CFGDenoiser(net, None, 3.0), x, sched, ts, prediction="v", options=DDIMOptions(eta=0.0))
    plain = ddim_sample(lambda x, t: net(x, t), x, sched, ts, prediction="v")
    assert out.shape == x.shape and torch.equal(out, plain)
    with pytest.raises(ValueError, match="unconditional"):
        net(x, torch.tensor([1, 2]), ClassLabels(torch.tensor([0, 0]), 1))


def test_network_maps_class_labels_and_checks_them():
    torch.manual_seed(0)
    net = build_model("unet-tiny", in_channels=3, image_size=8, num_classes=3).eval()
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([5, 50])
    c = ClassLabels(torch.tensor([0, 2]), 3)
    with torch.no_grad():
        assert not torch.allclose(net(x, t, c), net(x, t, c.null_like()))
        torch.testing.assert_close(net(x, t, None), net(x, t, c.null_like()))  # None feeds the null class
    with pytest.raises(ValueError, match="null_index 4"):
        net(x, t, ClassLabels(torch.tensor([0, 2]), 4))
    with pytest.raises(ValueError, match="conditioning for 1 samples"):
        net(x, t, c[:1])
    with pytest.raises(ValueError, match="takes ClassLabels"):
        net(x, t, torch.tensor([0, 2]))  # type: ignore[arg-type]
