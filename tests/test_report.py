"""``raydiff report`` on hand-built run directories (local and S3): size, every panel drawn."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
from fresh_python import run_fresh_python
from PIL import Image

from orchestrator.cli import main
from orchestrator.config import config_to_yaml, load_config
from orchestrator.report import PANELS, render, smooth, write_report
from orchestrator.storage import JsonlLog, exists, read_bytes, write_bytes


def _records(n: int, *, fp16: bool, val: bool) -> list[dict]:
    rng = np.random.default_rng(0)
    out = []
    for s in range(1, n + 1):
        loss = 0.5 * math.exp(-s / 30) + 0.05 + 0.02 * rng.random()
        rec = {"step": s, "samples_seen": 8 * s, "epoch": s // 20, "loss": loss,
               "loss_per_t_bin": [loss * (1 + i / 3) for i in range(10)], "images_per_s": 100 + 10 * rng.random(),
               "lr": 1e-4 * min(1.0, s / 20), "loss_scale": 2.0 ** (16 - s // 25) if fp16 else 1.0,
               "grad_norm": 1 + rng.random(), "data_wait_share": 0.1, "time": float(s)}
        if fp16:
            rec["overflow_skipped_steps"] = s // 25
        if val and s % 20 == 0:
            rec["val_loss"] = 1.1 * loss
        out.append(rec)
    return out


def _grid_png() -> bytes:
    # Coloured squares on white, like a sample grid of the built-in dataset.
    img = np.full((70, 140, 3), 255, np.uint8)
    for i, colour in enumerate([(220, 30, 30), (30, 160, 40), (40, 60, 220), (230, 180, 20)]):
        img[10:60, 5 + 34 * i : 33 + 34 * i] = colour
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def _coloured_share(img: np.ndarray, box: tuple[int, int, int, int]) -> float:
    """Share of a panel's pixels that are coloured (curves, images); axes, ticks and text are grey."""
    x0, y0, x1, y1 = box
    region = img[y0 + 2 : y1 - 2, x0 + 2 : x1 - 2].astype(int)
    return float(((region.max(-1) - region.min(-1)) > 60).mean())


def _write_run(root, records: list[dict], grid: bytes | None) -> None:
    root.mkdir(parents=True)
    (root / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if grid is not None:
        (root / "samples").mkdir()
        (root / "samples" / "step_0000040.png").write_bytes(b"older grid: never read")
        (root / "samples" / "step_0000120.png").write_bytes(grid)


def test_report_of_fp16_run_fills_every_panel(tmp_path, capsys):
    run = tmp_path / "runs" / "demo"
    _write_run(run, _records(120, fp16=True, val=True), _grid_png())
    dest, report = write_report(str(run))
    assert dest == f"{run}/report.png"
    img = np.asarray(Image.open(run / "report.png").convert("RGB"))
    assert img.shape == (1200, 1500, 3)
    assert sorted(report.filled) == sorted(PANELS)
    for name, box in report.boxes.items():
        share = _coloured_share(img, box)
        assert share > 0.003, f"panel {name} looks blank ({share:.4f} coloured)"
    # The newest grid is shown: its colours appear in the samples panel.
    assert _coloured_share(img, report.boxes["samples"]) > 0.1


def test_report_of_bf16_run_without_validation_says_why_panels_are_empty(tmp_path):
    run = tmp_path / "bf16"
    _write_run(run, _records(30, fp16=False, val=False), None)
    out = tmp_path / "elsewhere" / "r.png"
    _, report = write_report(str(run), out=str(out))
    assert out.is_file() and not (run / "report.png").exists()
    assert sorted(set(PANELS) - set(report.filled)) == ["loss_scale", "samples", "val_loss"]
    img = np.asarray(Image.open(out).convert("RGB"))
    for name in report.filled:
        assert _coloured_share(img, report.boxes[name]) > 0.003, name


def test_the_report_after_training_does_not_import_torch(tmp_path):
    # `raydiff train` draws the report after training, in the driver; importing torch and the
    # network code there for a text model's row labels cost 3.7 s of every run (issue 18).
    run = tmp_path / "run"
    _write_run(run, _records(30, fp16=False, val=True), _grid_png())
    cfg = load_config(None, ["model.name=unet-text-tiny", "data.captions=true", "model.text_encoder=/some/encoder", "sampling.prompts=[a cat, a dog]",
                             "sampling.max_rows=1"])
    (run / "config.yaml").write_text(config_to_yaml(cfg))
    code = ("import sys; from orchestrator.report import _grid_prompts, write_report; from orchestrator.storage import RunDir; "
            f"write_report({str(run)!r}); print(_grid_prompts(RunDir({str(run)!r})), 'torch' in sys.modules)")
    assert run_fresh_python(code).split() == ["['a", "cat']", "False"] and (run / "report.png").is_file()


def test_report_without_metrics_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "notarun").mkdir()
    assert main(["report", str(tmp_path / "notarun")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"raydiff: no metrics.jsonl in {tmp_path}/notarun: is it a raydiff run directory?")
    assert len(err.splitlines()) == 1


def test_smoothing_is_debiased():
    assert smooth([2.0, 2.0, 2.0], 0.9) == pytest.approx([2.0, 2.0, 2.0])  # no pull towards 0 at the start
    assert smooth([0.0, 10.0], 0.5) == pytest.approx([0.0, 10.0 * 0.5 / 0.75])


def test_render_marks_empty_metrics():
    report = render([], None, title="empty")
    assert report.filled == [] and report.png.startswith(b"\x89PNG")


def test_report_of_s3_run(s3_server, capsys):
    bucket = s3_server.create_bucket("report-s3")
    s3_args = [f"storage.s3.endpoint_url={s3_server.endpoint_url}", f"storage.s3.region={s3_server.region}"]
    s3 = load_config(None, s3_args).storage.s3
    run_uri = f"s3://{bucket}/runs/r"
    # Metrics as training writes them on S3: buffered parts, and a resumed branch redoing steps 21-30.
    log = JsonlLog(run_uri, "metrics.jsonl", s3)
    for r in _records(30, fp16=True, val=True):
        log.write(r)
    log.flush()
    for r in _records(40, fp16=True, val=True)[20:]:
        log.write({**r, "loss": r["loss"] + 1.0})
    log.close()
    write_bytes(f"{run_uri}/samples/step_0000040.png", _grid_png(), s3)
    assert main(["report", run_uri, *s3_args, "--out", f"{run_uri}/custom.png"]) == 0
    assert capsys.readouterr().out.strip() == f"report written to {run_uri}/custom.png"
    assert exists(f"{run_uri}/custom.png", s3) and not exists(f"{run_uri}/report.png", s3)
    img = Image.open(io.BytesIO(read_bytes(f"{run_uri}/custom.png", s3)))
    assert img.size == (1500, 1200) and np.asarray(img).std() > 10
