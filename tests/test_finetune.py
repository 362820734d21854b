"""Fine-tuning from a pretrained diffusers directory (model.pretrained, model/pretrained.py), fully or
with LoRA adapters (model.lora.*), without Ray: what the directory fixes in the config, the first
training step computing with the loaded weights, adapters-only EMA, and the export back (merged
network and PEFT adapters) reproducing raydiff's model and `raydiff sample`.

The pretrained directories are tiny random networks written by ``save_pretrained`` with seeded,
perturbed weights, so that a network that was not really loaded computes something else."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, DiTTransformer2DModel, UNet2DModel

from checkpoint_factory import write_checkpoint_dir
from model.conditioning import ClassLabels, class_conditioning
from orchestrator.builders import build_denoiser
from orchestrator.cli import main
from orchestrator.config import ConfigError, load_config
from orchestrator.data.demo import DEMO_CLASS_NAMES
from orchestrator.eval.generate import generate_batched
from orchestrator.eval.loading import load_checkpoint
from orchestrator.plan import make_plan
from test_export import _diffusers_only_sampling

NUM_CLASSES = len(DEMO_CLASS_NAMES)


@torch.no_grad()
def _perturb(module: torch.nn.Module, seed: int, only_trainable: bool = False) -> None:
    # Fresh diffusers layers output near-constant values (zero-initialised projections): move them.
    g = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        if p.requires_grad or not only_trainable:
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def write_unet_pipeline(root: Path, *, prediction: str = "epsilon", classes: int | None = NUM_CLASSES) -> Path:
    """A class-conditional UNet2DModel (raydiff's null-class layout: classes + 1 embedding rows)
    with a linear-schedule DDIMScheduler, as a pipeline folder (unet/, scheduler/)."""
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(32, 48), layers_per_block=1,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                       norm_num_groups=8, attention_head_dim=16, num_class_embeds=None if classes is None else classes + 1)
    _perturb(unet, 1)
    unet.save_pretrained(root / "unet")
    DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type=prediction).save_pretrained(
        root / "scheduler")
    return root


def write_dit(root: Path) -> Path:
    """A bare class-conditional DiT model folder (no scheduler), as facebook/DiT's transformer/."""
    torch.manual_seed(0)
    dit = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=3, out_channels=3,
                                num_layers=2, sample_size=16, patch_size=2, num_embeds_ada_norm=NUM_CLASSES)
    _perturb(dit, 2)
    dit.save_pretrained(root)
    return root


def test_pretrained_directory_fixes_its_keys_and_refuses_contradictions(tmp_path):
    pipe = write_unet_pipeline(tmp_path / "pipe", prediction="v_prediction")
    cfg = load_config(None, [f"model.pretrained={pipe}", "model.lora.rank=4", "scaling.device=cpu"])
    d, m = cfg.diffusion, cfg.data
    assert (d.prediction, d.schedule, d.num_timesteps, m.resolution, m.channels, m.conditional) == \
        ("v", "linear", 1000, 16, 3, True)
    text = make_plan(cfg).describe(cfg, "runs/x")
    assert "from pretrained: diffusion.prediction=v" in text and "prediction_type" in text
    assert "sampling.sampler=ddim (the directory's DDIMScheduler is not used" in text
    # 4 attention blocks (down, mid, 2 up) x 4 projections x rank 4 x (48 in + 48 out), counted by hand:
    assert "6,144 trainable of 471,955" in text
    with torch.device("meta"):
        net = build_denoiser(cfg.model, cfg.data, NUM_CLASSES, weights=False)
    assert sum(p.numel() for p in net.parameters() if p.requires_grad) == 6144
    assert all(".lora_" in n for n, p in net.named_parameters() if p.requires_grad)

    with pytest.raises(ConfigError) as e:  # switching the prediction type is refused, naming both values
        load_config(None, [f"model.pretrained={pipe}", "diffusion.prediction=eps"])
    assert "diffusion.prediction=eps" in str(e.value) and "diffusion.prediction=v " in str(e.value)
    with pytest.raises(ConfigError, match="data.resolution=32 contradicts .* sample_size"):
        load_config(None, [f"model.pretrained={pipe}", "data.resolution=32"])
    assert load_config(None, [f"model.pretrained={pipe}", "diffusion.prediction=v"]).diffusion.prediction == "v"

    # A bare DiT folder: network and classes from it, the schedule from the config.
    dit = load_config(None, [f"model.pretrained={write_dit(tmp_path / 'dit')}", "diffusion.prediction=eps"])
    assert dit.data.resolution == 16 and dit.diffusion.prediction == "eps"
    assert "no scheduler in the directory" in make_plan(dit).describe(dit, "runs/x")


def test_bad_pretrained_and_lora_settings_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="model.lora.rank=4 without model.pretrained"):
        load_config(None, ["model.lora.rank=4"])
    with pytest.raises(ConfigError, match="is not a directory"):
        load_config(None, [f"model.pretrained={tmp_path / 'missing'}"])
    pipe = write_unet_pipeline(tmp_path / "pipe")
    cfg = load_config(None, [f"model.pretrained={pipe}", "model.lora.rank=2", "model.lora.targets=[to_x]"])
    with pytest.raises(ConfigError, match=r"to_x.*linear layers.*'to_q'"):
        build_denoiser(cfg.model, cfg.data, NUM_CLASSES, weights=False)
    cfg = load_config(None, [f"model.pretrained={pipe}"])
    with pytest.raises(ConfigError, match="10-class model but the data gives 3 classes"):
        build_denoiser(cfg.model, cfg.data, 3, weights=False)


@pytest.mark.parametrize("case", ["unet-full", "dit-lora"])
def test_first_step_loss_is_the_loaded_model_s_loss(case, tmp_path):
    """The loss of TrainStep's first step equals a plain forward of the network loaded with
    diffusers' from_pretrained on the same batch, noise and timesteps: the weights were loaded
    (LoRA's B starts at zero, so the adapted network computes the pretrained one)."""
    from orchestrator.bench.step import init_single_process_group, make_batches
    from orchestrator.train.step import TrainStep

    init_single_process_group(torch.device("cpu"))
    if case == "unet-full":
        path, cls, extra = write_unet_pipeline(tmp_path / "pipe"), UNet2DModel, []
        call = lambda net, x, t, y: net(x, t, class_labels=y).sample  # noqa: E731
        sub = path / "unet"
    else:
        path, cls, extra = write_dit(tmp_path / "dit"), DiTTransformer2DModel, ["model.lora.rank=2"]
        call = lambda net, x, t, y: net(x, timestep=t, class_labels=y).sample  # noqa: E731
        sub = path
    cfg = load_config(None, [f"model.pretrained={path}", *extra, "scaling.device=cpu", "scaling.num_workers=1",
                             "optim.batch_size=4", "precision.dtype=fp32", "precision.zero_stage=0",
                             "diffusion.label_dropout=0.3"])
    batch = make_batches(cfg.data, 4, NUM_CLASSES, torch.device("cpu"))[0]
    ts = TrainStep(cfg, make_plan(cfg), NUM_CLASSES, device=torch.device("cpu"))
    trainable = sum(p.numel() for p in ts.engine.module.parameters() if p.requires_grad)
    assert set(ts.ema.shadow_params) == {n for n, p in ts.engine.module.named_parameters() if p.requires_grad}
    got = ts.step(batch, 0).loss.detach()

    plain = cls.from_pretrained(sub).eval()
    for m in plain.modules():
        if hasattr(m, "dropout_prob"):
            m.dropout_prob = 0.0
    g = ts.generator(0)
    x0 = ts._flip(batch["image"], g)
    cond = class_conditioning(batch["label"], NUM_CLASSES)
    expected = ts.objective.training_losses(lambda x, t, c: call(plain, x, t, c.labels if c is not None else
                                                                 torch.full((x.shape[0],), NUM_CLASSES)),
                                            x0, cond, generator=g).loss.detach()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    total = sum(p.numel() for p in plain.parameters())
    assert (trainable == total) == (case == "unet-full")


def test_lora_checkpoint_exports_merged_and_adapters_that_reproduce_raydiff(tmp_path, capsys):
    from peft import PeftModel

    pipe = write_unet_pipeline(tmp_path / "pipe")
    cfg = load_config(None, [f"model.pretrained={pipe}", "model.lora.rank=4", "sampling.num_steps=3",
                             "sampling.eta=0.5", "sampling.guidance_scale=2"])
    torch.manual_seed(0)
    model = build_denoiser(cfg.model, cfg.data, NUM_CLASSES)
    _perturb(model, 3, only_trainable=True)  # adapters away from B = 0
    run = tmp_path / "run"
    write_checkpoint_dir(run, cfg, model.eval(), step=5, num_classes=NUM_CLASSES, class_names=DEMO_CLASS_NAMES)
    ema = torch.load(run / "checkpoint_00000005" / "ema.pt", weights_only=True)
    assert all(".lora_" in n for n in ema["shadow_params"]) and len(ema["shadow_params"]) == 32

    ck = load_checkpoint(str(run))
    for how in ("merged", "adapters"):
        assert main(["export", "--checkpoint", str(run), "--lora", how, str(tmp_path / how)]) == 0
    assert json.loads((tmp_path / "adapters" / "raydiff.json").read_text())["lora"]["export"] == "adapters"
    card = (tmp_path / "adapters" / "README.md").read_text()
    assert "PeftModel.from_pretrained" in card and "--lora merged" in card
    merged = UNet2DModel.from_pretrained(tmp_path / "merged" / "unet").eval()
    adapted = PeftModel.from_pretrained(UNet2DModel.from_pretrained(pipe / "unet"), tmp_path / "adapters" / "unet")
    adapted = adapted.merge_and_unload().eval()
    x, t = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([3, 200, 600, 999])
    labels = torch.tensor([0, 5, 9, NUM_CLASSES])
    with torch.no_grad():
        ours = ck.model(x, t, ClassLabels(labels, NUM_CLASSES))
        base = UNet2DModel.from_pretrained(pipe / "unet")(x, t, class_labels=labels).sample
        assert (ours - base).abs().max() > 1e-3  # the adapters change the function
        for net in (merged, adapted):
            torch.testing.assert_close(net(x, t, class_labels=labels).sample, ours, rtol=1e-4, atol=1e-5)

    # A diffusers-only sampling loop on the merged export reproduces raydiff's sampler.
    gen = torch.tensor([1, 4, 7])
    expected = _diffusers_only_sampling(merged, "unet", DDIMScheduler.from_pretrained(tmp_path / "merged" / "scheduler"),
                                        gen, NUM_CLASSES, shape=(3, 3, 16, 16), seed=4, eta=0.5, guidance=2.0, steps=3)
    # fp32 like the diffusers loop (sampling.precision auto may pick bf16 on this CPU).
    scfg = ck.cfg.sampling.model_copy(update={"precision": "fp32"})
    got = generate_batched(ck.model, ck.cfg, ClassLabels(gen, NUM_CLASSES), 3, seed=4, scfg=scfg)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)

    # The merged export is a pretrained directory again: the network and schedule round-trip.
    again = load_config(None, [f"model.pretrained={tmp_path / 'merged'}"])
    assert (again.diffusion.prediction, again.data.conditional) == (cfg.diffusion.prediction, True)
    full_cfg = load_config(None, [f"model.pretrained={pipe}"])
    write_checkpoint_dir(tmp_path / "full", full_cfg, build_denoiser(full_cfg.model, full_cfg.data, NUM_CLASSES),
                         step=1, num_classes=NUM_CLASSES)
    assert main(["export", "--checkpoint", str(tmp_path / "full"), "--lora", "adapters", str(tmp_path / "x")]) == 2
    assert "has no LoRA adapters" in capsys.readouterr().err


def test_tune_can_search_lora_rank_and_lr(tmp_path):
    from orchestrator.tune.space import check_entry

    base = {"model": {"pretrained": str(write_unet_pipeline(tmp_path / "pipe")), "lora": {"rank": 4}}}
    check_entry("model.lora.rank", {"choice": [2, 4, 8]}, base)
    check_entry("optim.lr", {"loguniform": [1e-4, 1e-2]}, base)
    with pytest.raises(ValueError, match="model.lora.rank"):
        check_entry("model.lora.rank", {"choice": [-1]}, base)


def test_model_unet_and_dit_sections_set_diffusers_arguments(tmp_path):
    cfg = load_config(None, ["model.name=unet-tiny", "data.resolution=16",
                             "model.unet={block_out_channels: [16, 24], norm_num_groups: 4, attention_head_dim: 8}"])
    net = build_denoiser(cfg.model, cfg.data, None)
    assert tuple(net.backbone.config.block_out_channels) == (16, 24) and net.backbone.config.norm_num_groups == 4
    assert net.backbone.config.layers_per_block == 1  # the rest from unet-tiny
    dit = load_config(None, ["model.name=dit-s2", "data.resolution=16",
                             "model.dit={num_layers: 1, num_attention_heads: 2, attention_head_dim: 8, patch_size: 4}"])
    net = build_denoiser(dit.model, dit.data, 3)
    assert len(net.backbone.transformer_blocks) == 1 and net.backbone.config.patch_size == 4
    assert net(torch.randn(2, 3, 16, 16), torch.tensor([1, 2]), ClassLabels(torch.tensor([0, 3]), 3)).shape == (2, 3, 16, 16)

    with pytest.raises(ConfigError, match=r"unknown argument\(s\) \['channels'\]. Allowed: .*block_out_channels"):
        load_config(None, ["model.name=unet-tiny", "model.unet={channels: 3}"])
    with pytest.raises(ConfigError, match="model.unet .* model.name=dit-s2"):
        load_config(None, ["model.name=dit-s2", "model.unet={layers_per_block: 2}"])
    with pytest.raises(ConfigError, match="in_channels"):  # set by raydiff from the data: not allowed
        load_config(None, ["model.name=dit-s2", "model.dit={in_channels: 4}"])
    pipe = write_unet_pipeline(tmp_path / "pipe")
    with pytest.raises(ConfigError, match="model.unet with model.pretrained"):
        load_config(None, [f"model.pretrained={pipe}", "model.unet={layers_per_block: 2}"])
    bad = load_config(None, ["model.name=unet-tiny", "model.unet={block_out_channels: [16, 32, 64]}"])
    with pytest.raises(ConfigError, match="diffusers cannot build unet-tiny"):
        build_denoiser(bad.model, bad.data, None)


def test_a_training_worker_imports_only_what_its_run_uses():
    """diffusers imports PEFT whenever it is installed; a Ray Train worker of a run without LoRA
    keeps it out (1.6 of its 2.5 CPU-s of network-code imports), builds and runs its network, and
    a LoRA run's worker imports it as before. A class-conditional network from scratch also keeps
    out diffusers' transformers integration (transformers' modeling code), transformers' package and
    accelerate; a text model's worker keeps them. Its ZeRO engine leaves TorchInductor out (1-1.5
    CPU-s). Fresh processes: pytest's has everything loaded."""
    from fresh_python import run_fresh_python

    code = """
import sys
from orchestrator.config import load_config
from orchestrator.train.launch import import_training_loop
cfg = load_config(None, []).model_dump()
cfg['model']['lora']['rank'] = {rank}  # a LoRA run's config (needs model.pretrained, not read here)
cfg['model']['name'] = {name!r}
import_training_loop(cfg)
from diffusers.utils import import_utils
integrated = import_utils.is_transformers_available()
if {rank} or {name!r} != 'unet-tiny':
    print('peft' in sys.modules, integrated)
    raise SystemExit
from model.conditioning import class_conditioning
from model.registry import build_model
import torch
net = build_model('unet-tiny', in_channels=3, image_size=16, num_classes=10)
net(torch.randn(2, 3, 16, 16), torch.tensor([1, 2]), class_conditioning(torch.tensor([0, 1]), 10)).sum().backward()
print('peft' in sys.modules, integrated, 'transformers.modeling_utils' in sys.modules)
print('accelerate' in sys.modules, sys.modules.get('transformers', 'never imported'))
import os
os.environ['DS_ACCELERATOR'] = 'cpu'  # as a worker's environment has it (train/launch.py worker_env_vars)
import deepspeed  # the engine's library, imported where the engine is built: fine without them
try:
    import transformers
except ImportError:
    print('transformers unimportable')
# The engine, ZeRO-2 (CPU's default) as a worker builds it, and a step: no TorchInductor (its
# import is DeepSpeed's Muon kernels' torch.compile, deferred to their first call:
# train/engine.py), which a Muon step would still compile.
from orchestrator.bench.step import init_single_process_group, make_batches
from orchestrator.plan import make_plan
from orchestrator.train.step import TrainStep
init_single_process_group(torch.device('cpu'))
cfg = load_config(None, ['model.name=unet-tiny', 'data.resolution=16', 'optim.batch_size=2', 'precision.dtype=bf16',
                         'precision.zero_stage=2', 'scaling.device=cpu', 'scaling.num_workers=1'])
ts = TrainStep(cfg, make_plan(cfg), 10, device=torch.device('cpu'))
ts.step(make_batches(cfg.data, 2, 10, torch.device('cpu'))[0], 0)
print(ts.engine.zero_optimization_stage(), 'torch._inductor.compile_fx' in sys.modules)
from deepspeed.runtime.zero.muon import original_muon
kernel, compiled = original_muon.zeropower_via_newtonschulz5, []
torch.compile = lambda fn: compiled.append(fn) or fn  # records what the first call compiles
g = torch.randn(8, 4)
print(compiled == [], torch.equal(kernel(g, 2), kernel.__wrapped__(g, 2)), compiled == [kernel.__wrapped__])
"""
    assert run_fresh_python(code.format(rank=0, name="unet-tiny")).splitlines() == [
        "False False False", "False None", "transformers unimportable", "2 False", "True True True"]
    assert run_fresh_python(code.format(rank=4, name="unet-tiny")) == "True True"
    assert run_fresh_python(code.format(rank=0, name="unet-text-tiny")) == "False True"
