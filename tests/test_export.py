"""``raydiff export --format diffusers``: the exported backbone loads with diffusers alone, gives
raydiff's outputs, and a sampling loop written only with diffusers (the loaded model plus
``DDIMScheduler.from_pretrained``) reproduces ``raydiff sample`` for the same seed and settings.

The checkpoints are written without Ray (tests/checkpoint_factory.py) from denoisers whose
weights were moved off their initialisation, so that outputs are not trivially constant.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DiTTransformer2DModel, UNet2DModel
from PIL import Image

from checkpoint_factory import perturbed_model, tiny_config, write_checkpoint_dir
from model.conditioning import ClassLabels
from model.schedules import make_schedule
from orchestrator.cli import main
from orchestrator.data.demo import DEMO_CLASS_NAMES
from orchestrator.eval.export import scheduler_for
from orchestrator.eval.generate import generate_batched
from orchestrator.eval.loading import load_checkpoint

CASES = {
    # eta > 0 exercises the per-step noise; DiT at 16 px is the smallest DiT config that works.
    "unet-tiny": dict(cls=UNet2DModel, sub="unet", eta=0.5, seed=11),
    "dit-s2": dict(cls=DiTTransformer2DModel, sub="transformer", eta=0.0, seed=5),
}
LABELS, PER_CLASS, STEPS, GUIDANCE = [0, 3, 7], 2, 4, 3.0


def _call(backbone, sub, x, t, labels):
    if sub == "unet":
        return backbone(x, t, class_labels=labels).sample
    return backbone(x, timestep=t, class_labels=labels).sample


@torch.no_grad()
def _diffusers_only_sampling(backbone, sub, scheduler, labels, null_class, *, shape, seed, eta, guidance, steps):
    """Classifier-free guided DDIM written against diffusers only. Noise is drawn as
    model/samplers.py does: the initial sample, then one draw per step inside scheduler.step
    (eta > 0), all from one CPU generator."""
    scheduler.set_timesteps(steps)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    null = torch.full_like(labels, null_class)
    for t in scheduler.timesteps:
        tt = torch.full((shape[0],), int(t), dtype=torch.long)
        cond, uncond = _call(backbone, sub, torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([labels, null])).chunk(2)
        out = uncond + guidance * (cond - uncond)
        x = scheduler.step(out, int(t), x, eta=eta, generator=g).prev_sample
    return x.clamp(-1, 1)


@pytest.mark.parametrize("name", list(CASES))
def test_export_loads_in_diffusers_and_reproduces_raydiff_sample(name, tmp_path):
    case = CASES[name]
    cfg = tiny_config(f"model.name={name}", f"sampling.num_steps={STEPS}")
    model = perturbed_model(cfg, 10, seed=1)
    run = tmp_path / "run"
    write_checkpoint_dir(run, cfg, model, step=7, num_classes=10, class_names=DEMO_CLASS_NAMES)
    out = tmp_path / "export"
    assert main(["export", "--checkpoint", str(run), "--format", "diffusers", str(out)]) == 0

    # 1) Plain diffusers loads it and computes what raydiff's denoiser computes, null class included.
    backbone = case["cls"].from_pretrained(out / case["sub"]).eval()
    ck = load_checkpoint(str(run))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 16, 16, generator=g)
    t = torch.tensor([0, 250, 640, 999])
    labels = torch.tensor([0, 9, 4, 10])  # 10 = the null class
    with torch.no_grad():
        ours, theirs = ck.model(x, t, ClassLabels(labels, 10)), _call(backbone, case["sub"], x, t, labels)
    assert ours.abs().mean() > 0.05  # a non-trivial function of its inputs
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)

    meta = json.loads((out / "raydiff.json").read_text())
    assert meta["class_names"] == list(DEMO_CLASS_NAMES) and meta["null_class"] == 10
    assert meta["backbone"] == case["sub"] and meta["step"] == 7 and meta["prediction"] == cfg.diffusion.prediction
    card = (out / "README.md").read_text()
    assert "07-white-x" in card and f"name: {name}" in card and "| 10 |" not in card

    # 2) A diffusers-only sampling loop reproduces `raydiff sample` with the same seed and settings.
    scheduler = DDIMScheduler.from_pretrained(out / "scheduler")
    assert scheduler.config.timestep_spacing == "trailing"
    assert scheduler.config.prediction_type == {"eps": "epsilon", "v": "v_prediction"}[cfg.diffusion.prediction]
    gen_labels = torch.tensor(LABELS).repeat_interleave(PER_CLASS)
    expected = _diffusers_only_sampling(backbone, case["sub"], scheduler, gen_labels, meta["null_class"],
                                        shape=(len(gen_labels), 3, 16, 16), seed=case["seed"], eta=case["eta"],
                                        guidance=GUIDANCE, steps=STEPS)
    # fp32: the diffusers loop above runs the network in float32 (bf16 is tested in test_sample_cli).
    scfg = ck.cfg.sampling.model_copy(update={"eta": case["eta"], "guidance_scale": GUIDANCE, "seed": case["seed"],
                                              "precision": "fp32"})
    got = generate_batched(ck.model, ck.cfg, ClassLabels(gen_labels, 10), len(gen_labels), seed=case["seed"], scfg=scfg)
    assert expected.std() > 0.1
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)

    pngs = tmp_path / "pngs"
    # Labels by index, full class name and name without the demo's index prefix.
    assert main(["sample", "--checkpoint", str(run), "--labels", "0,03-yellow-cross,white-x", "--num", str(PER_CLASS),
                 "--seed", str(case["seed"]),
                 "--eta", str(case["eta"]), "--guidance", str(GUIDANCE), "--precision", "fp32",
                 "--out-dir", str(pngs)]) == 0
    files = sorted(pngs.iterdir())
    assert [f.name for f in files][::2] == ["00000_00-red-circle.png", "00002_03-yellow-cross.png",
                                             "00004_07-white-x.png"]
    written = np.stack([np.asarray(Image.open(f)) for f in files]).astype(int)
    want = ((expected + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy().astype(int)
    # The same images up to float32 rounding, which can flip a pixel's 8-bit rounding.
    assert np.abs(written - want).max() <= 1
    assert (written != want).mean() < 0.01


def test_scheduler_config_follows_the_run(monkeypatch):
    """Cosine + v-prediction + zero terminal SNR + DDPM: the exported scheduler has the same ᾱ
    table and the same options, and scheduler_for refuses a schedule it cannot reproduce."""
    cfg = tiny_config("diffusion.schedule=cosine", "diffusion.prediction=v", "diffusion.zero_terminal_snr=true",
                      "sampling.sampler=ddpm", "sampling.spacing=leading", "sampling.clip_sample=false")
    sched = scheduler_for(cfg)
    assert isinstance(sched, DDPMScheduler)
    c = sched.config
    assert (c.beta_schedule, c.prediction_type, c.rescale_betas_zero_snr, c.timestep_spacing, c.clip_sample) == (
        "squaredcos_cap_v2", "v_prediction", True, "leading", False)
    assert isinstance(scheduler_for(tiny_config()), DDIMScheduler)

    import orchestrator.eval.export as export

    monkeypatch.setattr(export, "schedule_from_config", lambda cfg: make_schedule("linear", beta_end=0.03))
    with pytest.raises(RuntimeError, match="alphas_cumprod differ"):
        scheduler_for(tiny_config())
