"""The exact data position: epoch order, rank slices, and TrainReader (streamed and cached) on
real Ray Data, for an image folder and WebDataset shards, with a bad sample."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from test_data_helpers import expected_tensor, png_bytes, rand_image, write_imagefolder

from orchestrator.config import DataConfig
from orchestrator.data import inspect_dataset
from orchestrator.data.formats.webdataset import build_shard
from orchestrator.data.position import SampleOrder, rank_positions
from orchestrator.data.reader import make_train_reader


def test_epoch_order_is_a_seeded_permutation_per_epoch():
    o = SampleOrder(np.array([3, 1, 4, 2, 5]), seed=7, window=4)
    e0, e1 = o.epoch(0), o.epoch(1)
    assert sorted(e0.tolist()) == list(range(15)) and sorted(e1.tolist()) == list(range(15))
    assert not np.array_equal(e0, e1)
    assert np.array_equal(e0, SampleOrder(np.array([3, 1, 4, 2, 5]), seed=7, window=4).epoch(0))
    assert o.unit_of(np.array([0, 2, 3, 4, 14])).tolist() == [0, 0, 1, 2, 4]
    # Without a window each unit's samples stay together, in storage order.
    plain = SampleOrder(np.array([3, 1, 4]), seed=1, window=0).epoch(0).tolist()
    runs = [plain[i : i + n] for i, n in ((plain.index(0), 3), (plain.index(3), 1), (plain.index(4), 4))]
    assert runs == [[0, 1, 2], [3], [4, 5, 6, 7]]


@pytest.mark.parametrize("world", [1, 2, 4])
def test_rank_slices_tile_the_epoch_and_resplit_at_any_world_size(world):
    total, batch = 37, 8
    full = np.concatenate([rank_positions(total, 0, batch, world, r) for r in range(world)], axis=1)
    assert full.shape == (4, 8)
    assert sorted(full.ravel().tolist()) == list(range(32))  # 4 whole batches, remainder left out
    for i, row in enumerate(full):
        assert sorted(row.tolist()) == list(range(8 * i, 8 * i + 8))  # step i = positions [8i, 8i+8)
    # Resumed at position 16 with any world size: exactly the positions after it.
    for w in (1, 2, 4):
        rest = np.concatenate([rank_positions(total, 16, batch, w, r) for r in range(w)], axis=1)
        assert sorted(rest.ravel().tolist()) == list(range(16, 32))


def _read_epoch(reader, epoch, start, world, batch):
    """{rank: [ids per step]} and the decoded images by id."""
    ids, images = {}, {}
    for r in range(world):
        ids[r] = []
        for sb in reader.batches(epoch, start, global_batch=batch, world=world, rank=r):
            ids[r].append(sb.ids.tolist())
            assert len(sb.image) == sb.decoded and sb.image.shape[1:] == (3, 16, 16)
            names = reader.sample_names(sb.ids)
            images.update({n: None for n in names})
    return ids, images


@pytest.mark.parametrize("cache", [False, True])
def test_reader_imagefolder_exact_and_resumable(ray_local, tmp_path, cache):
    written = write_imagefolder(tmp_path / "d", {"a": 9, "b": 8}, size=16)
    (tmp_path / "d" / "a" / "broken.png").write_bytes(b"not a png")  # a hole, not a shift
    cfg = DataConfig(source=str(tmp_path / "d"), resolution=16, local_shuffle_buffer=5, seed=3, decode_batch_size=2)
    info = inspect_dataset(cfg)
    reader = make_train_reader(cfg, info, cache=cache)
    assert reader.total == 18 and reader.steps_per_epoch(4) == 4
    names = reader.units.column("unit").to_pylist()
    full, _ = _read_epoch(reader, 1, 0, 2, 4)
    # The two ranks' slices are the epoch's first 16 positions, in step order.
    order = reader.order.epoch(1)
    assert [full[0][i] + full[1][i] for i in range(4)] == [order[4 * i : 4 * i + 4].tolist() for i in range(4)]
    # Resume after 2 steps with one worker: the rest of the epoch, nothing before it.
    rest, _ = _read_epoch(reader, 1, 8, 1, 4)
    assert rest[0] == [order[8:12].tolist(), order[12:16].tolist()]
    # Pixels belong to their ids; the broken file is a hole in its micro-batch only.
    seen = 0
    for sb in reader.batches(1, 0, global_batch=4, world=1, rank=0):
        ok = [n for n in reader.sample_names(sb.ids) if n != "a/broken.png"]
        assert sb.decoded == len(ok)
        for n, img in zip(ok, sb.image):
            assert np.allclose(img, expected_tensor(written[n][1]), atol=1e-6)
        seen += len(sb.ids)
    assert seen == 16 and "a/broken.png" in names


def test_reader_webdataset_sample_granular(ray_local, tmp_path):
    d = tmp_path / "wds"
    d.mkdir()
    imgs = {}
    for s in range(3):
        samples = []
        for k in range(5 + s):
            img = rand_image(100 * s + k)
            imgs[(f"shard-{s}.tar", k)] = img
            samples.append((f"s{s}k{k:02d}", "png", png_bytes(img), k % 2))
        (d / f"shard-{s}.tar").write_bytes(build_shard(samples))
    cfg = DataConfig(source=str(d), resolution=16, local_shuffle_buffer=6, seed=0)
    reader = make_train_reader(cfg, inspect_dataset(cfg))
    assert reader.total == 18
    got: Counter[str] = Counter()
    for r in range(2):
        for sb in reader.batches(0, 4, global_batch=4, world=2, rank=r):
            names = reader.sample_names(sb.ids)
            assert sb.decoded == 2
            for n, img in zip(names, sb.image):
                shard, j = n.split("#")
                assert np.allclose(img, expected_tensor(imgs[(shard, int(j))]), atol=1e-6)
            got.update(names)
    expected = reader.sample_names(reader.order.epoch(0)[4:16])
    assert got == Counter(expected) and max(got.values()) == 1


def test_train_state_position_is_global_and_reads_old_checkpoints():
    from orchestrator.train.state import TrainState

    # Written before samples_in_epoch existed: batches of the epoch x the global batch.
    assert TrainState(**{"step": 9, "samples_seen": 72, "epoch": 1, "batch_in_epoch": 2}).epoch_position(8) == 16
    assert TrainState(step=9, epoch=1, batch_in_epoch=2, samples_in_epoch=24).epoch_position(8) == 24
    assert TrainState().epoch_position(8) == 0


def test_reader_streams_an_epoch_in_chunks_of_steps(ray_local, tmp_path, monkeypatch):
    """A rank computes its ids (and streams its samples) a chunk of steps at a time, so memory
    does not grow with the epoch: two chunks give the batches of one, pixels matching ids."""
    import orchestrator.data.reader as reader_mod

    written = write_imagefolder(tmp_path / "d", {"a": 6, "b": 6}, size=16)
    cfg = DataConfig(source=str(tmp_path / "d"), resolution=16, local_shuffle_buffer=5, seed=1)
    reader = make_train_reader(cfg, inspect_dataset(cfg))  # cache=False: streamed
    whole = [sb.ids.tolist() for sb in reader.batches(0, 0, global_batch=4, world=1, rank=0)]
    monkeypatch.setattr(reader_mod, "CHUNK_SAMPLES", 8)  # 2 steps of 4 per chunk: 3 steps = 2 chunks
    chunked = list(reader.batches(0, 0, global_batch=4, world=1, rank=0))
    assert [sb.ids.tolist() for sb in chunked] == whole == reader.order.epoch(0)[:12].reshape(3, 4).tolist()
    for sb in chunked:
        for n, img in zip(reader.sample_names(sb.ids), sb.image):
            assert np.allclose(img, expected_tensor(written[n][1]), atol=1e-6)
