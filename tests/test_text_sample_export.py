"""Text models without Ray: ``raydiff sample --prompt`` from a checkpoint, the plan's text lines,
and ``raydiff export --format diffusers`` as a pipeline directory that diffusers loads and that,
run as its model card says, reproduces ``raydiff sample --prompt`` (U-Net and PixArt DiT)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from checkpoint_factory import perturbed_model, tiny_config, write_checkpoint_dir
from orchestrator.cli import main
from orchestrator.eval.generate import generate_batched
from orchestrator.eval.loading import load_checkpoint
from orchestrator.text import TextConditioner
from text_encoder_factory import make_tiny_clip

PROMPTS = ["a red circle", "a small blue triangle on the left"]
STEPS, GUIDANCE, PER = 3, 3.0, 2


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return make_tiny_clip(tmp_path_factory.mktemp("clip"))


def _text_run(tmp_path, clip_dir, name="unet-text-tiny", *extra):
    cfg = tiny_config(f"model.name={name}", f"model.text_encoder={clip_dir}", "data.captions=true",
                      f"sampling.num_steps={STEPS}", "sampling.eta=0.5", "sampling.seed=4",
                      'sampling.prompts=["a red circle","a green square","a dog"]', *extra)
    run = tmp_path / "run"
    write_checkpoint_dir(run, cfg, perturbed_model(cfg, None, seed=1), step=5, num_classes=None)
    return run, cfg


def test_sample_with_prompts_and_negative_prompt(tmp_path, clip_dir, capsys):
    run, cfg = _text_run(tmp_path, clip_dir)
    ptxt = tmp_path / "prompts.txt"
    ptxt.write_text("a green square\n\n")
    out = tmp_path / "g.png"
    assert main(["sample", "--checkpoint", str(run), "--prompt", PROMPTS[0], "--prompt", PROMPTS[1],
                 "--prompts-file", str(ptxt), "--num", str(PER), "--guidance", str(GUIDANCE), "--out", str(out),
                 "--out-dir", str(tmp_path / "pngs")]) == 0
    assert "'a small blue triangle on the left'" in capsys.readouterr().out
    assert Image.open(out).size == (2 * (PER * 18 + 2), 2 * (3 * 18 + 2))  # 3 prompts x 2 columns of 16 px
    names = sorted(p.name for p in (tmp_path / "pngs").iterdir())
    assert names[0] == "00000_a-red-circle.png" and names[-1] == "00005_a-green-square.png"
    # the grid is raydiff's guided sampler on the prompts' embeddings, seeded by sampling.seed
    ck = load_checkpoint(str(run))
    text = TextConditioner(ck.cfg.model)
    cond = text.prompts([p for p in [*PROMPTS, "a green square"] for _ in range(PER)])
    scfg = ck.cfg.sampling.model_copy(update={"guidance_scale": GUIDANCE})
    want = generate_batched(ck.model, ck.cfg, cond, 6, seed=4, scfg=scfg)
    got = np.asarray(Image.open(tmp_path / "pngs" / "00002_a-small-blue-triangle-on-the-left.png")).astype(int)
    ref = ((want[2] + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy().astype(int)
    assert np.abs(got - ref).max() <= 1
    # a negative prompt changes what guidance steers away from
    neg = tmp_path / "neg.png"
    assert main(["sample", "--checkpoint", str(run), "--prompt", PROMPTS[0], "--num", str(PER), "--guidance",
                 str(GUIDANCE), "--negative-prompt", "a dog", "--out", str(neg)]) == 0
    base = tmp_path / "base.png"
    assert main(["sample", "--checkpoint", str(run), "--prompt", PROMPTS[0], "--num", str(PER), "--guidance",
                 str(GUIDANCE), "--out", str(base)]) == 0
    assert not np.array_equal(np.asarray(Image.open(neg)), np.asarray(Image.open(base)))
    # without --prompt: the run's sampling.prompts (3 rows)
    assert main(["sample", "--checkpoint", str(run), "--out", str(tmp_path / "d.png")]) == 0
    assert Image.open(tmp_path / "d.png").size[1] == 2 * (3 * 18 + 2)


def test_prompt_errors_are_one_line(tmp_path, clip_dir, capsys):
    run, _ = _text_run(tmp_path, clip_dir)
    assert main(["sample", "--checkpoint", str(run), "--prompts-file", str(tmp_path / "missing.txt")]) == 2
    assert "--prompts-file" in capsys.readouterr().err
    cls = tmp_path / "cls"
    ccfg = tiny_config()
    write_checkpoint_dir(cls, ccfg, perturbed_model(ccfg, 10, seed=0), step=1, num_classes=10)
    assert main(["sample", "--checkpoint", str(cls), "--prompt", "a red circle"]) == 2
    assert "are for text models" in capsys.readouterr().err


def test_dry_run_plan_names_the_text_encoder(tmp_path, clip_dir, capsys):
    assert main(["train", "--dry-run", f"run.storage={tmp_path}", "model.name=unet-text-tiny",
                 f"model.text_encoder={clip_dir}", "data.captions=true", "data.resolution=16"]) == 0
    out = capsys.readouterr().out
    assert f"text encoder    : {clip_dir} (frozen" in out and "text embeddings : in-worker (the data carries captions" in out
    assert main(["train", "--dry-run", "model.name=pixart-tiny", "data.captions=true"]) == 2
    assert "model.text_encoder" in capsys.readouterr().err


@pytest.mark.parametrize("name,pipeline", [("unet-text-tiny", "StableDiffusionPipeline"),
                                           ("pixart-tiny", "PixArtAlphaPipeline")])
def test_export_is_a_diffusers_pipeline_that_reproduces_raydiff_sample(tmp_path, clip_dir, name, pipeline):
    import diffusers

    run, cfg = _text_run(tmp_path, clip_dir, name)
    out = tmp_path / "export"
    assert main(["export", "--checkpoint", str(run), "--format", "diffusers", str(out)]) == 0
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == pipeline and index["text_encoder"] == ["transformers", "CLIPTextModel"]
    meta = json.loads((out / "raydiff.json").read_text())
    assert meta["pipeline"] == pipeline and meta["text_max_length"] == 16

    # The model card's recipe, run as written (OUT = the export directory).
    card = (out / "README.md").read_text()
    code = card.split("```python\n", 1)[1].split("```", 1)[0].replace('"OUT"', repr(str(out)))
    code = code.replace('prompts = ["a red circle"]', f"prompts = {[p for p in PROMPTS for _ in range(PER)]!r}")
    scope: dict = {}
    exec(code, scope)  # noqa: S102 - the model card's example is the thing under test
    assert isinstance(scope["pipe"], getattr(diffusers, pipeline))
    theirs = scope["images"].permute(0, 2, 3, 1).numpy().astype(int)

    png = tmp_path / "pngs"
    assert main(["sample", "--checkpoint", str(run), "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--num", str(PER),
                 "--precision", "fp32", "--out-dir", str(png)]) == 0
    ours = np.stack([np.asarray(Image.open(f)) for f in sorted(png.iterdir())]).astype(int)
    assert ours.std() > 10  # not a constant image
    # The same images up to float32 rounding (batch order of the guidance halves differs),
    # which can flip a pixel's 8-bit rounding.
    assert np.abs(ours - theirs).max() <= 1 and (ours != theirs).mean() < 0.01


def test_report_writes_the_prompts_beside_the_grid_rows(tmp_path, clip_dir):
    import io

    from orchestrator.config import config_to_yaml
    from orchestrator.report import _grid_prompts, write_report
    from orchestrator.storage import RunDir

    _, cfg = _text_run(tmp_path, clip_dir)
    run = tmp_path / "r"
    (run / "samples").mkdir(parents=True)
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "samples_seen": 4, "loss": 0.5, "time": 1.0}) + "\n")
    grid = Image.new("RGB", (76, 112), (200, 30, 30))  # 3 rows
    buf = io.BytesIO()
    grid.save(buf, format="PNG")
    (run / "samples" / "step_0000001.png").write_bytes(buf.getvalue())
    _, plain = write_report(str(run), out=str(tmp_path / "plain.png"))
    (run / "config.yaml").write_text(config_to_yaml(cfg))
    assert _grid_prompts(RunDir(str(run))) == ["a red circle", "a green square", "a dog"]
    _, labelled = write_report(str(run), out=str(tmp_path / "labelled.png"))
    a = np.asarray(Image.open(io.BytesIO(plain.png)).convert("L")).astype(int)
    b = np.asarray(Image.open(io.BytesIO(labelled.png)).convert("L")).astype(int)
    x0, y0, x1, y1 = labelled.boxes["samples"]
    # the prompts are drawn left of the samples panel, where the plain report has nothing
    assert (np.abs(a - b)[y0:y1, max(0, x0 - 200):x0] > 60).sum() > 50


def test_conditioner_takes_captions_or_precomputed_embeddings(tmp_path, clip_dir):
    _, cfg = _text_run(tmp_path, clip_dir)
    live = TextConditioner(cfg.model)
    caps = np.array(["a red circle", ""], dtype=object)
    from_text = live.batch({"text": caps})
    assert torch.equal(from_text.hidden_states[1], live.null().null_hidden)  # "" = the empty prompt
    # precomputed (raydiff data encode): float16 storage, int mask, already on the device as tensors
    pre = {"text_embedding": torch.from_numpy(from_text.hidden_states.numpy().astype(np.float16)),
           "text_mask": torch.from_numpy(from_text.mask.numpy().astype(np.int8))}
    frozen = TextConditioner(cfg.model, prompts=["a dog"], keep_encoder=False)
    assert frozen.encoder is None
    got = frozen.batch(pre)
    torch.testing.assert_close(got.hidden_states, from_text.hidden_states, atol=2e-3, rtol=2e-3)
    assert torch.equal(got.mask, from_text.mask) and torch.equal(got.null_hidden, from_text.null_hidden)
    assert frozen.prompts(["a dog"]).batch_size == 1  # grid prompts were encoded before the encoder was freed
    with pytest.raises(RuntimeError, match="precomputed"):
        frozen.batch({"text": caps})
    with pytest.raises(ValueError, match="data.captions=true"):
        live.batch({"label": np.zeros(2)})


@pytest.mark.parametrize("name", ["pixart-tiny", "unet-text-tiny"])
def test_latent_text_export_bundles_the_dataset_vae(tmp_path, clip_dir, name):
    """A latent text model (8x8x4 latents of a tiny 2x VAE): the pipeline decodes with the VAE
    recorded in the dataset's latents.json, and the card reproduces `raydiff sample --prompt`."""
    from diffusers import AutoencoderKL

    from orchestrator.data.formats.latents import LATENTS_MANIFEST
    from orchestrator.data.vae import resolve_vae

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                        layers_per_block=1, norm_num_groups=8, sample_size=16)
    vae.save_pretrained(tmp_path / "vae")
    data = tmp_path / "latents"
    data.mkdir()
    # A manifest of an (empty) encoded dataset: only its VAE and scaling factor are read here.
    (data / LATENTS_MANIFEST).write_text(json.dumps({
        "format": "latents", "version": 1, "shape": [4, 8, 8], "dtype": "float32", "scaling_factor": 0.5,
        "num_samples": 0, "shards": [],
        "vae": {"path": str(tmp_path / "vae"), "config_sha256": resolve_vae(str(tmp_path / "vae")).config_sha256}}))
    run, _ = _text_run(tmp_path, clip_dir, name, f"data.source={data}", "data.format=latents", "data.resolution=8")
    out = tmp_path / "export"
    assert main(["export", "--checkpoint", str(run), str(out)]) == 0
    assert json.loads((out / "model_index.json").read_text())["vae"] == ["diffusers", "AutoencoderKL"]
    assert json.loads((out / "vae" / "config.json").read_text())["scaling_factor"] == 0.5
    card = (out / "README.md").read_text()
    code = card.split("```python\n", 1)[1].split("```", 1)[0].replace('"OUT"', repr(str(out)))
    code = code.replace('prompts = ["a red circle"]', f"prompts = {[p for p in PROMPTS for _ in range(PER)]!r}")
    scope: dict = {}
    exec(code, scope)  # noqa: S102 - the model card's example is the thing under test
    theirs = scope["images"].permute(0, 2, 3, 1).numpy().astype(int)
    assert theirs.shape == (4, 16, 16, 3)

    png = tmp_path / "pngs"
    assert main(["sample", "--checkpoint", str(run), "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--num", str(PER),
                 "--precision", "fp32", "--out-dir", str(png)]) == 0
    ours = np.stack([np.asarray(Image.open(f)) for f in sorted(png.iterdir())]).astype(int)
    assert ours.std() > 1
    assert np.abs(ours - theirs).max() <= 1 and (ours != theirs).mean() < 0.02


def test_plan_says_precomputed_when_the_dataset_stores_embeddings(tmp_path, clip_dir):
    from orchestrator.config import load_config
    from orchestrator.plan import make_plan

    data = tmp_path / "encoded"
    data.mkdir()
    common = ["model.name=pixart-tiny", f"model.text_encoder={clip_dir}", "data.captions=true",
              f"data.source={data}", "data.format=parquet", "scaling.device=cpu"]
    plan = make_plan(load_config(None, common))
    assert (plan.text_encoder, plan.text_embeddings) == (str(clip_dir), "in-worker")
    # what `raydiff data encode --text-encoder` writes beside Parquet shards
    (data / "embeddings.json").write_text(json.dumps({"format": "parquet", "text": {
        "encoder": str(clip_dir), "hidden_size": 32, "shape": [16, 32]}}))
    plan = make_plan(load_config(None, common))
    assert plan.text_embeddings == "precomputed" and "no encoder runs in the training step" in plan.text_reason
    assert make_plan(load_config(None, ["scaling.device=cpu"])).text_embeddings is None
