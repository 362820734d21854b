"""``raydiff sample``: checkpoint resolution (run or checkpoint directory, local or S3, --run
alias), EMA vs raw DeepSpeed weights, labels by index or class name, grids and single PNGs,
batching, the progress bar, and one-line errors with exit code 2."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from checkpoint_factory import perturbed_model, tiny_config, write_checkpoint_dir
from model.conditioning import ClassLabels
from orchestrator.cli import main
from orchestrator.data.demo import DEMO_CLASS_NAMES
from orchestrator.eval.generate import generate_batched
from orchestrator.eval.loading import load_checkpoint, parse_labels
from orchestrator.sampling import generate, grid_png, sample_grid

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def run(tmp_path):
    """A run with two checkpoints (steps 3 and 9); the latest also holds raw weights that differ
    from its EMA weights, in DeepSpeed's ZeRO-0 layout (ds/mp_rank_00_model_states.pt)."""
    cfg = tiny_config("sampling.max_rows=4")
    d = tmp_path / "run"
    write_checkpoint_dir(d, cfg, perturbed_model(cfg, 10, seed=0), step=3, num_classes=10, class_names=DEMO_CLASS_NAMES)
    write_checkpoint_dir(d, cfg, perturbed_model(cfg, 10, seed=1), step=9, num_classes=10, class_names=DEMO_CLASS_NAMES,
                         raw_model=perturbed_model(cfg, 10, seed=2))
    return d


def _png(path_or_bytes) -> np.ndarray:
    src = io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, bytes) else path_or_bytes
    return np.asarray(Image.open(src))


def test_default_sample_redraws_the_training_grid(run, tmp_path, capsys):
    out = tmp_path / "grid.png"
    assert main(["sample", "--run", str(run), "--out", str(out)]) == 0
    assert "step 9" in capsys.readouterr().out
    ck = load_checkpoint(str(run))
    # Byte for byte what the trainer writes to samples/step_*.png for this checkpoint.
    assert out.read_bytes() == sample_grid(ck.model, ck.cfg)
    # 4 rows (sampling.max_rows) x 2 columns (sampling.per_class) of 16 px + 2 px padding, upscaled 2x.
    assert Image.open(out).size == (2 * (2 * 18 + 2), 2 * (4 * 18 + 2))


def test_checkpoint_selection_by_run_directory_name_and_alias(run, tmp_path, capsys):
    first = run / "checkpoint_00000003"
    for argv, step in ([["--checkpoint", str(first)], 3], [["--run", str(run), "--checkpoint", first.name], 3],
                       [["--checkpoint", str(run)], 9]):
        assert main(["sample", *argv, "--out", str(tmp_path / "g.png")]) == 0
        assert f"step {step}," in capsys.readouterr().out


def test_labels_num_out_dir_and_settings(run, tmp_path):
    out_dir, grid = tmp_path / "pngs", tmp_path / "grid.png"
    argv = ["sample", "--checkpoint", str(run), "--labels", "red-circle,9", "--num", "3", "--seed", "4",
            "--steps", "3", "--guidance", "1.5", "--sampler", "ddim", "--eta", "0.3", "--out-dir", str(out_dir),
            "--out", str(grid)]
    assert main(argv) == 0
    names = sorted(p.name for p in out_dir.iterdir())
    assert names == [f"0000{i}_00-red-circle.png" for i in range(3)] + [f"0000{i}_09-pink-dot-pair.png" for i in range(3, 6)]
    ck = load_checkpoint(str(run))
    scfg = ck.cfg.sampling.model_copy(update={"num_steps": 3, "guidance_scale": 1.5, "eta": 0.3, "seed": 4})
    labels = ClassLabels(torch.tensor([0, 0, 0, 9, 9, 9]), 10)
    expected = generate(ck.model, ck.cfg, labels, 6, seed=4, scfg=scfg)
    # The grid (one row per label, --num columns) and the single PNGs hold exactly these images.
    assert grid.read_bytes() == grid_png(expected, 3)
    singles = np.stack([_png(out_dir / n) for n in names])
    want = ((expected + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(singles, want)


def test_raw_weights_come_from_the_deepspeed_part(run, tmp_path):
    ema, raw = load_checkpoint(str(run)), load_checkpoint(str(run), raw=True)
    expected = perturbed_model(ema.cfg, 10, seed=2).state_dict()
    assert raw.weights == "raw" and all(torch.equal(raw.model.state_dict()[k], v) for k, v in expected.items())
    assert not torch.equal(ema.model.state_dict()["backbone.conv_in.weight"], expected["backbone.conv_in.weight"])
    a, b = tmp_path / "ema.png", tmp_path / "raw.png"
    assert main(["sample", "--checkpoint", str(run), "--out", str(a)]) == 0
    assert main(["sample", "--checkpoint", str(run), "--raw", "--out", str(b)]) == 0
    assert b.read_bytes() == sample_grid(raw.model, raw.cfg) != a.read_bytes()


def test_batches_use_consecutive_seeds(run):
    ck = load_checkpoint(str(run))
    labels = ClassLabels(torch.arange(5), 10)
    got = generate_batched(ck.model, ck.cfg, labels, 5, seed=7, batch_size=2)
    parts = [generate(ck.model, ck.cfg, labels[s:s + 2], labels[s:s + 2].batch_size, seed=7 + i)
             for i, s in enumerate(range(0, 5, 2))]
    torch.testing.assert_close(got, torch.cat(parts), rtol=0, atol=0)
    assert not ck.model.training  # left in eval mode


def test_progress_bar_only_on_a_terminal(run, capsys):
    ck = load_checkpoint(str(run))
    generate_batched(ck.model, ck.cfg, ClassLabels(torch.arange(2), 10), 2, seed=0)  # captured stdout is not a TTY
    assert capsys.readouterr().err == ""
    generate_batched(ck.model, ck.cfg, ClassLabels(torch.arange(2), 10), 2, seed=0, progress=True, desc="drawing")
    assert "drawing" in capsys.readouterr().err


def test_parse_labels():
    names = DEMO_CLASS_NAMES
    assert parse_labels("0,3,7", 10, None) == [0, 3, 7]
    assert parse_labels("red-circle, 09-pink-dot-pair ,2", 10, names) == [0, 9, 2]


@pytest.mark.parametrize("argv,message", [
    (["--labels", "purple-unicorn"], "unknown class. Classes: 0=00-red-circle"),
    (["--labels", "10"], "class indices run from 0 to 9"),
    (["optim.lr=1"], "accepts only sampling.* and storage.s3.*"),
    (["--sampler", "ddpm", "--eta", "0.5"], "ancestral DDPM always has eta 1"),
    (["--steps", "0"], "--steps 0: must be a positive integer"),
    (["sampling.sampler=euler"], "sampling.sampler"),
])
def test_bad_input_exits_2_with_the_fix(run, tmp_path, capsys, argv, message):
    assert main(["sample", "--checkpoint", str(run), "--out", str(tmp_path / "x.png"), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_missing_checkpoint_and_unconditional_labels(tmp_path, capsys):
    assert main(["sample", "--checkpoint", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert "found no complete checkpoint" in err and "Fix: give a run directory" in err
    assert main(["sample"]) == 2
    assert "no checkpoint given" in capsys.readouterr().err
    cfg = tiny_config("data.conditional=false")
    write_checkpoint_dir(tmp_path / "u", cfg, perturbed_model(cfg, None, seed=0), step=1, num_classes=None)
    assert main(["sample", "--checkpoint", str(tmp_path / "u"), "--labels", "1", "--out", str(tmp_path / "u.png")]) == 2
    assert "this model is unconditional" in capsys.readouterr().err
    assert main(["sample", "--checkpoint", str(tmp_path / "u"), "--num", "3", "--out", str(tmp_path / "u.png")]) == 0
    assert Image.open(tmp_path / "u.png").size == (2 * (2 * 18 + 2), 2 * (2 * 18 + 2))  # 3 images, 2 columns


def test_sample_from_s3_with_raw_weights(run, s3_server, tmp_path, capsys):
    bucket = s3_server.create_bucket("sample-cli")
    client = s3_server.client()
    for f in run.rglob("*"):
        if f.is_file():
            client.put_object(Bucket=bucket, Key=f"runs/r/{f.relative_to(run).as_posix()}", Body=f.read_bytes())
    s3 = [f"storage.s3.endpoint_url={s3_server.endpoint_url}", f"storage.s3.region={s3_server.region}"]
    out = tmp_path / "s3.png"
    assert main(["sample", "--checkpoint", f"s3://{bucket}/runs/r/checkpoint_00000009", "--raw", "--out", str(out),
                 *s3]) == 0
    assert f"s3://{bucket}/runs/r/checkpoint_00000009 (step 9, RAW" in capsys.readouterr().out
    raw = load_checkpoint(str(run), raw=True)
    assert out.read_bytes() == sample_grid(raw.model, raw.cfg)
    # The older form (tests/test_s3_e2e.py, README): --run with key=value overrides.
    assert main(["sample", "--run", f"s3://{bucket}/runs/r", "--out", str(out), "sampling.num_steps=3", *s3]) == 0
    assert "(step 9, EMA weights, ddim 3 steps" in capsys.readouterr().out


_ZERO2_CHECKPOINT = """
import sys
from pathlib import Path
import torch
from orchestrator.bench.step import init_single_process_group
from orchestrator.config import load_config
from orchestrator.plan import make_plan
from orchestrator.train.checkpoint.files import write_checkpoint
from orchestrator.train.checkpoint.persist import write_manifest
from orchestrator.train.state import TrainState
from orchestrator.train.step import TrainStep

out = Path(sys.argv[1])
cfg = load_config(None, ["model.name=unet-tiny", "data.resolution=16", "sampling.num_steps=2", "sampling.per_class=1", "sampling.max_rows=2",
                         "precision.zero_stage=2", "precision.dtype=fp32", "scaling.num_workers=1",
                         "scaling.device=cpu", "optim.batch_size=4"])
init_single_process_group(torch.device("cpu"))
ts = TrainStep(cfg, make_plan(cfg), 10, device=torch.device("cpu"))
g = torch.Generator().manual_seed(0)
batch = {"image": torch.rand(4, 3, 16, 16, generator=g) * 2 - 1, "label": torch.randint(0, 10, (4,), generator=g)}
for i in range(2):
    ts.step(batch, i)
out.mkdir(parents=True)
write_checkpoint(out, engine=ts.engine, ema=ts.ema, state=TrainState(step=2), cfg=cfg, num_classes=10, rank=0)
write_manifest(out, rank=0, world=1, step=2)  # as persisting does: the inference commands verify it
torch.save(ts.engine.module.state_dict(), out.parent / "module.pt")
"""


@pytest.mark.slow
def test_raw_weights_of_a_real_zero2_checkpoint(tmp_path, capsys):
    """DeepSpeed ZeRO-2 (one process, gloo): --raw consolidates the optimizer shards with zero_to_fp32."""
    ckpt = tmp_path / "run" / "checkpoint_00000002"
    proc = subprocess.run([sys.executable, "-c", _ZERO2_CHECKPOINT, str(ckpt)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert any(p.name.startswith("zero_pp_rank_0") for p in (ckpt / "ds").iterdir())
    raw = load_checkpoint(str(ckpt), raw=True)
    module = torch.load(tmp_path / "run" / "module.pt", weights_only=False)
    assert all(torch.equal(raw.model.state_dict()[k], v) for k, v in module.items())
    out = tmp_path / "g.png"
    assert main(["sample", "--checkpoint", str(tmp_path / "run"), "--raw", "--out", str(out)]) == 0
    assert "step 2, RAW weights" in capsys.readouterr().out
    assert out.read_bytes() == sample_grid(raw.model, raw.cfg)


def test_sampling_precision_runs_a_copy_and_stays_close_to_float32(run):
    ck = load_checkpoint(str(run))
    before = {k: v.clone() for k, v in ck.model.state_dict().items()}
    labels = ClassLabels(torch.arange(4), 10)

    def draw(precision):
        scfg = ck.cfg.sampling.model_copy(update={"precision": precision})
        return generate(ck.model, ck.cfg, labels, 4, seed=1, scfg=scfg)

    fp32, bf16 = draw("fp32"), draw("bf16")
    # The network ran in bf16 (different numbers), on a copy: the caller's weights (an EMA's,
    # during training) keep their values and float32.
    assert not torch.equal(fp32, bf16) and bf16.dtype == torch.float32
    after = ck.model.state_dict()
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())
    # bf16 rounding (8-bit mantissa) moves pixels by a small fraction of the images' own spread.
    assert (fp32 - bf16).abs().mean() < 0.1 * fp32.std()


def test_sampling_precision_auto_follows_the_hardware(monkeypatch):
    import orchestrator.plan as plan
    from orchestrator.config import ConfigError
    from orchestrator.sampling import sample_dtype

    for native, want in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(plan, "cpu_has_bf16", lambda native=native: native)
        assert sample_dtype("auto", "cpu") == want
    assert sample_dtype("fp32", "cpu") == torch.float32 and sample_dtype("bf16", "cpu") == torch.bfloat16
    with pytest.raises(ConfigError, match="fp16.*CPU"):
        sample_dtype("fp16", "cpu")


def test_fp16_on_cpu_is_one_line_and_exit_2(run, tmp_path, capsys):
    assert main(["sample", "--checkpoint", str(run), "--device", "cpu", "--precision", "fp16",
                 "--out", str(tmp_path / "g.png")]) == 2
    err = capsys.readouterr().err
    assert "Fix: bf16, fp32 or auto" in err and "Traceback" not in err
