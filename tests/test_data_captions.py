"""Captions (issue 20) from every format, on local disk and on the local S3 server, decoded by the
formats directly (no Ray): each decoded image carries its own caption, missing and empty ones
are dropped or kept with the empty prompt per data.missing_caption, and verify/stats report
coverage."""

from __future__ import annotations

import io
import json
import tarfile
import uuid
from pathlib import Path

import numpy as np
import torch
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_data_helpers import expected_tensor, png_bytes, rand_image, upload_dir

from orchestrator.config import ConfigError, DataConfig, load_config
from orchestrator.data import counter as counter_module
from orchestrator.data import decode as D
from orchestrator.data.check import stats, verify
from orchestrator.data.pipeline import inspect_dataset, iter_samples, training_units
from orchestrator.data.reader import TrainReader
from orchestrator.data.position import SampleOrder

N = 6


def _caption(i: int) -> str:
    return f"a picture number {i}"


def _images() -> list:
    return [rand_image(100 + i, 16) for i in range(N)]


def _decode(cfg: DataConfig, monkeypatch) -> tuple[dict[bytes, str], dict[str, int]]:
    """{image bytes: caption} of every decoded sample, and the kinds counted, via the format's
    own decode (what a Ray Data map task runs)."""
    info = inspect_dataset(cfg)
    fmt, ctx, units = training_units(cfg, info)
    batch = {n: units.column(n).to_numpy(zero_copy_only=False) for n in units.column_names}
    counts: dict[str, int] = {}

    def add(_msg, c):  # with no counter actor, a task's counts are logged: sum them instead
        for k, v in c.items():
            counts[k] = counts.get(k, 0) + v

    monkeypatch.setattr(counter_module.log, "warning", add)
    got: dict[bytes, str] = {}
    for chunk in fmt.decode(batch, ctx):
        assert set(chunk) == {"image", "label", "index", "text"}
        assert chunk["text"].dtype == object and all(type(t) is str for t in chunk["text"])
        assert (chunk["index"] >= 0).all()
        for img, text in zip(chunk["image"], chunk["text"]):
            got[img.astype(np.float32).tobytes()] = text
    return got, counts


def _want(images, captions) -> dict[bytes, str]:
    return {expected_tensor(img).tobytes(): c for img, c in zip(images, captions) if c is not None}


# ---------------------------------------------------------------------------------------------
# Writers of each layout (captions[i] None = no caption for image i, "" = an empty one)


def _folder_jsonl(root: Path, images, captions) -> None:
    (root / "img").mkdir(parents=True)
    rows = []
    for i, img in enumerate(images):
        img.save(root / "img" / f"{i}.png")
        row = {"file_name": f"img/{i}.png", "other": i}
        if captions[i] is not None:
            row["text"] = captions[i]
        rows.append(json.dumps(row))
    (root / "metadata.jsonl").write_text("\n".join(rows) + "\n")


def _folder_csv_nested(root: Path, images, captions) -> None:
    # A metadata.csv inside a sub-directory: file_name is relative to it (Hugging Face's rule).
    (root / "sub").mkdir(parents=True)
    lines = ["file_name,text"]
    for i, img in enumerate(images):
        img.save(root / "sub" / f"{i}.png")
        lines.append(f"{i}.png,\"{captions[i]}\"" if captions[i] is not None else f"{i}.png,")
    (root / "sub" / "metadata.csv").write_text("\n".join(lines) + "\n")


def _folder_txt(root: Path, images, captions) -> None:
    root.mkdir(parents=True)
    for i, img in enumerate(images):
        img.save(root / f"{i}.png")
        if captions[i] is not None:
            (root / f"{i}.txt").write_text(captions[i] + "\n")


def _tar(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def _wds(root: Path, images, captions, *, as_json: bool) -> None:
    root.mkdir(parents=True)
    for shard in range(2):
        members = []
        for i in range(shard, N, 2):
            members.append((f"{i:04d}.png", png_bytes(images[i])))
            if as_json:  # LAION-style metadata: the caption is a field (here the configured "caption")
                meta = {"key": i} if captions[i] is None else {"key": i, "caption": captions[i]}
                members.append((f"{i:04d}.json", json.dumps(meta).encode()))
            elif captions[i] is not None:
                members.append((f"{i:04d}.txt", captions[i].encode()))
        (root / f"shard-{shard}.tar").write_bytes(_tar(members))


def _parquet_hf(root: Path, images, captions) -> None:
    """The layout ``datasets.Dataset.to_parquet`` writes for an imagefolder with metadata: an
    ``image`` struct of bytes/path, a ``text`` string column, the features in the schema metadata."""
    root.mkdir(parents=True)
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table({
        "image": pa.array([{"bytes": png_bytes(img), "path": f"{i}.png"} for i, img in enumerate(images)], image_type),
        "text": pa.array(captions, pa.string()),
    })
    features = {"image": {"_type": "Image"}, "text": {"dtype": "string", "_type": "Value"}}
    table = table.replace_schema_metadata({b"huggingface": json.dumps({"info": {"features": features}}).encode()})
    pq.write_table(table.slice(0, 4), root / "train-00000-of-00002.parquet", row_group_size=2)
    pq.write_table(table.slice(4), root / "train-00001-of-00002.parquet")


def _parquet_plain(root: Path, images, captions) -> None:
    root.mkdir(parents=True)
    pq.write_table(pa.table({"image": [png_bytes(img) for img in images], "caption": pa.array(captions, pa.string())}),
                   root / "data.parquet")


LAYOUTS = {
    # name: (writer, data.caption_column, expected format)
    "metadata.jsonl": (_folder_jsonl, "text", "imagefolder"),
    "nested metadata.csv": (_folder_csv_nested, "text", "imagefolder"),
    "txt beside": (_folder_txt, "text", "imagefolder"),
    "webdataset txt": (lambda r, i, c: _wds(r, i, c, as_json=False), "text", "webdataset"),
    "webdataset json": (lambda r, i, c: _wds(r, i, c, as_json=True), "caption", "webdataset"),
    "parquet hf": (_parquet_hf, "text", "parquet"),
    "parquet column": (_parquet_plain, "caption", "parquet"),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_captions_from_every_format_local(tmp_path, monkeypatch, layout):
    write, column, fmt = LAYOUTS[layout]
    images = _images()
    captions = [_caption(i) for i in range(N)]
    write(tmp_path / "ds", images, captions)
    cfg = DataConfig(source=str(tmp_path / "ds"), resolution=16, captions=True, caption_column=column)
    assert inspect_dataset(cfg).format == fmt
    got, counts = _decode(cfg, monkeypatch)
    assert got == _want(images, captions)
    assert counts == {}


@pytest.mark.parametrize("layout", ["metadata.jsonl", "txt beside", "webdataset json", "parquet hf"])
def test_captions_from_s3(s3_server, tmp_path, monkeypatch, layout):
    write, column, fmt = LAYOUTS[layout]
    images = _images()
    captions = [_caption(i) for i in range(N)]
    write(tmp_path / "ds", images, captions)
    bucket = s3_server.create_bucket(f"cap-{uuid.uuid4().hex[:8]}")
    upload_dir(s3_server.client(), bucket, "ds", tmp_path / "ds")
    cfg = DataConfig(source=f"s3://{bucket}/ds", resolution=16, captions=True,
                     caption_column=column).with_storage(s3_server.s3_config())
    assert inspect_dataset(cfg).format == fmt
    got, counts = _decode(cfg, monkeypatch)
    assert got == _want(images, captions)
    assert counts == {}


@pytest.mark.parametrize("layout", ["metadata.jsonl", "txt beside", "webdataset txt", "webdataset json", "parquet hf"])
@pytest.mark.parametrize("policy", ["bad", "unconditional"])
def test_missing_and_empty_captions(tmp_path, monkeypatch, layout, policy):
    """Image 1 has no caption, image 3 an all-whitespace one: dropped and counted as
    missing_caption, or kept with the empty prompt and counted as uncaptioned_kept."""
    write, column, _fmt = LAYOUTS[layout]
    images = _images()
    captions = [_caption(i) for i in range(N)]
    captions[1] = None
    captions[3] = "  \n"
    if layout == "parquet hf":
        captions[5] = ""
    write(tmp_path / "ds", images, captions)
    cfg = DataConfig(source=str(tmp_path / "ds"), resolution=16, captions=True, caption_column=column,
                     missing_caption=policy)
    got, counts = _decode(cfg, monkeypatch)
    bad = [i for i, c in enumerate(captions) if c is None or not c.strip()]
    if policy == "bad":
        assert got == {expected_tensor(img).tobytes(): c for i, (img, c) in enumerate(zip(images, captions)) if i not in bad}
        assert counts == {D.MISSING_CAPTION: len(bad)}
        assert D.dropped(counts) == len(bad)
    else:
        assert got == {expected_tensor(img).tobytes(): ("" if i in bad else c) for i, (img, c) in enumerate(zip(images, captions))}
        assert counts == {D.UNCAPTIONED_KEPT: len(bad)}
        assert D.dropped(counts) == 0


def test_captions_off_reads_none(tmp_path):
    images = _images()
    _folder_jsonl(tmp_path / "ds", images, [_caption(i) for i in range(N)])
    cfg = DataConfig(source=str(tmp_path / "ds"), resolution=16)
    info = inspect_dataset(cfg)
    fmt, ctx, units = training_units(cfg, info)
    batch = {n: units.column(n).to_numpy(zero_copy_only=False) for n in units.column_names}
    chunk = next(iter(fmt.decode(batch, ctx)))
    assert "text" not in chunk and "caption" not in units.column_names
    assert all(s[3] is None for s in iter_samples(cfg, info))


def test_metadata_without_file_name_is_refused(tmp_path):
    _folder_txt(tmp_path / "ds", _images(), [None] * N)
    (tmp_path / "ds" / "metadata.jsonl").write_text('{"name": "0.png", "text": "x"}\n')
    with pytest.raises(Exception, match="file_name"):
        inspect_dataset(DataConfig(source=str(tmp_path / "ds"), resolution=16, captions=True))


def test_parquet_without_caption_column_names_the_fix(tmp_path):
    _parquet_plain(tmp_path / "ds", _images(), [_caption(i) for i in range(N)])
    with pytest.raises(Exception, match=r"data.caption_column.*columns: image, caption|columns: image, caption.*data.caption_column"):
        inspect_dataset(DataConfig(source=str(tmp_path / "ds"), resolution=16, captions=True))


def test_verify_and_stats_report_coverage(tmp_path):
    images = _images()
    captions = [_caption(i) for i in range(N)]
    captions[2] = None
    _folder_jsonl(tmp_path / "ds", images, captions)
    cfg = DataConfig(source=str(tmp_path / "ds"), resolution=16, captions=True)
    out = io.StringIO()
    good, counts, bad = verify(cfg, resolution=16, out=out)
    assert (good, counts, bad) == (N - 1, {D.MISSING_CAPTION: 1}, [("img/2.png", D.MISSING_CAPTION)])
    assert f"captions: {N - 1} of {N} samples" in out.getvalue()
    out = io.StringIO()
    res = stats(cfg, out=out)
    # "a picture number i": 4 words each.
    assert res["captions"] == {"samples": N, "captioned": N - 1, "coverage": (N - 1) / N,
                               "words": {"min": 4, "p50": 4.0, "max": 4, "mean": 4.0}}
    assert "words min/median/max 4/4/4" in out.getvalue()
    # Kept with the empty prompt: readable, counted as uncaptioned_kept.
    good, counts, _ = verify(cfg.model_copy(update={"missing_caption": "unconditional"}), resolution=16, out=io.StringIO())
    assert (good, counts) == (N, {D.UNCAPTIONED_KEPT: 1})


def test_cli_verify_captions(tmp_path, capsys):
    from orchestrator.cli import data as data_cli

    _folder_txt(tmp_path / "ds", _images(), [_caption(i) for i in range(N)])
    assert data_cli.main(["data", "verify", str(tmp_path / "ds"), "--captions", "--resolution", "16"]) == 0
    assert f"captions: {N} of {N} samples (100.0%)" in capsys.readouterr().out


def test_config_keys_validated():
    cfg = load_config(None, ["data.captions=true", "data.caption_column=caption", "data.missing_caption=unconditional"])
    assert (cfg.data.captions, cfg.data.caption_column, cfg.data.missing_caption) == (True, "caption", "unconditional")
    with pytest.raises(ConfigError, match="bad.*unconditional|unconditional.*bad"):
        load_config(None, ["data.missing_caption=skip"])


def test_reader_assembles_text_batches(tmp_path):
    """The training reader carries the captions with their images, in its exact order (the
    cached path, with decoded blocks given directly instead of object-store refs)."""
    images = _images()
    captions = [_caption(i) for i in range(N)]
    _folder_jsonl(tmp_path / "ds", images, captions)
    cfg = DataConfig(source=str(tmp_path / "ds"), resolution=16, captions=True, local_shuffle_buffer=0)
    info = inspect_dataset(cfg)
    fmt, ctx, units = training_units(cfg, info)
    batch = {n: units.column(n).to_numpy(zero_copy_only=False) for n in units.column_names}
    blocks = list(fmt.decode(batch, ctx))
    order = SampleOrder(units.column("samples").to_numpy().astype(np.int64), cfg.seed, 0)
    reader = TrainReader(cfg, fmt.name, ctx, units, order, cached=["unused"])
    where = np.full((order.total, 2), -1, np.int64)
    for b, blk in enumerate(blocks):
        where[blk["index"], 0] = b
        where[blk["index"], 1] = np.arange(len(blk["index"]))
    reader._cache_index = (blocks, where)
    by_image = _want(images, captions)
    seen = 0
    for sb in reader.batches(0, 0, global_batch=2, world=1, rank=0):
        assert sb.text.dtype == object and len(sb.text) == len(sb.image) == 2
        for img, t in zip(sb.image, sb.text):
            assert by_image[img.astype(np.float32).tobytes()] == t
            seen += 1
        assert set(sb.text_fields()) == {"text"}
    assert seen == N


# ---------------------------------------------------------------------------------------------
# The captioned demo


def test_make_demo_captions(tmp_path, capsys):
    from model.text_encoder import FrozenTextEncoder
    from orchestrator.cli import data as data_cli
    from orchestrator.data.demo_text import ALL_COMBOS, HELD_OUT, SEEN, TEXT_COLOURS, TEXT_SHAPES, prompt

    out = tmp_path / "demo"
    assert data_cli.main(["data", "make-demo", str(out), "--captions", "--images-per-class", "3", "--resolution", "16"]) == 0
    assert "model.text_encoder=" in capsys.readouterr().out
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    combos = {(r["colour"], r["shape"]) for r in rows}
    assert combos == set(SEEN) and not combos & set(HELD_OUT) and len(rows) == 3 * len(SEEN)
    assert len(HELD_OUT) == len(TEXT_COLOURS) and len(ALL_COMBOS) == len(TEXT_COLOURS) * len(TEXT_SHAPES)
    # Every word of a held-out prompt is still seen in training, with other partners.
    seen_words = {w for r in rows for w in r["text"].split()}
    for colour, shape in HELD_OUT:
        assert {colour, shape} <= seen_words
        assert not any(colour in r["text"].split() and shape in r["text"].split() for r in rows)
    # Read as any captioned image folder.
    cfg = DataConfig(source=str(out), resolution=16, captions=True)
    got = {name: str(cap) for name, _data, _label, cap in iter_samples(cfg, inspect_dataset(cfg))}
    assert got == {r["file_name"]: r["text"] for r in rows}
    # The encoder loads like any local one; its tokenizer knows every caption word (no <unk>),
    # and different prompts embed differently.
    enc = FrozenTextEncoder.from_pretrained(str(out))
    assert enc.max_length == 16
    ids = enc.tokenizer([r["text"] for r in rows])["input_ids"]
    assert all(enc.tokenizer.unk_token_id not in x for x in ids)
    emb = enc.encode([prompt(*HELD_OUT[0]), prompt(*SEEN[0]), ""])
    assert emb.hidden_states.shape == (3, 16, enc.embedding_dim)
    assert not torch.allclose(emb.hidden_states[0], emb.hidden_states[1])
    # Idempotent: a second call with the same parameters keeps what is there.
    mtime = (out / "metadata.jsonl").stat().st_mtime_ns
    assert data_cli.main(["data", "make-demo", str(out), "--captions", "--images-per-class", "3", "--resolution", "16"]) == 0
    assert (out / "metadata.jsonl").stat().st_mtime_ns == mtime


def test_builtin_captions_source(tmp_path, monkeypatch):
    from orchestrator.data.source import builtin_text_encoder, resolve_data_source

    monkeypatch.setenv("RAYDIFF_CACHE_DIR", str(tmp_path))
    data = DataConfig(captions=True, builtin_images_per_class=2, resolution=16)
    resolved = resolve_data_source(data)
    assert "builtin-text" in resolved.source and resolved.captions and resolved.format == "imagefolder"
    assert inspect_dataset(resolved).num_samples == 2 * 12
    assert builtin_text_encoder(data) == resolved.source
    with pytest.raises(ConfigError, match="data.captions=true"):
        builtin_text_encoder(DataConfig(builtin_images_per_class=2))


# ---------------------------------------------------------------------------------------------
# Precomputed text embeddings (`raydiff data encode --text-encoder`)


@pytest.mark.slow
def test_encode_text_embeddings_round_trip(ray_local, tmp_path, monkeypatch):
    """Captions encoded once by Ray Data actors, stored beside the images (Parquet) and beside VAE
    latents, read back by the formats: equal to encoding the captions directly, with the images'
    own captions; missing captions are skipped as in training."""
    from diffusers import AutoencoderKL

    from model.text_encoder import FrozenTextEncoder
    from orchestrator.data.demo_text import write_captioned_demo
    from orchestrator.data.encode import encode

    src = write_captioned_demo(tmp_path / "demo", images_per_combo=2, resolution=16)
    rows = [json.loads(line) for line in (src / "metadata.jsonl").read_text().splitlines()]
    # One caption removed: that image is skipped (data.missing_caption=bad), and counted.
    rows[0].pop("text")
    (src / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    caption_of = {r["file_name"]: r["text"] for r in rows if "text" in r}
    enc = FrozenTextEncoder.from_pretrained(str(src))

    def check(dest: str, manifest: dict) -> None:
        assert manifest["num_samples"] == len(caption_of) and manifest["bad_samples"] == {D.MISSING_CAPTION: 1}
        assert manifest["text"]["shape"] == [enc.max_length, enc.embedding_dim]
        cfg = DataConfig(source=dest, format=manifest["format"], resolution=manifest.get("shape", [0, 16])[-1],
                         channels=manifest.get("shape", [3])[0], captions=manifest["format"] == "parquet")
        got, _ = _decode_fields(cfg, monkeypatch)
        assert len(got) == len(caption_of)
        texts = [t for t, _, _ in got]
        want = enc.encode(texts)
        for (text, emb, mask), h, m in zip(got, want.hidden_states.numpy(), want.mask.numpy()):
            np.testing.assert_allclose(emb, h, atol=1e-5)
            assert (mask == m).all() and mask.dtype == bool
        assert sorted(texts) == sorted(caption_of.values())

    out = io.StringIO()
    dest = str(tmp_path / "pq")
    manifest = encode(str(src), dest, text_encoder=str(src), resolution=16, batch_size=8, dtype="float32",
                      shard_rows=10, progress=False, out=out)
    assert "caption embeddings of shape" in out.getvalue() and "data.format=parquet" in out.getvalue()
    check(dest, manifest)
    # The images stored beside the embeddings are the decoded source images, pixel for pixel,
    # each with its own caption.
    cfg_src = DataConfig(source=str(src), resolution=16, captions=True)
    want_pixels = {img.tobytes(): t for img, t in _decoded_images(cfg_src, monkeypatch)}
    got_pixels = {img.tobytes(): t for img, t in _decoded_images(DataConfig(source=dest, resolution=16, captions=True), monkeypatch)}
    assert len(want_pixels) == len(caption_of) and got_pixels == want_pixels

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                        layers_per_block=1, norm_num_groups=8, sample_size=32)
    vae.save_pretrained(tmp_path / "vae")
    dest = str(tmp_path / "lat")
    manifest = encode(str(src), dest, vae=str(tmp_path / "vae"), text_encoder=str(src), resolution=16, batch_size=8,
                      dtype="float32", shard_rows=10, progress=False, out=io.StringIO())
    check(dest, manifest)


def _decode_fields(cfg: DataConfig, monkeypatch) -> tuple[list[tuple[str, np.ndarray, np.ndarray]], dict]:
    """(caption or "", embedding, mask) per decoded sample, through the format's decode."""
    info = inspect_dataset(cfg)
    fmt, ctx, units = training_units(cfg, info)
    batch = {n: units.column(n).to_numpy(zero_copy_only=False) for n in units.column_names}
    monkeypatch.setattr(counter_module.log, "warning", lambda *_a: None)
    out = []
    for chunk in fmt.decode(batch, ctx):
        assert {"text_embedding", "text_mask"} <= set(chunk)
        texts = chunk["text"] if "text" in chunk else [None] * len(chunk["image"])
        out += list(zip(texts, chunk["text_embedding"], chunk["text_mask"]))
    if out and out[0][0] is None:  # latents: no captions handed on, find them by embedding
        return [(_caption_from_parquet(cfg, e), e, m) for _t, e, m in out], {}
    return out, {}


def _caption_from_parquet(cfg: DataConfig, emb: np.ndarray) -> str:
    import glob

    for f in sorted(glob.glob(f"{cfg.source}/part-*.parquet")):
        t = pq.read_table(f, columns=["text", "text_embedding"])
        from orchestrator.data.formats.latents import latents_of

        embs = latents_of(t.column("text_embedding"))
        for i in range(len(embs)):
            if np.array_equal(embs[i], emb):
                return t.column("text")[i].as_py()
    raise AssertionError("embedding not stored")


def _decoded_images(cfg: DataConfig, monkeypatch) -> list[tuple[np.ndarray, str]]:
    info = inspect_dataset(cfg)
    fmt, ctx, units = training_units(cfg, info)
    batch = {n: units.column(n).to_numpy(zero_copy_only=False) for n in units.column_names}
    monkeypatch.setattr(counter_module.log, "warning", lambda *_a: None)
    return [(img, t) for chunk in fmt.decode(batch, ctx) for img, t in zip(chunk["image"], chunk["text"])]
