"""Fine-tuning a Stable-Diffusion-style pipeline (model.pretrained at a directory with unet/
(UNet2DConditionModel), scheduler/, text_encoder/ + tokenizer/, optionally vae/), without Ray:
what the pipeline fixes (text encoder included), the first step computing with the loaded U-Net
and text encoder, LoRA training only the adapters, and the export back (merged pipeline, and
adapters that diffusers' ``load_lora_weights`` loads) reproducing ``raydiff sample``.

The pipeline is tiny and random: a 2-layer CLIP text encoder with a word-level tokenizer
(text_encoder_factory.py) and a small UNet2DConditionModel with seeded, perturbed weights (so
that a network that was not really loaded computes something else)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

from test_finetune import _perturb
from text_encoder_factory import make_tiny_clip

HIDDEN = 32  # the tiny CLIP's hidden size = the U-Net's cross_attention_dim


def write_sd_pipeline(root: Path, *, vae: bool = False) -> Path:
    """A pixel-space (or, with ``vae``, latent) Stable Diffusion pipeline directory written by
    StableDiffusionPipeline.save_pretrained: model_index.json, unet/, scheduler/, text_encoder/,
    tokenizer/ (and vae/)."""
    from transformers import AutoTokenizer, CLIPTextModel

    clip = make_tiny_clip(root.parent / f"{root.name}-clip", hidden_size=HIDDEN)
    torch.manual_seed(0)
    channels = 4 if vae else 3
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=channels, out_channels=channels, block_out_channels=(32, 48), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        norm_num_groups=8, attention_head_dim=8, cross_attention_dim=HIDDEN)
    _perturb(unet, 1)
    autoencoder = None
    if vae:
        from diffusers import AutoencoderKL

        autoencoder = AutoencoderKL(block_out_channels=(8,), norm_num_groups=8, latent_channels=4)
    pipe = StableDiffusionPipeline(
        vae=autoencoder, text_encoder=CLIPTextModel.from_pretrained(clip), tokenizer=AutoTokenizer.from_pretrained(clip),
        unet=unet, scheduler=DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type="epsilon",
                                clip_sample=False, steps_offset=1),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def sd_pipe(tmp_path_factory):
    return write_sd_pipeline(tmp_path_factory.mktemp("sd") / "pipe")


CAPTIONS = ["a red circle", "a small blue square", "", "a dog on the left"]


def _cfg(pipe: Path, *extra: str):
    from orchestrator.config import load_config

    return load_config(None, [f"model.pretrained={pipe}", "scaling.device=cpu", "scaling.num_workers=1",
                              "optim.batch_size=4", "precision.dtype=fp32", "precision.zero_stage=0",
                              "diffusion.label_dropout=0.5", *extra])


def test_pipeline_fixes_its_keys_and_text_encoder(sd_pipe, tmp_path, capsys):
    from orchestrator.cli import main
    from orchestrator.config import ConfigError, load_config

    cfg = load_config(None, [f"model.pretrained={sd_pipe}"])
    m, d = cfg.model, cfg.data
    assert (m.text_encoder, d.captions, d.conditional, d.channels, d.resolution) == (str(sd_pipe), True, False, 3, 16)
    assert m.text_conditioned and not load_config(None, []).model.text_conditioned
    # The same directory written another way is no contradiction; another encoder is.
    rel = load_config(None, [f"model.pretrained={sd_pipe}", f"model.text_encoder={sd_pipe}/../{sd_pipe.name}"])
    assert Path(rel.model.text_encoder).resolve() == sd_pipe.resolve()
    other = make_tiny_clip(tmp_path / "other", hidden_size=HIDDEN)
    with pytest.raises(ConfigError, match=r"model.text_encoder=.*other contradicts model.pretrained=.*Fix: drop "
                                          r"model.text_encoder"):
        load_config(None, [f"model.pretrained={sd_pipe}", f"model.text_encoder={other}"])
    with pytest.raises(ConfigError, match="data.captions=false contradicts"):
        load_config(None, [f"model.pretrained={sd_pipe}", "data.captions=false"])

    # The dry-run plan names what came from the pipeline, text encoder included.
    assert main(["train", "--dry-run", f"run.storage={tmp_path}", f"model.pretrained={sd_pipe}",
                 "model.lora.rank=4"]) == 0
    out = capsys.readouterr().out
    assert f"network         : UNet2DConditionModel from {sd_pipe}/unet (model.pretrained)" in out
    assert f"from pretrained: model.text_encoder={sd_pipe} ({sd_pipe}/text_encoder + tokenizer)" in out
    assert "from pretrained: data.captions=true" in out and "from pretrained: diffusion.prediction=eps" in out
    assert f"text encoder    : {sd_pipe} (frozen" in out
    # Attention in 4 transformer blocks (down and 2 up at 32 channels, middle at 48) of C channels: self-
    # attention's q, k, v, out are C->C, rank 4 x (C + C) each; cross-attention's q and out too, its k, v
    # 32 (text width)->C: 4 x [4 x 2C + 2 x (32 + C)] + ... = 56C + 256 per block: 3 x 2048 + 2944.
    assert "parameters      : 9,088 trainable of" in out


def test_pipeline_with_a_vae_needs_latents_and_odd_pipelines_are_refused(tmp_path):
    from orchestrator.builders import build_denoiser
    from orchestrator.config import ConfigError, load_config

    pipe = write_sd_pipeline(tmp_path / "latent", vae=True)
    with pytest.raises(ConfigError, match=r"has a VAE .*data.format=auto.*raydiff data encode SRC OUT --vae .*/vae"):
        load_config(None, [f"model.pretrained={pipe}"])
    cfg = load_config(None, [f"model.pretrained={pipe}", "data.format=latents"])
    assert cfg.data.channels == 4 and cfg.model.text_encoder == str(pipe)

    bare = tmp_path / "bare"  # a U-Net and scheduler without the text encoder
    (bare / "unet").mkdir(parents=True)
    for f in (pipe / "unet").iterdir():
        (bare / "unet" / f.name).write_bytes(f.read_bytes())
    with pytest.raises(ConfigError, match="without text_encoder/ \\+ tokenizer/ folders. Fix: set model.text_encoder"):
        load_config(None, [f"model.pretrained={bare}", "data.format=latents"])
    wide = make_tiny_clip(tmp_path / "wide", hidden_size=48)
    cfg = load_config(None, [f"model.pretrained={bare}", "data.format=latents", f"model.text_encoder={wide}"])
    with torch.device("meta"), pytest.raises(ConfigError, match=r"hidden size 48 but .* width 32 \(cross_attention_dim\)"):
        build_denoiser(cfg.model, cfg.data, None, weights=False)

    conf = json.loads((bare / "unet" / "config.json").read_text())
    conf["addition_embed_type"] = "text_time"  # SDXL's added conditioning
    (bare / "unet" / "config.json").write_text(json.dumps(conf))
    with pytest.raises(ConfigError, match="addition_embed_type='text_time'.*SDXL"):
        load_config(None, [f"model.pretrained={bare}", "data.format=latents", f"model.text_encoder={wide}"])


@pytest.mark.parametrize("lora", [False, True])
def test_first_step_loss_is_the_loaded_pipeline_s_loss(sd_pipe, lora):
    """TrainStep's first loss equals diffusers' own U-Net and prompt encoding (the pipeline's
    ``encode_prompt``; the empty prompt for dropped captions) on the same batch, noise and
    timesteps: the U-Net and the text encoder were loaded (LoRA's B starts at zero). With LoRA only
    the adapters train: the step leaves every pretrained weight as it was."""
    from model.conditioning import TextEmbeddings
    from orchestrator.bench.step import init_single_process_group, make_batches
    from orchestrator.plan import make_plan
    from orchestrator.train.step import TrainStep

    init_single_process_group(torch.device("cpu"))
    cfg = _cfg(sd_pipe, *(["model.lora.rank=4"] if lora else []))
    batch = {**make_batches(cfg.data, 4, 1, torch.device("cpu"))[0], "text": CAPTIONS}
    ts = TrainStep(cfg, make_plan(cfg), None, device=torch.device("cpu"))
    module = ts.engine.module
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert set(ts.ema.shadow_params) == trainable
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    got = ts.step(batch, 0).loss.detach()

    pipe = StableDiffusionPipeline.from_pretrained(sd_pipe, vae=None, safety_checker=None)
    with torch.no_grad():
        hidden = pipe.encode_prompt(CAPTIONS, "cpu", 1, False)[0]
        null = pipe.encode_prompt([""], "cpu", 1, False)[0][0]
    ones = torch.ones(hidden.shape[:2], dtype=torch.bool)
    cond = TextEmbeddings(hidden, ones, null, ones[0])
    g = ts.generator(0)
    x0 = ts._flip(batch["image"], g)
    unet = pipe.unet.train()
    expected = ts.objective.training_losses(lambda x, t, c: unet(x, t, encoder_hidden_states=c.hidden_states).sample,
                                            x0, cond, generator=g).loss.detach()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)

    changed = {n for n, p in module.named_parameters() if not torch.equal(p.detach(), before[n])}
    if lora:
        assert trainable and all(".lora_" in n for n in trainable)
        assert changed and changed <= trainable  # the frozen U-Net is untouched
    else:
        assert trainable == set(before) and len(changed) > len(before) // 2


def _dir_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.rglob("*") if f.is_file())


def test_lora_checkpoint_is_over_10x_smaller_than_a_full_one(sd_pipe, tmp_path):
    """What the checkpointer writes (write_checkpoint: DeepSpeed's model and optimizer states and the
    EMA) for a LoRA run holds the adapters only."""
    from orchestrator.bench.step import init_single_process_group
    from orchestrator.plan import make_plan
    from orchestrator.train.checkpoint.files import write_checkpoint
    from orchestrator.train.state import TrainState
    from orchestrator.train.step import TrainStep

    init_single_process_group(torch.device("cpu"))
    sizes = {}
    for name, extra in (("full", []), ("lora", ["model.lora.rank=4"])):
        cfg = _cfg(sd_pipe, *extra)
        ts = TrainStep(cfg, make_plan(cfg), None, device=torch.device("cpu"))
        write_checkpoint(tmp_path / name, engine=ts.engine, ema=ts.ema, state=TrainState(), cfg=cfg, num_classes=None,
                         rank=0)
        sizes[name] = _dir_bytes(tmp_path / name)
    assert sizes["full"] >= 10 * sizes["lora"], sizes


def test_lora_export_merged_and_adapters_reproduce_raydiff_sample(sd_pipe, tmp_path, capsys):
    """A LoRA checkpoint on the pipeline exports (a) the pipeline with the adapters merged and (b)
    the adapters in diffusers' LoRA format; each, loaded as its model card says (b: the pretrained
    pipeline + ``load_lora_weights``), gives the images of ``raydiff sample --prompt``."""
    import numpy as np
    from PIL import Image

    from checkpoint_factory import write_checkpoint_dir
    from model.conditioning import TextEmbeddings
    from orchestrator.builders import build_denoiser
    from orchestrator.cli import main
    from orchestrator.config import load_config
    from orchestrator.eval.loading import load_checkpoint

    cfg = load_config(None, [f"model.pretrained={sd_pipe}", "model.lora.rank=4", "model.lora.alpha=8",
                             "sampling.num_steps=3", "sampling.eta=0.5", "sampling.seed=4", "sampling.guidance_scale=3"])
    torch.manual_seed(0)
    model = build_denoiser(cfg.model, cfg.data, None)
    _perturb(model, 3, only_trainable=True)  # adapters away from B = 0
    run = tmp_path / "run"
    write_checkpoint_dir(run, cfg, model.eval(), step=5, num_classes=None)
    for how in ("merged", "adapters"):
        assert main(["export", "--checkpoint", str(run), "--lora", how, str(tmp_path / how)]) == 0
    assert "load_lora_weights" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "adapters").iterdir()) == \
        ["README.md", "pytorch_lora_weights.safetensors", "raydiff.json", "scheduler"]
    assert json.loads((tmp_path / "merged" / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"

    # The adapters, loaded by diffusers onto the pretrained U-Net, compute raydiff's network.
    ck = load_checkpoint(str(run))
    pipe = StableDiffusionPipeline.from_pretrained(sd_pipe, vae=None, safety_checker=None)
    x, t = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([3, 700])
    with torch.no_grad():
        hidden = pipe.encode_prompt(CAPTIONS[:2], "cpu", 1, False)[0]
        base = pipe.unet(x, t, encoder_hidden_states=hidden).sample
        pipe.load_lora_weights(tmp_path / "adapters")
        ones = torch.ones(hidden.shape[:2], dtype=torch.bool)
        ours = ck.model(x, t, TextEmbeddings(hidden, ones, hidden[0], ones[0]))
        assert (ours - base).abs().max() > 1e-3  # the adapters change the function
        torch.testing.assert_close(pipe.unet(x, t, encoder_hidden_states=hidden).sample, ours, rtol=1e-4, atol=1e-5)
        unet = UNet2DConditionModel.from_pretrained(sd_pipe / "unet")  # the U-Net's own loader (PeftAdapterMixin)
        unet.load_lora_adapter(tmp_path / "adapters", prefix="unet", weight_name="pytorch_lora_weights.safetensors")
        torch.testing.assert_close(unet(x, t, encoder_hidden_states=hidden).sample, ours, rtol=1e-4, atol=1e-5)

    png = tmp_path / "pngs"
    assert main(["sample", "--checkpoint", str(run), "--prompt", "a red circle", "--num", "2", "--precision", "fp32",
                 "--out-dir", str(png)]) == 0
    ours = np.stack([np.asarray(Image.open(f)) for f in sorted(png.iterdir())]).astype(int)
    assert ours.std() > 10
    for how in ("merged", "adapters"):
        out = tmp_path / how
        card = (out / "README.md").read_text()
        assert ("load_lora_weights" in card) == (how == "adapters")
        code = card.split("```python\n", 1)[1].split("```", 1)[0].replace('"OUT"', repr(str(out)))
        code = code.replace('prompts = ["a red circle"]', 'prompts = ["a red circle"] * 2')
        scope: dict = {}
        exec(code, scope)  # noqa: S102 - the model card's example is the thing under test
        theirs = scope["images"].permute(0, 2, 3, 1).numpy().astype(int)
        # float32 rounding (batch order of the guidance halves differs) can flip a pixel's 8-bit rounding.
        assert np.abs(ours - theirs).max() <= 1 and (ours != theirs).mean() < 0.01, how


@pytest.mark.slow
def test_lora_fine_tuning_of_a_pipeline_on_ray(ray_local, sd_pipe, tmp_path, monkeypatch):
    """On Ray: LoRA on the pipeline's U-Net trains on the captioned built-in demo (the worker
    encodes captions with the pipeline's text encoder), its checkpoints hold adapters only, and the
    adapters export loads in diffusers. (LoRA over 2 workers, ZeRO-sharded: test_finetune_e2e.)"""
    from orchestrator.cli import main
    from orchestrator.config import load_config
    from orchestrator.train.driver import run_training

    monkeypatch.setenv("RAYDIFF_CACHE_DIR", str(tmp_path / "cache"))
    cfg = load_config(None, [f"run.storage={tmp_path / 'runs'}", "run.name=sd-lora", f"model.pretrained={sd_pipe}",
                             "model.lora.rank=4", "data.builtin_images_per_class=4", "optim.batch_size=8",
                             "optim.steps=2", "optim.lr=1e-2", "checkpoint.every_steps=2", "logging.progress=false",
                             "sampling.every_steps=1000", "sampling.num_steps=2", "run.evaluate=false",
                             "run.max_failures=0", "scaling.num_workers=1"])
    assert run_training(cfg).final_step == 2
    ck = tmp_path / "runs" / "sd-lora" / "checkpoint_00000002"
    ema = torch.load(ck / "ema.pt", weights_only=True)["shadow_params"]
    assert ema and all(".lora_" in n for n in ema)
    assert max(float(t.abs().max()) for n, t in ema.items() if "lora_B" in n) > 0  # the adapters trained
    out = tmp_path / "adapters"
    assert main(["export", "--checkpoint", str(tmp_path / "runs" / "sd-lora"), "--lora", "adapters", str(out)]) == 0
    pipe = StableDiffusionPipeline.from_pretrained(sd_pipe, vae=None, safety_checker=None)
    pipe.load_lora_weights(out)
    assert any("lora_" in n for n, _ in pipe.unet.named_parameters())
