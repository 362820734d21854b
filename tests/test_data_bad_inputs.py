"""Bad samples are dropped and counted per kind; unusual pixel modes are converted and counted."""

from __future__ import annotations

import io
import uuid

import numpy as np
import pytest
from PIL import Image
from test_data_helpers import collect, huge_png_header, jpeg_bytes, png_bytes, rand_image

from orchestrator.config import DataConfig
from orchestrator.data import bad_sample_counts, build_train_dataset, inspect_dataset
from orchestrator.data.decode import MIN_IMAGE_SIDE, decode_image

BASE = rand_image(1, 32)


def _save(img: Image.Image, fmt: str) -> bytes:
    b = io.BytesIO()
    img.save(b, format=fmt)
    return b.getvalue()


def _corrupt_png() -> bytes:
    b = bytearray(png_bytes(BASE))
    b[60:200] = b"\x00" * 140  # inside the compressed pixel data: CRC and zlib stream break
    return bytes(b)


BAD = {
    "empty_file": b"",
    "not_an_image": b"this is a text file that claims to be a .png",
    "truncated_png": png_bytes(BASE)[: len(png_bytes(BASE)) // 2],
    "truncated_jpeg": jpeg_bytes(BASE)[: len(jpeg_bytes(BASE)) // 2],
    "corrupt": _corrupt_png(),
    "too_small": png_bytes(rand_image(3, MIN_IMAGE_SIDE - 1)),
    "decompression_bomb": huge_png_header(40_000, 40_000),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_file_kinds(name):
    arr, kind = decode_image(BAD[name], 16, 3, True)
    assert arr is None
    assert kind == name.split("_png")[0].split("_jpeg")[0]


def test_bomb_check_does_not_allocate():
    import tracemalloc

    tracemalloc.start()
    decode_image(huge_png_header(60_000, 60_000), 16, 3, True)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 50 << 20  # the declared image would be 3.6 GB


GRAY = np.asarray(BASE.convert("L"))


def _modes() -> dict[str, tuple[bytes, np.ndarray]]:
    """mode -> (file bytes, expected RGB array at 32x32)."""
    rgba = BASE.convert("RGBA")
    a = np.asarray(rgba).copy()
    a[:16, :, 3] = 0  # top half fully transparent -> white
    rgba = Image.fromarray(a, "RGBA")
    exp_rgba = np.asarray(BASE).copy()
    exp_rgba[:16] = 255
    la = Image.merge("LA", (BASE.convert("L"), Image.fromarray(a[:, :, 3])))
    exp_la = np.repeat(GRAY[:, :, None], 3, axis=2).copy()
    exp_la[:16] = 255
    pal = BASE.convert("P")
    return {
        "L": (png_bytes(BASE.convert("L")), np.repeat(GRAY[:, :, None], 3, axis=2)),
        "LA": (png_bytes(la), exp_la),
        "P": (png_bytes(pal), np.asarray(pal.convert("RGB"))),
        "RGBA": (png_bytes(rgba), exp_rgba),
        "I;16": (png_bytes(Image.fromarray(GRAY.astype(np.uint16) * 257)), np.repeat(GRAY[:, :, None], 3, axis=2)),
        # CMYK -> RGB is PIL's naive conversion; JPEG is lossy, so compare loosely below.
        "CMYK": (_save(Image.new("CMYK", (32, 32), (0, 255, 255, 0)), "JPEG"), np.broadcast_to(np.array([255, 0, 0], np.uint8), (32, 32, 3))),
    }


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "I;16", "CMYK"])
def test_unusual_modes_are_converted(mode):
    data, expected = _modes()[mode]
    assert Image.open(io.BytesIO(data)).mode == mode
    arr, kind = decode_image(data, 32, 3, True)
    assert kind == "converted_from_" + mode.replace(";", "_")
    assert arr.shape == (32, 32, 3)
    tol = 8 if mode == "CMYK" else 0
    assert np.abs(arr.astype(int) - expected.astype(int)).max() <= tol


def test_grayscale_target_from_rgb_and_16bit():
    arr, kind = decode_image(png_bytes(Image.fromarray(GRAY.astype(np.uint16) * 257)), 32, 1, True)
    assert arr.shape == (32, 32, 1) and kind == "converted_from_I_16"
    assert np.array_equal(arr[:, :, 0], GRAY)  # scaled from 16 to 8 bit, not clipped at 255


def test_pipeline_drops_and_counts(ray_local, tmp_path, counter_name):
    root = tmp_path / "ds"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    good = {f"a/good{i}.png": png_bytes(rand_image(10 + i, 16)) for i in range(3)}
    good["b/good.jpg"] = jpeg_bytes(rand_image(20, 16))
    for rel, data in good.items():
        (root / rel).write_bytes(data)
    ext = {"truncated_jpeg": "jpg", "not_an_image": "png"}
    for name, data in BAD.items():
        (root / f"b/{name}.{ext.get(name, 'png')}").write_bytes(data)
    modes = _modes()
    for mode, (data, _) in modes.items():
        (root / f"a/mode_{mode.replace(';', '_')}.{'jpg' if mode == 'CMYK' else 'png'}").write_bytes(data)
    cfg = DataConfig(source=str(root), resolution=16, decode_batch_size=5)
    info = inspect_dataset(cfg)
    assert info.num_samples == len(good) + len(BAD) + len(modes)
    name = counter_name("bad")
    images, labels = collect(build_train_dataset(cfg, info, counter_name=name))
    assert len(images) == len(good) + len(modes)
    assert np.isfinite(images).all() and images.shape[1:] == (3, 16, 16)
    counts = bad_sample_counts(name)
    assert counts == {
        "empty_file": 1,
        "not_an_image": 1,
        "truncated": 2,
        "corrupt": 1,
        "too_small": 1,
        "decompression_bomb": 1,
        **{"converted_from_" + m.replace(";", "_"): 1 for m in modes},
    }
    assert bad_sample_counts(f"never-created-{uuid.uuid4().hex}") == {}


def test_a_counter_starts_with_the_first_count_outlives_its_task_and_ends_with_its_release(ray_local, counter_name):
    """No bad sample, no counter process; the task that counts first creates it, detached (it
    outlives that task's worker process), and a count after its owner ended it starts a new one,
    also in a process that kept the old handle (a decode worker reused by the next run)."""
    import ray

    from orchestrator.data import counter as counter_mod

    name = counter_name("lazy")
    assert counter_mod.counter(name, create=False) is None  # nothing counted: no actor

    @ray.remote(num_cpus=0)
    def count_in_a_task(counts):
        counter_mod.report(counts, name)

    @ray.remote(num_cpus=0, max_calls=1)  # its worker process exits after the call
    def count_and_exit(counts):
        counter_mod.report(counts, name)

    ray.get(count_and_exit.remote({"corrupt": 1}))
    ray.get(count_in_a_task.remote({"corrupt": 2}))
    assert bad_sample_counts(name) == {"corrupt": 3}
    counter_mod.report({"corrupt": 1}, name)  # this process now holds a handle too
    old = counter_mod._COUNTERS[name]
    ray.kill(old)  # ended by its owner elsewhere (release_counter in another process)
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(old.get.remote())
    counter_mod.report({"empty_file": 1}, name)  # the stale handle: a new counter
    assert bad_sample_counts(name) == {"empty_file": 1}


def test_missing_and_out_of_range_labels(ray_local, tmp_path, counter_name):
    root = tmp_path / "flat"
    root.mkdir()
    for i in range(5):
        (root / f"{i}.png").write_bytes(png_bytes(rand_image(30 + i, 16)))
    # 0, 1: fine; 2: out of range (negative); 3: not listed (missing); 4: fine
    (root / "labels.csv").write_text("0.png,0\n1.png,1\n2.png,-3\n4.png,1\n")
    cfg = DataConfig(source=str(root), labels_file="labels.csv", resolution=16)
    info = inspect_dataset(cfg)
    assert info.class_names == ("0", "1")
    name = counter_name("lab")
    images, labels = collect(build_train_dataset(cfg, info, counter_name=name))
    assert sorted(labels.tolist()) == [0, 1, 1]
    assert bad_sample_counts(name) == {"missing_label": 1, "label_out_of_range": 1}


def test_exif_orientation_is_applied():
    # Upright: 48x32, four flat colour blocks (JPEG-friendly), so orientation mistakes are obvious.
    a = np.zeros((32, 48, 3), np.uint8)
    a[:16, :24], a[:16, 24:], a[16:, :24], a[16:, 24:] = (230, 30, 30), (30, 230, 30), (30, 30, 230), (230, 230, 30)
    upright = Image.fromarray(a)
    # A camera held sideways stores the pixels rotated and tags orientation 6 ("rotate 90° CW
    # to display"): the stored image is the upright one turned 90° counter-clockwise.
    stored = upright.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    b = io.BytesIO()
    stored.save(b, format="JPEG", quality=95, exif=exif.tobytes())
    for crop in (True, False):
        want, _ = decode_image(jpeg_bytes(upright, quality=95), 16, 3, crop)
        got, kind = decode_image(b.getvalue(), 16, 3, crop)
        ignored, _ = decode_image(jpeg_bytes(stored, quality=95), 16, 3, crop)
        assert kind is None and got.shape == want.shape == (16, 16, 3)
        assert np.abs(got.astype(int) - want.astype(int)).mean() < 6  # same picture, up to JPEG
        assert np.abs(ignored.astype(int) - want.astype(int)).mean() > 40  # the tag matters
