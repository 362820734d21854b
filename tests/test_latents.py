"""Latent diffusion input: ``raydiff data encode`` (a small randomly initialised AutoencoderKL,
saved to a temporary directory), the ``latents`` format plugin, config checks, latent sample
grids, and one tiny training run on latents."""

from __future__ import annotations

import io
import json
import logging
import uuid
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from orchestrator import storage
from orchestrator.cli import main
from orchestrator.config import ConfigError, DataConfig, load_config
from orchestrator.data import DataError, bad_sample_counts, build_train_dataset, inspect_dataset
from orchestrator.data.decode import decode_image, to_model_range
from orchestrator.data.demo import write_demo_dataset
from orchestrator.data.encode import encode
from orchestrator.data.formats.latents import LATENTS_MANIFEST, latents_of
from orchestrator.data.vae import decode_latents, encode_mean, latent_preview, load_vae, resolve_vae

PER_CLASS = 3  # 30 images
IMAGE_RES = 16  # -> 8x8 latents: the VAE below downsamples 2x
LATENT = [4, 8, 8]


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory) -> str:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                        layers_per_block=1, norm_num_groups=8, sample_size=32)
    d = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(d)
    return str(d)


@pytest.fixture(scope="module")
def images_dir(tmp_path_factory) -> Path:
    return write_demo_dataset(tmp_path_factory.mktemp("shapes"), images_per_class=PER_CLASS, resolution=32, seed=0)


@pytest.fixture(scope="module")
def encoded(ray_local, vae_dir, images_dir, tmp_path_factory) -> tuple[str, dict]:
    dest = str(tmp_path_factory.mktemp("latents"))
    out = io.StringIO()
    manifest = encode(str(images_dir), dest, vae=vae_dir, resolution=IMAGE_RES, batch_size=8, dtype="float32",
                      shard_rows=8, progress=False, out=out)
    assert "data.format=latents data.resolution=8" in out.getvalue()
    return dest, manifest


def _expected(vae_dir: str, images_dir: Path, scaling: float) -> tuple[np.ndarray, np.ndarray]:
    """The VAE's own encoding (posterior mean x scaling) of every image, decoded the way
    training decodes (centre crop, bicubic resize), and each image's class index."""
    files = sorted(images_dir.glob("*/*.png"))
    classes = sorted({f.parent.name for f in files})
    arr = np.stack([decode_image(f.read_bytes(), IMAGE_RES, 3, True)[0] for f in files])
    vae = load_vae(vae_dir)
    z = encode_mean(vae, torch.from_numpy(to_model_range(arr)), scaling, None).numpy()
    return z, np.asarray([classes.index(f.parent.name) for f in files])


def _stored(dest: str, manifest: dict, s3cfg=None) -> tuple[np.ndarray, np.ndarray]:
    fs, root = storage.filesystem_for(dest, s3cfg)
    lat, lab = [], []
    for shard in manifest["shards"]:
        pf = pq.ParquetFile(fs.open_input_file(f"{root}/{shard['name']}"))
        assert [pf.metadata.row_group(i).num_rows for i in range(pf.metadata.num_row_groups)] == shard["row_groups"]
        t = pf.read()
        lat.append(latents_of(t.column("latent")))
        lab.append(t.column("label").to_numpy())
    return np.concatenate(lat), np.concatenate(lab)


def _assert_same_set(stored: np.ndarray, stored_labels: np.ndarray, expected: np.ndarray, labels: np.ndarray, atol: float) -> None:
    """Every stored latent is the encoding of exactly one image, with that image's label."""
    s, e = stored.reshape(len(stored), -1).astype(np.float64), expected.reshape(len(expected), -1).astype(np.float64)
    assert len(s) == len(e)
    dist = np.abs(s[:, None, :] - e[None, :, :]).max(axis=2)
    match = dist.argmin(axis=1)
    assert sorted(match.tolist()) == list(range(len(e)))  # a bijection
    assert dist[np.arange(len(s)), match].max() <= atol
    assert (stored_labels == labels[match]).all()


# ---------------------------------------------------------------------------------------------
# Config: no Ray, no data


def test_config_latents_defaults_checks_and_dry_run(tmp_path, capsys):
    cfg = load_config(None, ["data.format=latents", "data.resolution=8"])
    assert (cfg.data.channels, cfg.sampling.clip_sample) == (4, False)
    fix = "Fix: set data.format=latents and leave data.channels/sampling.clip_sample unset, or data.channels=3"
    for overrides, shown in ((["data.channels=4"], "data.format=auto with data.channels=4, "),
                             (["data.format=latents", "data.channels=3"], "data.format=latents with data.channels=3, "),
                             (["data.format=latents", "sampling.clip_sample=true"], "data.channels=4, sampling.clip_sample=true")):
        with pytest.raises(ConfigError) as e:
            load_config(None, overrides)
        assert shown in str(e.value) and fix in str(e.value)

    assert main(["train", "--dry-run", "data.format=latents", "data.resolution=8", f"run.storage={tmp_path}"]) == 0
    text = capsys.readouterr().out
    assert "format: latents" in text and "channels: 4" in text and "clip_sample: false" in text
    assert main(["train", "--dry-run", "data.channels=4"]) == 2
    assert fix in capsys.readouterr().err


def test_bad_vae_path_is_a_one_line_error(tmp_path, images_dir, capsys):
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    (tmp_path / "novae").mkdir()
    cases = [(tmp_path / "missing", "no such directory"), (tmp_path / "novae", "no config.json"),
             (tmp_path / "unet", "config.json describes UNet2DModel, not an AutoencoderKL")]
    for path, why in cases:
        rc = main(["data", "encode", str(images_dir), str(tmp_path / "out"), "--vae", str(path), "--no-progress"])
        err = capsys.readouterr().err
        assert rc == 2 and err.count("\n") == 1, err
        assert f"--vae {path}: {why}" in err and "diffusers AutoencoderKL directory" in err
    with pytest.raises(DataError, match="must be a local directory"):
        resolve_vae("s3://bucket/vae")


def test_pipeline_directory_and_resolution_checks(tmp_path, vae_dir, images_dir):
    (tmp_path / "pipe").mkdir()
    (tmp_path / "pipe" / "vae").symlink_to(vae_dir)
    spec = resolve_vae(str(tmp_path / "pipe"))
    assert (spec.path, spec.downsample, spec.latent_channels, spec.scaling_factor) == (str(tmp_path / "pipe" / "vae"), 2, 4, 0.18215)
    with pytest.raises(DataError, match=r"--resolution 15: this VAE downsamples 2x.*Fix: e.g. --resolution 16"):
        encode(str(images_dir), str(tmp_path / "out"), vae=vae_dir, resolution=15)
    with pytest.raises(DataError, match="--format latents: SRC must be an image dataset"):
        encode(str(images_dir), str(tmp_path / "out"), vae=vae_dir, resolution=16, data_options={"format": "latents"})


# ---------------------------------------------------------------------------------------------
# Encoding and reading back


def test_encode_local_manifest_and_latents_equal_the_vae(encoded, vae_dir, images_dir):
    dest, m = encoded
    assert json.loads(Path(dest, LATENTS_MANIFEST).read_text()) == m
    assert (m["num_samples"], m["shape"], m["dtype"], m["latent"]) == (30, LATENT, "float32", "mean")
    assert (m["scaling_factor"], m["shift_factor"], m["image_resolution"]) == (0.18215, None, IMAGE_RES)
    assert m["vae"]["path"] == str(Path(vae_dir).resolve()) and m["vae"]["config_sha256"] == resolve_vae(vae_dir).config_sha256
    assert len(m["classes"]) == 10 and set(m["class_counts"].values()) == {PER_CLASS}
    assert (m["source"], m["source_format"], m["bad_samples"]) == (str(images_dir), "imagefolder", {})
    assert [s["num_samples"] for s in m["shards"]] == [8, 8, 8, 6]
    lat, lab = _stored(dest, m)
    assert lat.dtype == np.float32 and lat.shape == (30, *LATENT)
    expected, labels = _expected(vae_dir, images_dir, 0.18215)
    _assert_same_set(lat, lab, expected, labels, atol=1e-5)


def test_latents_are_detected_and_train_batches_are_the_latents(encoded, ray_local, counter_name):
    dest, m = encoded
    info = inspect_dataset(DataConfig(source=dest, resolution=8))  # format: auto
    assert (info.format, info.num_samples, info.class_names) == ("latents", 30, tuple(m["classes"]))
    with pytest.raises(DataError, match=r"holds VAE latents of shape \[4, 8, 8\].*Fix: set data.format=latents data.channels=4"):
        build_train_dataset(DataConfig(source=dest, resolution=8), info)
    with pytest.raises(DataError, match=r"data.resolution=16.*Fix: set data.resolution=8 "):
        build_train_dataset(DataConfig(source=dest, format="latents", channels=4, resolution=16), info)

    cfg = DataConfig(source=dest, format="latents", channels=4, resolution=8)
    name = counter_name("lat")
    rows = build_train_dataset(cfg, inspect_dataset(cfg), counter_name=name).take_batch(100, batch_format="numpy")
    assert rows["image"].shape == (30, *LATENT) and rows["image"].dtype == np.float32
    lat, lab = _stored(dest, m)
    _assert_same_set(rows["image"], rows["label"], lat, lab, atol=0)
    assert bad_sample_counts(name) == {}


def test_encode_to_s3_float16_and_read_back(s3_server, ray_local, vae_dir, images_dir, capsys):
    bucket = s3_server.create_bucket(f"latents-{uuid.uuid4().hex[:8]}")
    dest = f"s3://{bucket}/shapes-latents"
    s3 = ["--endpoint-url", s3_server.endpoint_url, "--region", s3_server.region]
    rc = main(["data", "encode", str(images_dir), dest, "--vae", vae_dir, "--resolution", str(IMAGE_RES),
               "--scaling-factor", "0.5", "--no-progress", *s3])
    assert rc == 0, capsys.readouterr().err
    s3cfg = s3_server.s3_config()
    m = json.loads(storage.read_bytes(f"{dest}/{LATENTS_MANIFEST}", s3cfg))
    assert (m["num_samples"], m["shape"], m["dtype"], m["scaling_factor"]) == (30, LATENT, "float16", 0.5)
    lat, lab = _stored(dest, m, s3cfg)
    assert lat.dtype == np.float16
    expected, labels = _expected(vae_dir, images_dir, 0.5)
    _assert_same_set(lat, lab, expected, labels, atol=2e-3)  # float16 rounding of values below ~2

    cfg = DataConfig(source=dest, format="latents", channels=4, resolution=8).with_storage(s3cfg)
    info = inspect_dataset(cfg)
    rows = build_train_dataset(cfg, info).take_batch(100, batch_format="numpy")
    assert rows["image"].dtype == np.float32
    _assert_same_set(rows["image"], rows["label"], lat.astype(np.float32), lab, atol=0)
    assert main(["data", "verify", dest, "--format", "latents", *s3]) == 0
    assert "30 of 30 samples readable" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# Sample grids of a latent model


def _grid_cfg(source: str):
    return load_config(None, [f"data.source={source}", "data.format=latents", "data.resolution=8", "sampling.num_steps=2",
                              "sampling.per_class=2", "sampling.max_rows=2"])


def test_latent_grids_are_decoded_by_the_vae_or_show_latent_channels(encoded, vae_dir, tmp_path, caplog):
    from model.conditioning import ClassLabels
    from orchestrator.sampling import generate, grid_labels, grid_png, sample_grid
    from orchestrator.builders import build_denoiser

    dest, m = encoded
    cfg = _grid_cfg(dest)
    torch.manual_seed(0)
    model = build_denoiser(cfg.model, cfg.data, 10)
    labels = grid_labels(10, cfg.sampling)
    latents = generate(model, cfg, ClassLabels(labels, 10), len(labels), seed=cfg.sampling.seed)
    assert latents.shape == (4, *LATENT) and latents.abs().max() > 1  # not clamped to the pixel range

    png = sample_grid(model, cfg)
    img = Image.open(io.BytesIO(png))
    # 2 rows x 2 columns of 16 px decoded images, 2 px padding, upscaled 2x.
    assert (img.mode, img.size) == ("RGB", (2 * (2 * 18 + 2), 2 * (2 * 18 + 2)))
    decoded = decode_latents(load_vae(vae_dir), latents, 0.18215, None)
    assert png == grid_png(decoded, 2)

    # The recorded VAE is not on this machine: the grid shows latent channels 0-2, with a warning.
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    (moved / LATENTS_MANIFEST).write_text(json.dumps({**m, "vae": {**m["vae"], "path": str(tmp_path / "gone")}}))
    with caplog.at_level(logging.WARNING, logger="raydiff"):
        png2 = sample_grid(model, _grid_cfg(str(moved)))
    assert "latent sample grids show latent channels 0-2" in caplog.text and "no such directory" in caplog.text
    assert Image.open(io.BytesIO(png2)).size == (2 * (2 * 10 + 2), 2 * (2 * 10 + 2))  # 8 px cells
    assert png2 == grid_png(latent_preview(latents), 2)


# ---------------------------------------------------------------------------------------------
# End to end


@pytest.mark.slow
def test_train_on_latents_end_to_end(encoded, ray_local, tmp_path, capsys):
    from orchestrator.storage import RunDir
    from orchestrator.train.checkpoint.layout import list_checkpoints

    dest, _ = encoded
    args = [f"data.source={dest}", "data.format=latents", "data.resolution=8", "model.name=unet-tiny",
            f"run.storage={tmp_path}", "run.name=latent", "scaling.num_workers=1", "optim.steps=3",
            "optim.batch_size=8", "optim.warmup_steps=1", "checkpoint.every_steps=3", "sampling.every_steps=3",
            "sampling.num_steps=2", "sampling.per_class=2", "sampling.max_rows=3", "logging.progress=false",
            "run.max_failures=0", "run.eval_per_class=1"]
    assert main(["train", *args]) == 0, capsys.readouterr().err
    assert "final step: 3" in capsys.readouterr().out
    rundir = RunDir.for_config(load_config(None, args))
    assert [r.step for r in list_checkpoints(rundir)] == [3]
    grid = Image.open(io.BytesIO(rundir.read_bytes("samples/step_0000003.png")))
    # Decoded by the VAE in the worker: 3 rows x 2 columns of 16 px images (8 px latents).
    assert (grid.mode, grid.size) == ("RGB", (2 * (2 * 18 + 2), 2 * (3 * 18 + 2)))
    ev = json.loads(rundir.read_text("eval.json"))  # the judge works in latent space
    assert ev["num_classes"] == 10 and 0 <= ev["sample_accuracy"] <= 1
