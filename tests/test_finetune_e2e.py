"""Issue 21 end to end, on Ray with 2 workers: fine-tuning a pretrained diffusers pipeline with LoRA
adapters trains, is interrupted (every worker exits after step 3) and resumes from step 2 to the
same adapters and EMA as an uninterrupted run; its checkpoints hold the adapters only and are
at least 10x smaller than a full fine-tuning checkpoint of the same network; `raydiff sample` and
`raydiff export --lora adapters` (PEFT) and `--raw` work on it; it continues on 1 worker (elastic). Full fine-tuning runs the same path
as a registry network (test_exact_resume.py, test_elastic_resume.py cover its resume)."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DModel
from ray.train import WorkerGroupError

from model.conditioning import ClassLabels
from orchestrator.cli import main
from orchestrator.config import load_config
from orchestrator.eval.loading import load_checkpoint
from orchestrator.storage import RunDir
from orchestrator.train.driver import run_training
from orchestrator.train.faults import EXIT_ENV
from orchestrator.train.failure import TrainingFailed
from test_finetune import NUM_CLASSES, write_unet_pipeline

pytestmark = pytest.mark.slow

TINY = [
    "data.builtin_images_per_class=4", "optim.batch_size=8", "optim.steps=4", "optim.warmup_steps=1",
    "checkpoint.every_steps=2", "logging.every_steps=2", "logging.progress=false", "sampling.every_steps=1000",
    "sampling.num_steps=2", "sampling.per_class=1", "sampling.max_rows=2", "run.evaluate=false", "run.max_failures=0",
    "scaling.num_workers=2", "optim.lr=1e-2",
]


def _size(path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def test_lora_fine_tuning_resumes_exactly_and_checkpoints_small(ray_local, tmp_path, monkeypatch):
    monkeypatch.setenv("RAYDIFF_CACHE_DIR", str(tmp_path / "cache"))
    pipe = write_unet_pipeline(tmp_path / "pipe")
    runs = tmp_path / "runs"
    common = [f"run.storage={runs}", f"model.pretrained={pipe}", *TINY]
    lora = [*common, "model.lora.rank=4"]

    assert run_training(load_config(None, [*lora, "run.name=whole"])).final_step == 4
    monkeypatch.setenv(EXIT_ENV, "3")
    # One line naming the failure (train/failure.py), caused by Ray Train's worker-group error.
    with pytest.raises(TrainingFailed) as failed:
        run_training(load_config(None, [*lora, "run.name=cut"]))
    assert isinstance(failed.value.__cause__, WorkerGroupError)
    monkeypatch.delenv(EXIT_ENV)
    cut_cfg = load_config(None, [*lora, "run.name=cut"])
    assert run_training(cut_cfg).final_step == 4
    resumed = [e for e in RunDir.for_config(cut_cfg).events() if e["event"] == "resumed"]
    assert [e["step"] for e in resumed] == [2]

    whole, cut = runs / "whole" / "checkpoint_00000004", runs / "cut" / "checkpoint_00000004"
    ema_w = torch.load(whole / "ema.pt", weights_only=True)
    ema_c = torch.load(cut / "ema.pt", weights_only=True)
    assert set(ema_w["shadow_params"]) == set(ema_c["shadow_params"])
    assert all(".lora_" in n for n in ema_w["shadow_params"]) and len(ema_w["shadow_params"]) == 32
    for name, t in ema_w["shadow_params"].items():
        torch.testing.assert_close(ema_c["shadow_params"][name], t, rtol=0, atol=0)
    # The adapters trained (B moved off zero), and the DeepSpeed module states hold only them.
    assert max(float(t.abs().max()) for n, t in ema_w["shadow_params"].items() if "lora_B" in n) > 0
    states = torch.load(whole / "ds" / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    assert states["module"] and all(".lora_" in k for k in states["module"])

    # Elastic: the 2-worker LoRA run goes on to step 6 on 1 worker (its optimizer shards re-sharded
    # through DeepSpeed's universal checkpoint, frozen weights absent from both).
    more = load_config(None, [*lora, "run.name=whole", "optim.steps=6", "scaling.num_workers=1"])
    assert run_training(more).final_step == 6
    assert [e["step"] for e in RunDir.for_config(more).events() if e["event"] == "resumed"] == [4]

    # Full fine-tuning of the same network for the checkpoint size comparison (one worker: a
    # second adds a start-up, not a check; the LoRA checkpoint compared is the 2-worker one).
    assert run_training(load_config(None, [*common, "run.name=full", "optim.steps=2", "scaling.num_workers=1"])).final_step == 2
    full_size, lora_size = _size(runs / "full" / "checkpoint_00000002"), _size(runs / "cut" / "checkpoint_00000004")
    assert full_size >= 10 * lora_size, (full_size, lora_size)
    full = load_checkpoint(str(runs / "full"))
    base = UNet2DModel.from_pretrained(pipe / "unet")
    assert not torch.equal(full.model.backbone.conv_in.weight, base.conv_in.weight)  # every weight trained

    # The LoRA checkpoint samples, exports its adapters, and its raw DeepSpeed weights load.
    assert main(["sample", "--checkpoint", str(runs / "whole"), "--num", "2", "--steps", "2",
                 "--out", str(tmp_path / "s.png")]) == 0
    assert (tmp_path / "s.png").stat().st_size > 0
    assert main(["export", "--checkpoint", str(runs / "whole"), "--lora", "adapters", str(tmp_path / "ad")]) == 0
    from peft import PeftModel

    ck = load_checkpoint(str(runs / "whole"))
    adapted = PeftModel.from_pretrained(base, tmp_path / "ad" / "unet").merge_and_unload().eval()
    x, t, y = torch.randn(2, 3, 16, 16), torch.tensor([5, 900]), torch.tensor([1, NUM_CLASSES])
    with torch.no_grad():
        torch.testing.assert_close(adapted(x, t, class_labels=y).sample, ck.model(x, t, ClassLabels(y, NUM_CLASSES)),
                                   rtol=1e-4, atol=1e-5)
    raw = load_checkpoint(str(runs / "whole"), raw=True)
    assert sum(p.numel() for p in raw.model.parameters()) == sum(p.numel() for p in ck.model.parameters())
