"""Text-to-image end to end on real Ray Train + DeepSpeed (CPU): captions read from an image folder
with metadata.jsonl, encoded in the workers by a frozen tiny CLIP text encoder, 2 workers, a
checkpoint, a resume, then ``raydiff sample --prompt`` from the run."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from orchestrator.cli import main
from orchestrator.config import load_config
from orchestrator.storage import RunDir
from orchestrator.train.checkpoint.layout import list_checkpoints
from orchestrator.train.driver import run_training
from text_encoder_factory import make_tiny_clip

pytestmark = pytest.mark.slow

COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30)}


def write_captioned_folder(root, n_per_colour: int = 4, size: int = 16):
    """Solid discs of three colours on grey, captioned "a <colour> circle" in metadata.jsonl."""
    root.mkdir(parents=True)
    rows = []
    yy, xx = np.mgrid[:size, :size]
    disc = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 3) ** 2
    for colour, rgb in COLOURS.items():
        for i in range(n_per_colour):
            img = np.full((size, size, 3), 128, np.uint8)
            img[disc] = rgb
            name = f"{colour}_{i}.png"
            Image.fromarray(img).save(root / name)
            rows.append({"file_name": name, "text": f"a {colour} circle"})
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_text_run_two_workers_resumes_and_samples_with_prompts(ray_local, tmp_path, capsys):
    clip = make_tiny_clip(tmp_path / "clip")
    data = write_captioned_folder(tmp_path / "data")
    common = [f"run.storage={tmp_path / 'runs'}", "run.name=text", f"data.source={data}", "data.format=imagefolder",
              "data.captions=true", "data.resolution=16", "data.random_flip=false", "model.name=unet-text-tiny",
              f"model.text_encoder={clip}", "scaling.num_workers=2", "optim.batch_size=4", "optim.warmup_steps=1",
              "logging.every_steps=1", "logging.progress=false", "checkpoint.every_steps=2", "sampling.every_steps=2",
              "sampling.num_steps=2", "sampling.per_class=2", 'sampling.prompts=["a red circle","a blue circle"]',
              "run.evaluate=false", "run.max_failures=0"]
    cfg = load_config(None, [*common, "optim.steps=2"])
    assert run_training(cfg).final_step == 2
    rundir = RunDir.for_config(cfg)
    plan = json.loads(rundir.read_text("plan.json"))
    assert plan["text_encoder"] == str(clip) and plan["text_embeddings"] == "in-worker"
    # the frozen encoder is not part of the checkpoint: only the denoiser's weights are
    assert json.loads(rundir.read_text("checkpoint_00000002/model.json"))["num_classes"] is None
    grid = Image.open(io.BytesIO(rundir.read_bytes("samples/step_0000002.png")))
    assert grid.size == (2 * (2 * 18 + 2), 2 * (2 * 18 + 2))  # 2 prompts x 2 columns of 16 px
    assert all(r["loss"] > 0 for r in rundir.metrics())

    out = run_training(load_config(None, [*common, "optim.steps=4"]))
    assert out.final_step == 4 and [r.step for r in list_checkpoints(rundir)] == [2, 4]
    assert [e["step"] for e in rundir.events() if e["event"] == "resumed"] == [2]

    png = tmp_path / "prompts.png"
    capsys.readouterr()
    assert main(["sample", "--checkpoint", str(rundir.uri), "--prompt", "a green circle", "--prompt", "a red circle",
                 "--prompt", "a blue circle", "--num", "2", "--guidance", "3", "--out", str(png)]) == 0
    assert "'a green circle'" in capsys.readouterr().out
    assert Image.open(png).size == (2 * (2 * 18 + 2), 2 * (3 * 18 + 2))


def test_latent_text_to_image_with_precomputed_embeddings(ray_local, tmp_path, capsys):
    """Images -> VAE latents and captions -> embeddings once (`raydiff data encode` with a tiny
    VAE and the captioned demo's tiny CLIP), then a cross-attention DiT trains on them with no
    encoder in the step, and samples from prompts through the VAE."""
    import torch
    from diffusers import AutoencoderKL

    from orchestrator.data.demo_text import write_captioned_demo
    from orchestrator.data.encode import encode

    src = write_captioned_demo(tmp_path / "demo", images_per_combo=1, resolution=16)
    torch.manual_seed(0)
    AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                  layers_per_block=1, norm_num_groups=8, sample_size=16).save_pretrained(tmp_path / "vae")
    dest = tmp_path / "latents"
    manifest = encode(str(src), str(dest), vae=str(tmp_path / "vae"), text_encoder=str(src), resolution=16,
                      batch_size=8, dtype="float16", progress=False, out=io.StringIO())
    assert manifest["shape"] == [4, 8, 8] and manifest["text"]["shape"][1] == 64

    common = [f"run.storage={tmp_path / 'runs'}", "run.name=latent-text", f"data.source={dest}",
              "data.format=latents", "data.resolution=8", "data.captions=true", "data.random_flip=false",
              "model.name=pixart-tiny", f"model.text_encoder={src}", "scaling.num_workers=1", "optim.batch_size=4",
              "optim.steps=2", "optim.warmup_steps=1", "logging.progress=false", "checkpoint.every_steps=2",
              "sampling.every_steps=2", "sampling.num_steps=2", "sampling.per_class=2",
              'sampling.prompts=["a red circle"]', "run.evaluate=false", "run.max_failures=0"]
    cfg = load_config(None, common)
    assert run_training(cfg).final_step == 2
    rundir = RunDir.for_config(cfg)
    assert json.loads(rundir.read_text("plan.json"))["text_embeddings"] == "precomputed"
    # the grid is decoded by the dataset's VAE: 16 px images, 1 prompt x 2 columns
    grid = Image.open(io.BytesIO(rundir.read_bytes("samples/step_0000002.png")))
    assert grid.size == (2 * (2 * 18 + 2), 2 * (18 + 2))
    png = tmp_path / "p.png"
    assert main(["sample", "--checkpoint", str(rundir.uri), "--prompt", "a blue square", "--num", "3",
                 "--out", str(png)]) == 0
    assert Image.open(png).size == (2 * (3 * 18 + 2), 2 * (18 + 2))
