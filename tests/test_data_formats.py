"""All three formats deliver the same pixels and labels; `raydiff data` commands."""

from __future__ import annotations

import io
import json
import tarfile
import threading
import time
import uuid

import boto3
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from s3_server import free_port
from test_data_helpers import collect, expected_tensor, jpeg_bytes, png_bytes, rand_image, write_imagefolder

from orchestrator.config import DataConfig
from orchestrator.cli import data as data_cli
from orchestrator.data import DataError, bad_sample_counts, build_train_dataset, inspect_dataset
from orchestrator.data.formats.webdataset import build_shard
from orchestrator.data.upload import upload
from orchestrator.storage.local_server import serve_s3

CLASSES = {"ant": 3, "bee": 2, "cow": 4}


def _expected(written) -> list[tuple[int, bytes]]:
    names = sorted(CLASSES)
    return sorted((names.index(cls), expected_tensor(img).tobytes()) for cls, img in written.values())


def _rows(cfg) -> list[tuple[int, bytes]]:
    info = inspect_dataset(cfg)
    images, labels = collect(build_train_dataset(cfg, info))
    return sorted((int(l), img.astype(np.float32).tobytes()) for img, l in zip(images, labels))


def test_three_formats_roundtrip(ray_local, s3_server, tmp_path):
    written = write_imagefolder(tmp_path / "folder", CLASSES)
    expected = _expected(written)
    names = sorted(CLASSES)

    # imagefolder
    assert _rows(DataConfig(source=str(tmp_path / "folder"), resolution=16)) == expected

    # webdataset via `raydiff data upload` to S3 (3 samples per shard -> 3 shards + manifest)
    bucket = s3_server.create_bucket(f"wds-{uuid.uuid4().hex[:8]}")
    rc = data_cli.main(["data", "upload", str(tmp_path / "folder"), f"s3://{bucket}/wds", "--shard-size", "3",
                        "--endpoint-url", s3_server.endpoint_url, "--region", "us-east-1", "--no-progress"])
    assert rc == 0
    cfg = DataConfig(source=f"s3://{bucket}/wds", resolution=16).with_storage(s3_server.s3_config())
    info = inspect_dataset(cfg)
    assert (info.format, info.num_samples, info.class_names, len(info.files)) == ("webdataset", 9, tuple(names), 3)
    assert _rows(cfg) == expected

    # parquet, labels as class names, two files
    pdir = tmp_path / "pq"
    pdir.mkdir()
    items = list(written.values())
    # part 0: plain binary column, 2 rows per row group; part 1: Hugging Face's {bytes, path} struct.
    t0 = pa.table({"img": [png_bytes(img) for _, img in items[:5]], "cls": [c for c, _ in items[:5]]})
    pq.write_table(t0, pdir / "part-0.parquet", row_group_size=2)
    t1 = pa.table({"img": [{"bytes": png_bytes(img), "path": None} for _, img in items[5:]], "cls": [c for c, _ in items[5:]]})
    pq.write_table(t1, pdir / "part-1.parquet")
    assert pq.ParquetFile(pdir / "part-0.parquet").metadata.num_row_groups == 3
    pcfg = DataConfig(source=str(pdir), resolution=16, image_column="img", label_column="cls")
    info = inspect_dataset(pcfg)
    assert (info.format, info.num_samples, info.class_names) == ("parquet", 9, tuple(names))
    assert _rows(pcfg) == expected


def test_webdataset_without_manifest_json_labels(ray_local, tmp_path, counter_name):
    root = tmp_path / "shards"
    root.mkdir()
    imgs = [rand_image(200 + i, 16) for i in range(5)]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        def add(name, data):
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))

        add("s0.png", png_bytes(imgs[0]))
        add("s0.json", json.dumps({"label": "dog"}).encode())
        add("dir/s1.jpg", jpeg_bytes(imgs[1]))
        add("dir/s1.json", json.dumps({"label": "cat"}).encode())
        add("s2.png", png_bytes(imgs[2]))  # no label
        add("s3.png", png_bytes(imgs[3]))
        add("s3.json", b"{not json")  # broken label
        add("s4.png", b"")  # empty image
        add("s4.json", json.dumps({"label": "dog"}).encode())
        add("readme.txt", b"a stray file, not a sample")
    (root / "a.tar").write_bytes(buf.getvalue())
    cfg = DataConfig(source=str(root), resolution=16)
    info = inspect_dataset(cfg)
    assert (info.format, info.num_samples, info.class_names) == ("webdataset", 5, ("cat", "dog"))
    name = counter_name("wds")
    images, labels = collect(build_train_dataset(cfg, info, counter_name=name))
    assert sorted(labels.tolist()) == [0, 1]
    assert bad_sample_counts(name) == {"missing_label": 1, "invalid_label": 1, "empty_file": 1}
    png_row = [img for img, l in zip(images, labels) if l == 1][0]
    assert np.allclose(png_row, expected_tensor(imgs[0]), atol=1e-6)


def test_upload_is_resumable_and_checksummed(s3_server, tmp_path):
    write_imagefolder(tmp_path / "folder", {"a": 4, "b": 4})
    bucket = s3_server.create_bucket(f"up-{uuid.uuid4().hex[:8]}")
    dest = f"s3://{bucket}/ds"
    s3 = s3_server.s3_config()
    out = io.StringIO()
    m1 = upload(str(tmp_path / "folder"), dest, shard_size=("samples", 3), s3cfg=s3, progress=False, out=out)
    assert "3 shards (3 uploaded, 0 already present), 8 samples, 2 classes" in out.getvalue()
    client = s3_server.client()
    # Simulate an interrupted upload: one shard lost, one replaced by garbage.
    client.delete_object(Bucket=bucket, Key="ds/shard-000001.tar")
    client.put_object(Bucket=bucket, Key="ds/shard-000002.tar", Body=b"partial")
    out = io.StringIO()
    m2 = upload(str(tmp_path / "folder"), dest, shard_size=("samples", 3), s3cfg=s3, progress=False, out=out)
    assert "(2 uploaded, 1 already present)" in out.getvalue()
    assert m1["shards"] == m2["shards"]
    manifest = json.loads(client.get_object(Bucket=bucket, Key="ds/manifest.json")["Body"].read())
    assert manifest["classes"] == ["a", "b"] and manifest["class_counts"] == {"a": 4, "b": 4}
    import hashlib

    for s in manifest["shards"]:
        body = client.get_object(Bucket=bucket, Key=f"ds/{s['name']}")["Body"].read()
        assert hashlib.sha256(body).hexdigest() == s["sha256"]


def test_shard_size_parsing():
    assert data_cli.parse_shard_size("64MB") == ("bytes", 64 << 20)
    assert data_cli.parse_shard_size("0.5kb") == ("bytes", 512)
    assert data_cli.parse_shard_size("1000") == ("samples", 1000)
    for bad in ("0", "abc", "-3MB", "MB"):
        with pytest.raises(Exception, match="shard-size"):
            data_cli.parse_shard_size(bad)


def test_ls_verify_stats(tmp_path, capsys):
    root = tmp_path / "ds"
    write_imagefolder(root, {"x": 2, "y": 1}, size=12)
    (root / "y" / "broken.png").write_bytes(b"nope")
    (root / "y" / "empty.jpg").write_bytes(b"")
    assert data_cli.main(["data", "ls", str(root)]) == 0
    out = capsys.readouterr().out
    assert "x/0.png" in out and "5 files" in out
    assert data_cli.main(["data", "verify", str(root)]) == 0
    out = capsys.readouterr().out
    assert "3 of 5 samples readable" in out and "not_an_image: 1" in out and "empty_file: 1" in out
    assert "y/broken.png (not_an_image)" in out
    assert data_cli.main(["data", "stats", str(root)]) == 0
    out = capsys.readouterr().out
    assert "5 samples, 2 with unreadable headers" in out
    assert "x: 2" in out and "y: 3" in out and "12x12 (3)" in out
    # Nothing readable: exit 1. Missing path: exit 2 with the fix.
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.png").write_bytes(b"zz")
    assert data_cli.main(["data", "verify", str(bad)]) == 1
    assert data_cli.main(["data", "verify", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_make_demo(tmp_path, capsys, ray_local):
    assert data_cli.main(["data", "make-demo", str(tmp_path / "demo"), "--images-per-class", "2", "--resolution", "16"]) == 0
    info = inspect_dataset(DataConfig(source=str(tmp_path / "demo")))
    assert info.num_samples == 20 and info.num_classes == 10


def test_serve_s3_persists_across_restarts(tmp_path):
    port = free_port()
    stop = threading.Event()
    out = io.StringIO()
    t = threading.Thread(target=serve_s3, args=(port, str(tmp_path / "store"), ["demo"]), kwargs={"stop": stop, "out": out})
    t.start()
    client = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1", aws_access_key_id="testing", aws_secret_access_key="testing")
    for _ in range(100):
        if "Ctrl-C" in out.getvalue():
            break
        time.sleep(0.1)
    assert f"http://127.0.0.1:{port}" in out.getvalue() and "AWS_ACCESS_KEY_ID=testing" in out.getvalue()
    client.put_object(Bucket="demo", Key="a/b.txt", Body=b"kept")
    # Keys that are not paths: a folder marker, and a key beside a "folder" of the same name.
    client.put_object(Bucket="demo", Key="runs/", Body=b"")
    client.put_object(Bucket="demo", Key="runs/x.txt", Body=b"x")
    client.put_object(Bucket="demo", Key="clash", Body=b"file")
    client.put_object(Bucket="demo", Key="clash/inner.txt", Body=b"inner")
    stop.set()
    t.join(30)
    assert not t.is_alive()
    assert (tmp_path / "store" / "demo" / "a" / "b.txt").read_bytes() == b"kept"
    assert (tmp_path / "store" / "demo" / "runs" / "x.txt").read_bytes() == b"x"
    assert (tmp_path / "store" / "demo" / "clash").read_bytes() == b"file"
    assert "not saved: s3://demo/clash/inner.txt" in out.getvalue()
    # A second server restores the object.
    port2 = free_port()
    stop2 = threading.Event()
    out2 = io.StringIO()
    t2 = threading.Thread(target=serve_s3, args=(port2, str(tmp_path / "store"), []), kwargs={"stop": stop2, "out": out2})
    t2.start()
    for _ in range(100):
        if "Ctrl-C" in out2.getvalue():
            break
        time.sleep(0.1)
    c2 = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port2}", region_name="us-east-1", aws_access_key_id="testing", aws_secret_access_key="testing")
    assert c2.get_object(Bucket="demo", Key="a/b.txt")["Body"].read() == b"kept"
    stop2.set()
    t2.join(30)


def test_serve_s3_without_moto_says_what_to_install(monkeypatch, capsys):
    import sys

    from orchestrator.cli import main as raydiff_main

    monkeypatch.setitem(sys.modules, "moto", None)  # as if moto were not installed
    monkeypatch.setitem(sys.modules, "moto.server", None)
    for entry in (data_cli.main, raydiff_main):
        assert entry(["data", "serve-s3", "--port", str(free_port())]) == 2
        err = capsys.readouterr().err
        assert err.splitlines() == ["raydiff: raydiff data serve-s3 needs moto: pip install 'raydiff[serve-s3]'"]


def test_parquet_missing_image_column(tmp_path):
    pq.write_table(pa.table({"pixels": [b"x"]}), tmp_path / "a.parquet")
    with pytest.raises(DataError, match="no column 'image'.*data.image_column"):
        inspect_dataset(DataConfig(source=str(tmp_path)))


def test_manifest_classes_and_out_of_range_cls(ray_local, tmp_path, counter_name):
    root = tmp_path / "m"
    root.mkdir()
    samples = [(f"{i:03d}", "png", png_bytes(rand_image(300 + i, 16)), lab) for i, lab in enumerate([0, 1, 5, None])]
    (root / "shard-000000.tar").write_bytes(build_shard(samples))
    (root / "manifest.json").write_text(json.dumps({"format": "webdataset", "classes": ["x", "y"], "shards": [{"name": "shard-000000.tar", "num_samples": 4}]}))
    cfg = DataConfig(source=str(root), resolution=16)
    info = inspect_dataset(cfg)
    assert (info.format, info.num_samples, info.class_names) == ("webdataset", 4, ("x", "y"))
    name = counter_name("m")
    _images, labels = collect(build_train_dataset(cfg, info, counter_name=name))
    assert sorted(labels.tolist()) == [0, 1]
    assert bad_sample_counts(name) == {"label_out_of_range": 1, "missing_label": 1}
    (root / "manifest.json").write_text("{broken")
    with pytest.raises(DataError, match="not a raydiff manifest"):
        inspect_dataset(cfg)
