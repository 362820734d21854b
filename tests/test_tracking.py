"""Tracking sinks without Ray: TensorBoard event files (local and S3, resume purge), the
fan-out's failure handling, the optional-package check, scalar names and the MFU estimate."""

from __future__ import annotations

import io
import logging
import os

import numpy as np
import pytest
import torch
from PIL import Image

from model.conditioning import ClassLabels
from orchestrator.cli import main
from orchestrator.config import ConfigError, load_config
from orchestrator.storage import listdir, read_bytes
from orchestrator.tracking import Tracker, build_tracker, check_tracking_packages, scalars_of
from orchestrator.tracking.mfu import MfuMeter, peak_flops, train_flops_per_image
from orchestrator.tracking.tensorboard import TensorBoardSink
from tests.tb_events import read_dir, visible


def _record(step: int, loss: float) -> dict:
    return {"step": step, "samples_seen": 8 * step, "epoch": 0, "loss": loss, "nonfinite": 0,
            "loss_per_t_bin": [loss * 2, None, loss / 2], "images_per_s": 50.0 + step, "data_wait_share": 0.25,
            "lr": 1e-4 * step, "loss_scale": 2.0**12, "grad_norm": 1.5, "overflow_skipped_steps": 1,
            "ema_decay": 0.9, "storage_retries": 0, "bad_samples": {"corrupt_image": 2, "retried_read": 5,
                                                                 "converted_from_L": 3}, "time": 0.0}


def _png(w: int = 12, h: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.fromarray((np.arange(w * h * 3).reshape(h, w, 3) % 255).astype("uint8")).save(buf, format="PNG")
    return buf.getvalue()


def test_scalars_of_names_and_skips():
    s = scalars_of({**_record(3, 0.5), "grad_norm": None, "mfu": float("nan"), "val_loss": 0.7})
    assert s["train/loss"] == 0.5 and s["val/loss"] == 0.7 and s["train/ema_decay"] == 0.9
    assert s["loss_per_t_bin/00"] == 1.0 and s["loss_per_t_bin/02"] == 0.25 and "loss_per_t_bin/01" not in s
    assert "train/grad_norm" not in s and "perf/mfu" not in s  # None and NaN are left out
    # Only dropped kinds count as skipped samples; conversions and retried reads kept the sample.
    assert s["data/skipped_samples"] == 2 and s["data/retried_read"] == 5
    assert s["precision/loss_scale"] == 4096 and s["precision/overflow_skipped_steps"] == 1
    assert s["perf/images_per_s"] == 53 and s["perf/data_wait_share"] == 0.25


def test_tensorboard_local_resume_purges_redone_steps(tmp_path):
    logdir = tmp_path / "run" / "tensorboard"
    first = Tracker([TensorBoardSink(str(logdir))])
    for step in range(1, 6):
        first.log(_record(step, 1.0 / step))
    first.image(5, _png())
    first.close()
    # Resumed from a checkpoint at step 3: steps 4 and 5 are trained again, with other losses.
    second = Tracker([TensorBoardSink(str(logdir), resume_step=3)])
    for step in range(4, 8):
        second.log(_record(step, 10.0 + step))
    second.close()
    tags = visible(read_dir(logdir))
    assert len(read_dir(logdir)) == 2
    loss = tags["train/loss"]
    assert [s for s, _ in loss] == [1, 2, 3, 4, 5, 6, 7]  # each step once
    assert [round(v, 4) for _, v in loss] == [1.0, 0.5, 0.3333, 14.0, 15.0, 16.0, 17.0]
    assert tags["samples"] == []  # the image at step 5 belonged to the superseded branch
    expected = {"train/lr", "train/grad_norm", "train/ema_decay", "precision/loss_scale",
                "precision/overflow_skipped_steps", "perf/images_per_s", "perf/data_wait_share",
                "data/skipped_samples", "loss_per_t_bin/00", "loss_per_t_bin/02"}
    assert expected <= set(tags)


def test_tensorboard_on_s3_uploads_each_segment_once(s3_server, tmp_path, monkeypatch):
    bucket = s3_server.create_bucket("tracking-tb")
    s3 = load_config(None, [f"storage.s3.endpoint_url={s3_server.endpoint_url}",
                            f"storage.s3.region={s3_server.region}"]).storage.s3
    staging = tmp_path / "staging"
    staging.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(staging))
    target = f"s3://{bucket}/runs/r1/tensorboard"
    sink = TensorBoardSink(target, s3, upload_every_s=3600)
    tracker = Tracker([sink])
    tracker.log(_record(1, 1.0))
    tracker.log(_record(2, 0.5))
    assert listdir(target, s3) == []  # buffered locally until an upload is due
    tracker.flush()  # a checkpoint: the file so far goes up, a new one starts
    assert len(listdir(target, s3)) == 1
    tracker.image(2, _png(12, 8))
    sink.upload_every_s = 0.0  # due at every record from now on
    tracker.log(_record(3, 0.25))
    assert len(listdir(target, s3)) == 2
    tracker.log(_record(4, 0.125))
    tracker.close()
    names = listdir(target, s3)
    assert len(names) == 4 and names == sorted(names)
    assert os.listdir(staging) == []  # staging directory removed
    tags = visible({n: read_bytes(f"{target}/{n}", s3) for n in names})
    assert [s for s, _ in tags["train/loss"]] == [1, 2, 3, 4]
    [(step, (w, h, png))] = tags["samples"]
    assert (step, w, h) == (2, 12, 8) and Image.open(io.BytesIO(png)).size == (12, 8)


class _Broken:
    name = "broken"

    def __init__(self):
        self.closed = False

    def scalars(self, step, values):
        raise ConnectionError("tracking server unreachable")

    def image(self, step, png):
        raise AssertionError("dropped sinks get nothing more")

    rewind = image

    def flush(self):
        pass

    def close(self):
        self.closed = True


def test_failing_sink_is_dropped_and_the_others_continue(tmp_path, caplog):
    broken = _Broken()
    tb = TensorBoardSink(str(tmp_path / "tb"))
    tracker = Tracker([broken, tb])
    with caplog.at_level(logging.WARNING, logger="raydiff.tracking"):
        tracker.log(_record(1, 1.0))
        tracker.log(_record(2, 0.5))
        tracker.image(2, _png())
    tracker.close()
    assert broken.closed and [s.name for s in tracker.sinks] == ["tensorboard"]
    assert [r.getMessage() for r in caplog.records] == [
        "raydiff: broken tracking failed (ConnectionError: tracking server unreachable); "
        "it is off for the rest of this run"]
    tags = visible(read_dir(tmp_path / "tb"))
    assert [s for s, _ in tags["train/loss"]] == [1, 2] and len(tags["samples"]) == 1


@pytest.mark.parametrize("key,package", [("mlflow", "mlflow"), ("wandb", "wandb")])
def test_enabled_sink_without_its_package_is_a_config_error(key, package, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == package else real(name, *a))
    cfg = load_config(None, [f"logging.{key}.enabled=true"])
    with pytest.raises(ConfigError, match=f"pip install {package}"):
        check_tracking_packages(cfg.logging)
    check_tracking_packages(load_config(None, []).logging)  # nothing enabled, nothing needed
    # Through the CLI: exit 2 with one line, before any data is prepared or Ray started.
    assert main(["train", f"logging.{key}.enabled=true", "run.storage=/nonexistent/never-created"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"raydiff: logging.{key}.enabled=true but the {package} package is not installed. Fix: "
                   f"pip install {package} (in the environment of every node), or set logging.{key}.enabled=false"]


def test_build_tracker_follows_config(tmp_path):
    cfg = load_config(None, ["logging.tensorboard=false"])
    assert build_tracker(cfg, str(tmp_path), resume_step=0, params={}).sinks == []
    t = build_tracker(load_config(None, []), str(tmp_path), resume_step=0, params={})
    assert [s.name for s in t.sinks] == ["tensorboard"]
    t.close()
    assert (tmp_path / "tensorboard").is_dir()


def test_mfu_estimate():
    from torch.utils.flop_counter import FlopCounterMode

    from orchestrator.builders import build_denoiser

    cfg = load_config(None, ["model.name=unet-tiny", "data.resolution=16"])
    from torch.nn.attention import SDPBackend, sdpa_kernel

    # The meta-device count equals the count of a real forward pass (with the math attention
    # kernel: the flop counter does not see inside CPU's fused attention, and would miss it).
    model = build_denoiser(cfg.model, cfg.data, 10)
    with FlopCounterMode(display=False) as fc, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        model(torch.randn(1, 3, 16, 16), torch.tensor([5]), ClassLabels(torch.tensor([1]), 10))
    assert fc.get_flop_counts()["Global"][torch.ops.aten.bmm] > 0  # attention counted
    assert train_flops_per_image(cfg.model, cfg.data, 10) == 3 * fc.get_total_flops() > 0
    # DiT-S/2 on 32x32 latents: Peebles & Xie 2023 give 6.06 Gflops (multiply-adds) per forward.
    dit = load_config(None, ["model.name=dit-s2", "data.format=latents", "data.resolution=32"])
    assert train_flops_per_image(dit.model, dit.data, 1000) / 3 / 2 == pytest.approx(6.06e9, rel=0.01)
    assert peak_flops("NVIDIA H100 80GB HBM3", "bf16") == 989e12
    assert peak_flops("NVIDIA H100 PCIe", "fp16") == 756e12
    assert peak_flops("NVIDIA H100 80GB HBM3", "fp32") is None  # no half-precision peak applies
    assert peak_flops("Some Future GPU", "bf16") is None
    # On CPU MFU is not defined: the meter says so instead of guessing.
    meter = MfuMeter(cfg, 10, device=torch.device("cpu"), precision="bf16", world=2)
    assert meter.peak is None and meter(1000.0) is None
    meter.peak, meter.flops_per_image = 100e12, 1e9  # 2 GPUs of 100 TFLOP/s
    assert meter(50_000.0) == pytest.approx(0.25)
