"""The training step must not read GPU values on the host (each read stalls the GPU queue).

On CPU this is checked with the ``meta`` device: a meta tensor has a shape but no data, so
``int(t)``, ``.item()`` or ``.tolist()`` on one raises. Running the model-side hot path on meta
tensors proves that every value check there is skipped for non-CPU tensors. On a GPU the device
check script runs the real DeepSpeed step under ``torch.cuda.set_sync_debug_mode("error")``.
"""

from __future__ import annotations

import pytest
import torch

from model import _checks
from model.conditioning import ClassLabels
from model.objectives import DiffusionObjective, loss_per_timestep_bin
from model.registry import build_model
from model.schedules import make_schedule

META = torch.device("meta")


def test_meta_tensors_refuse_host_reads():
    # The premise of this file: a host read of a meta tensor fails.
    with pytest.raises(Exception):
        int(torch.zeros(3, device=META).min())


def test_range_checks_run_on_cpu_and_are_skipped_elsewhere():
    with pytest.raises(ValueError, match=r"must lie in \[0, 9\], got range \[0, 12\]"):
        _checks.check_range(torch.tensor([0, 12]), 0, 9, "must lie in [0, 9]")
    _checks.check_range(torch.tensor([0, 12], device=META), 0, 9, "never raised: no host read")


def test_objective_schedule_and_loss_bins_do_no_host_reads():
    sched = make_schedule("cosine", 1000)
    obj = DiffusionObjective(sched, "v", "min_snr", cond_dropout=0.1)
    x0 = torch.zeros(4, 3, 8, 8, device=META)
    labels = ClassLabels(torch.zeros(4, dtype=torch.long, device=META), 10)
    t = torch.zeros(4, dtype=torch.long, device=META)
    noise = torch.zeros_like(x0)
    out = obj.training_losses(lambda x, tt, y: x * 1.0, x0, labels, t=t, noise=noise)
    assert out.loss.device == META and out.per_sample.shape == (4,)
    sums, counts = loss_per_timestep_bin(out.t, out.per_sample, 1000, 10)
    assert sums.device == META and counts.shape == (10,)


def test_denoiser_label_check_does_no_host_read():
    net = build_model("unet-tiny", in_channels=3, image_size=32, num_classes=10)
    labels = ClassLabels(torch.zeros(2, dtype=torch.long, device=META), 10)  # range check skipped: no host read
    assert net._labels(labels, 2, META).device == META
    with pytest.raises(ValueError, match="labels must lie"):
        ClassLabels(torch.tensor([0, 11]), 10)
