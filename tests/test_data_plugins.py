"""Dataset formats are plugins: the registry matches the config's choices, and a format defined
here (a folder of ``.npy`` arrays) trains through the unchanged pipeline once registered."""

from __future__ import annotations

import io
import sys
import typing
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pytest

from orchestrator.config import DataConfig
from orchestrator.data import DataError, DatasetInfo, bad_sample_counts, build_train_dataset, inspect_dataset
from orchestrator.data.counter import report
from orchestrator.data.decode import CORRUPT, to_model_range
from orchestrator.data.formats import FORMATS, register_format
from orchestrator.data.formats.base import DataFormat, DecodeContext, count, ext, read_one


def test_config_choices_are_the_registered_formats():
    choices = typing.get_args(DataConfig.model_fields["format"].annotation)
    assert set(choices) == {"auto", *FORMATS}
    assert set(FORMATS) == {"imagefolder", "webdataset", "parquet", "latents"}


class NpyFolder(DataFormat):
    """``root/<class>/*.npy``: uint8 ``[H, W, C]`` arrays already at the training resolution."""

    name = "npyfolder"
    description = ".npy arrays"

    def detect(self, files):
        return sum(ext(rel) == ".npy" for rel, _ in files)

    def inspect(self, cfg, files):
        arrays = sorted(rel for rel, _ in files if ext(rel) == ".npy")
        classes = sorted({rel.split("/", 1)[0] for rel in arrays})
        labels = tuple(classes.index(rel.split("/", 1)[0]) for rel in arrays)
        return DatasetInfo(cfg.source, self.name, len(arrays), tuple(classes), tuple(arrays), labels)

    def units(self, cfg, info, fs, root):
        return pa.table({"unit": pa.array(info.files, pa.string()), "label": pa.array(info.labels, pa.int64())})

    def decode(self, batch: dict[str, np.ndarray], ctx: DecodeContext) -> Iterator[dict[str, np.ndarray]]:
        fs = ctx.filesystem()
        counts: dict[str, int] = {}
        images, labels = [], []
        for rel, label in zip(batch["unit"], batch["label"].tolist()):
            try:
                arr = np.load(io.BytesIO(read_one(fs, f"{ctx.root}/{rel}")))
            except ValueError:
                count(counts, CORRUPT)
                continue
            images.append(arr)
            labels.append(label)
        report(counts, ctx.counter_name)
        stacked = np.stack(images) if images else np.zeros((0, ctx.resolution, ctx.resolution, ctx.channels), np.uint8)
        yield {"image": to_model_range(stacked), "label": np.asarray(labels, np.int64)}

    def iter_samples(self, cfg, info, fs, root, *, threads) -> Iterator[tuple[str, Any, Any]]:
        for rel, label in zip(info.files, info.labels):
            yield rel, read_one(fs, f"{root}/{rel}"), label


def test_a_registered_format_trains_without_changing_the_pipeline(ray_local, tmp_path, counter_name):
    import ray.cloudpickle

    rng = np.random.default_rng(0)
    written = {}
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(3):
            arr = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            np.save(tmp_path / cls / f"{i}.npy", arr)
            written[f"{cls}/{i}.npy"] = arr
    (tmp_path / "dog" / "broken.npy").write_bytes(b"not an array")
    cfg = DataConfig(source=str(tmp_path), resolution=8)  # format: auto (the Literal names only built-ins)
    with pytest.raises(DataError, match="found no images"):
        inspect_dataset(cfg)

    # Ray workers cannot import this test module: ship the format class by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    register_format(NpyFolder())
    try:
        info = inspect_dataset(cfg)
        assert (info.format, info.num_samples, info.class_names) == ("npyfolder", 7, ("cat", "dog"))
        name = counter_name("npy")
        batch = build_train_dataset(cfg, info, counter_name=name).take_batch(10, batch_format="numpy")
        assert batch["image"].shape == (6, 3, 8, 8) and batch["image"].dtype == np.float32
        expected = {(int(cls == "dog"), to_model_range(a[None])[0].tobytes()) for rel, a in written.items() for cls in [rel.split("/")[0]]}
        assert {(int(l), img.tobytes()) for img, l in zip(batch["image"], batch["label"])} == expected
        assert bad_sample_counts(name) == {"corrupt": 1}
    finally:
        FORMATS.pop(NpyFolder.name, None)
        ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
