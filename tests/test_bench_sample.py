"""`raydiff bench sample`: both sides run the same network at the same precision, and the
table reports each time and their ratio."""

from __future__ import annotations

import json

from orchestrator.cli import main


def test_bench_sample_prints_both_sides_and_their_ratio(tmp_path, capsys):
    out = tmp_path / "r.json"
    argv = ["bench", "sample", "--model", "unet-tiny", "--classes", "2", "--per-class", "2", "--resolution", "16",
            "--channels", "3", "--steps", "2", "--precision", "bf16", "--device", "cpu", "--json", str(out)]
    assert main(argv) == 0
    text = capsys.readouterr().out
    r = json.loads(out.read_text())
    assert r["images"] == 4 and r["steps"] == 2 and r["precision"] == "bfloat16" and r["model"] == "unet-tiny"
    assert r["bare_s"] > 0 and r["raydiff_s"] > 0
    assert abs(r["ratio"] - r["raydiff_s"] / r["bare_s"]) < 1e-9
    assert "bare loop of the forward passes" in text and f"raydiff / bare: {r['ratio']:.2f}x" in text


def test_bench_sample_from_a_checkpoint(tmp_path, capsys):
    from checkpoint_factory import perturbed_model, tiny_config, write_checkpoint_dir

    cfg = tiny_config()
    run = tmp_path / "run"
    write_checkpoint_dir(run, cfg, perturbed_model(cfg, 10, seed=0), step=3, num_classes=10)
    assert main(["bench", "sample", "--checkpoint", str(run), "--per-class", "1", "--steps", "2",
                 "--precision", "fp32", "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"10 images, {cfg.model.name}, 2 steps") and "network in float32 on cpu" in text
