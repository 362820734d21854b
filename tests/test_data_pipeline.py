"""The Ray Data training pipeline on real Ray: image folders locally and on a local S3."""

from __future__ import annotations

import json
import uuid

import numpy as np
import pytest
from test_data_helpers import collect, expected_tensor, upload_dir, write_imagefolder

from orchestrator.config import DataConfig
from orchestrator.data import DataError, bad_sample_counts, build_train_dataset, inspect_dataset


def _match_rows(images: np.ndarray, labels: np.ndarray, written: dict, class_names) -> None:
    """Every written image arrives exactly once, pixel-equal, with its class index."""
    assert len(images) == len(written)
    expected = {rel: (class_names.index(cls) if class_names else 0, expected_tensor(img)) for rel, (cls, img) in written.items()}
    unmatched = dict(expected)
    for img, lab in zip(images, labels):
        hit = [rel for rel, (l, e) in unmatched.items() if np.allclose(img, e, atol=1e-6)]
        assert hit, "a row matches no written image"
        assert unmatched.pop(hit[0])[0] == lab
    assert not unmatched


def test_imagefolder_local_roundtrip(ray_local, tmp_path, counter_name):
    written = write_imagefolder(tmp_path / "ds", {"cat": 3, "dog": 4})
    cfg = DataConfig(source=str(tmp_path / "ds"), resolution=16, decode_batch_size=4)
    info = inspect_dataset(cfg)
    assert (info.format, info.num_samples, info.class_names, info.num_classes) == ("imagefolder", 7, ("cat", "dog"), 2)
    ds = build_train_dataset(cfg, info, counter_name=counter_name("t"))
    images, labels = collect(ds)
    assert images.dtype == np.float32 and images.shape == (7, 3, 16, 16)
    assert labels.dtype == np.int64
    assert images.min() >= -1 and images.max() <= 1
    _match_rows(images, labels, written, ["cat", "dog"])


def test_file_order_is_seeded(ray_local, tmp_path):
    write_imagefolder(tmp_path / "ds", {"a": 6, "b": 6})

    def order(seed):
        cfg = DataConfig(source=str(tmp_path / "ds"), resolution=16, seed=seed, decode_batch_size=4)
        images, _ = collect(build_train_dataset(cfg, inspect_dataset(cfg)))
        return images[:, 0, 0, 0].tolist()

    a, b, c = order(1), order(1), order(2)
    assert a == b
    assert a != c and sorted(a) == sorted(c)


def test_resize_crop_grayscale_and_unconditional(ray_local, tmp_path):
    from PIL import Image

    root = tmp_path / "flat"
    root.mkdir()
    # 40x20: left half black, right half white. Center crop keeps the middle 20x20 square.
    a = np.zeros((20, 40, 3), np.uint8)
    a[:, 20:] = 255
    Image.fromarray(a).save(root / "x.png")
    cfg = DataConfig(source=str(root), resolution=8, channels=1, center_crop=True)
    info = inspect_dataset(cfg)
    assert info.class_names is None and info.num_classes is None
    images, labels = collect(build_train_dataset(cfg, info))
    assert images.shape == (1, 1, 8, 8) and labels.tolist() == [0]
    assert images[0, 0, :, 0].max() < -0.9 and images[0, 0, :, -1].min() > 0.9
    # Without crop the whole 40x20 image is squeezed: still black left, white right.
    cfg2 = cfg.model_copy(update={"center_crop": False, "channels": 3})
    images, _ = collect(build_train_dataset(cfg2, inspect_dataset(cfg2)))
    assert images.shape == (1, 3, 8, 8)
    assert images[0, :, :, :3].max() < -0.9 and images[0, :, :, 5:].min() > 0.9


def test_labels_file_csv_and_json(ray_local, tmp_path, counter_name):
    root = tmp_path / "ds"
    root.mkdir()
    from test_data_helpers import png_bytes, rand_image

    for i in range(4):
        (root / f"{i}.png").write_bytes(png_bytes(rand_image(100 + i)))
    (root / "labels.csv").write_text("path,label\n0.png,zebra\n1.png,ant\n2.png,zebra\n")
    cfg = DataConfig(source=str(root), labels_file="labels.csv", resolution=16)
    info = inspect_dataset(cfg)
    assert info.class_names == ("ant", "zebra") and info.num_samples == 4
    name = counter_name("t")
    images, labels = collect(build_train_dataset(cfg, info, counter_name=name))
    assert sorted(labels.tolist()) == [0, 1, 1]
    assert bad_sample_counts(name) == {"missing_label": 1}
    # Unconditional: the unlabeled image is kept, every label is 0.
    cfg_u = cfg.model_copy(update={"conditional": False})
    images, labels = collect(build_train_dataset(cfg_u, info))
    assert len(images) == 4 and set(labels.tolist()) == {0}
    (root / "labels.json").write_text(json.dumps({"0.png": 2, "1.png": 0, "3.png": 1}))
    cfg_j = DataConfig(source=str(root), labels_file="labels.json", resolution=16)
    info = inspect_dataset(cfg_j)
    assert info.class_names == ("0", "1", "2")


def test_imagefolder_on_s3(ray_local, s3_server, tmp_path):
    written = write_imagefolder(tmp_path / "ds", {"a": 2, "b": 3})
    bucket = s3_server.create_bucket(f"imgs-{uuid.uuid4().hex[:8]}")
    upload_dir(s3_server.client(), bucket, "train/v1", tmp_path / "ds")
    cfg = DataConfig(source=f"s3://{bucket}/train/v1", resolution=16).with_storage(s3_server.s3_config())
    info = inspect_dataset(cfg)
    assert (info.format, info.num_samples, info.class_names) == ("imagefolder", 5, ("a", "b"))
    images, labels = collect(build_train_dataset(cfg, info))
    _match_rows(images, labels, written, ["a", "b"])


def test_builtin_source_needs_materialising():
    with pytest.raises(DataError, match="make-demo|write_demo_dataset"):
        inspect_dataset(DataConfig(source="builtin"))


def test_missing_local_path(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        inspect_dataset(DataConfig(source=str(tmp_path / "nope")))


def test_no_images(tmp_path):
    (tmp_path / "readme.txt").write_text("hi")
    with pytest.raises(DataError, match="found no images"):
        inspect_dataset(DataConfig(source=str(tmp_path)))


def test_s3_transient_read_errors_are_retried_and_counted(ray_local, s3_server, s3_faults, tmp_path, counter_name):
    written = write_imagefolder(tmp_path / "ds", {"a": 3, "b": 3})
    bucket = s3_server.create_bucket(f"flaky-{uuid.uuid4().hex[:8]}")
    upload_dir(s3_server.client(), bucket, "d", tmp_path / "ds")
    cfg = DataConfig(source=f"s3://{bucket}/d", resolution=16, decode_batch_size=2).with_storage(
        s3_server.s3_config(endpoint_url=s3_faults.endpoint_url, max_attempts=6))
    info = inspect_dataset(cfg)
    # The next 3 requests for objects in the bucket fail with 503 SlowDown (throttling).
    s3_faults.plan.fail_path_prefix = f"/{bucket}/d/"
    s3_faults.plan.fail_next = 3
    name = counter_name("flaky")
    images, labels = collect(build_train_dataset(cfg, info, counter_name=name))
    assert s3_faults.plan.faults_sent == 3
    _match_rows(images, labels, written, ["a", "b"])  # nothing lost
    assert bad_sample_counts(name) == {"retried_read": 3}


def test_iter_torch_batches_types(ray_local, tmp_path):
    import torch

    write_imagefolder(tmp_path / "ds", {"a": 3, "b": 2})
    cfg = DataConfig(source=str(tmp_path / "ds"), resolution=16)
    ds = build_train_dataset(cfg, inspect_dataset(cfg))
    batches = list(ds.iter_torch_batches(batch_size=4))
    assert [b["image"].shape[0] for b in batches] == [4, 1]
    assert batches[0]["image"].dtype == torch.float32 and batches[0]["label"].dtype == torch.int64
    assert tuple(batches[0]["image"].shape[1:]) == (3, 16, 16)


def test_single_file_source_and_hidden_files(tmp_path):
    from test_data_helpers import png_bytes, rand_image

    root = tmp_path / "ds"
    (root / "_underscore_class").mkdir(parents=True)
    (root / "_underscore_class" / "a.png").write_bytes(png_bytes(rand_image(1)))
    (root / ".cache").mkdir()
    (root / ".cache" / "b.png").write_bytes(png_bytes(rand_image(2)))
    (root / "_SUCCESS").write_bytes(b"")
    info = inspect_dataset(DataConfig(source=str(root)))
    assert info.class_names == ("_underscore_class",) and info.num_samples == 1
    with pytest.raises(DataError, match="single file.*Fix: set data.source="):
        inspect_dataset(DataConfig(source=str(root / "_underscore_class" / "a.png")))


def test_small_local_set_decoded_here_matches_ray_data(ray_local, tmp_path, counter_name):
    """The driver-side decode of small local sets (pipeline.decode_here, used for the training
    cache instead of a Ray Data job) gives Ray Data's rows: same ids, pixels, labels and bad-sample
    counts."""
    from orchestrator.data.pipeline import decode_here, decodes_here

    write_imagefolder(tmp_path / "ds", {"a": 5, "b": 6})
    (tmp_path / "ds" / "b" / "broken.png").write_bytes(b"not a png")
    cfg = DataConfig(source=str(tmp_path / "ds"), resolution=16, decode_batch_size=4)
    info = inspect_dataset(cfg)
    assert decodes_here(cfg, info)
    assert not decodes_here(cfg.model_copy(update={"source": "s3://bucket/ds"}), info)  # object storage: Ray Data reads in parallel
    names = [counter_name("t") for _ in range(2)]
    here = list(decode_here(cfg, info, counter_name=names[0]))
    assert len(here) > 1  # the format's blocks, not one array
    ref = build_train_dataset(cfg, info, counter_name=names[1]).take_all()

    def by_id(rows):
        return {int(i): (img, int(lab)) for i, img, lab in rows}

    a = by_id((i, img, lab) for b in here for i, img, lab in zip(b["index"], b["image"], b["label"]))
    r = by_id((row["index"], row["image"], row["label"]) for row in ref)
    assert sorted(a) == sorted(r) and len(a) == 11
    for i, (img, lab) in r.items():
        assert a[i][1] == lab and np.array_equal(a[i][0], img)
    assert bad_sample_counts(names[0]) == bad_sample_counts(names[1]) == {"not_an_image": 1}
