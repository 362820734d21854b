"""Config loading, overrides, validation messages, dry run and the CLI's error path."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from orchestrator.config import ConfigError, config_to_yaml, load_config, parse_override
from orchestrator.train.driver import dry_run_text
from orchestrator.builders import lr_lambda
from orchestrator.train.engine import deepspeed_config
from orchestrator.plan import make_plan

ROOT = Path(__file__).resolve().parents[1]
# Sweep jobs (tune-*.yaml) add a tune: section; tests/test_tune_config.py validates them.
JOBS = sorted(p for p in (ROOT / "jobs").glob("*.yaml") if not p.name.startswith("tune-"))


@pytest.mark.parametrize("job", JOBS, ids=lambda p: p.name)
def test_every_job_file_validates(job):
    cfg = load_config(job)
    assert cfg.optim.batch_size % cfg.scaling.num_workers == 0


def test_overrides_are_typed_and_nested():
    cfg = load_config(None, ["optim.lr=3e-4", "precision.zero_stage=3", "data.random_flip=false",
                             "model.name=dit-s2", "storage.s3.endpoint_url=http://127.0.0.1:9000"])
    assert cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.precision.zero_stage == 3
    assert cfg.data.random_flip is False
    assert cfg.model.name == "dit-s2"
    assert cfg.storage.s3.endpoint_url == "http://127.0.0.1:9000"


def test_override_wins_over_job_file(tmp_path):
    job = tmp_path / "j.yaml"
    job.write_text(yaml.safe_dump({"optim": {"steps": 7, "lr": 0.01}}))
    cfg = load_config(job, ["optim.steps=9"])
    assert (cfg.optim.steps, cfg.optim.lr) == (9, 0.01)


@pytest.mark.parametrize(
    "override, expected",
    [
        (["optim.bogus=1"], ["optim.bogus", "unknown key", "Allowed keys here", "lr"]),
        (["nonsense.key=1"], ["nonsense", "unknown key", "optim"]),
        (["precision.zero_stage=4"], ["precision.zero_stage=4", "0, 1, 2 or 3"]),
        (["model.name=unet-huge"], ["model.name='unet-huge'", "unet-tiny", "dit-xl2"]),
        (["optim.lr=fast"], ["optim.lr='fast'", "valid number"]),
        (["optim.batch_size=63"], ["optim.batch_size=63", "scaling.num_workers=2", "62 or 64"]),
        (["diffusion.prediction=eps", "diffusion.zero_terminal_snr=true"], ["prediction=v"]),
        (["diffusion.weighting=snr"], ["'uniform', 'min_snr' or 'p2'"]),
        (["run.name=../escape"], ["run.name", "letters, digits"]),
    ],
)
def test_bad_values_name_key_value_and_choices(override, expected):
    with pytest.raises(ConfigError) as e:
        load_config(None, override)
    for fragment in expected:
        assert fragment in str(e.value)


def test_malformed_override_and_missing_file():
    with pytest.raises(ConfigError, match="key.sub=value"):
        parse_override("optim.lr")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("jobs/nope.yaml")


def test_secrets_are_masked_in_saved_config():
    cfg = load_config(None, ["storage.s3.secret_access_key=PLANTED-SECRET-123", "storage.s3.access_key_id=AKIAPLANTED"])
    text = config_to_yaml(cfg)
    assert "PLANTED-SECRET-123" not in text and "AKIAPLANTED" not in text
    assert "PLANTED-SECRET-123" not in dry_run_text(cfg)


def test_plan_on_cpu_never_uses_fp16_and_says_why():
    cfg = load_config(None, ["scaling.device=cpu"])
    plan = make_plan(cfg)
    assert plan.precision in ("bf16", "fp32")
    assert "fp16" in plan.precision_reason  # explains why fp16 was not chosen
    ds = deepspeed_config(cfg.optim, cfg.precision, plan)
    assert "fp16" not in ds
    assert ds["train_batch_size"] == cfg.optim.batch_size == plan.micro_batch_size * plan.num_workers
    assert ds["zero_optimization"]["stage"] == plan.zero_stage == 2  # auto on CPU: partitioned
    assert not plan.autocast and "torch_autocast" not in ds


def test_fp16_on_cpu_is_rejected_once_by_the_plan_with_the_fix():
    # The plan is the one place that knows the device (also when scaling.device=auto finds no GPU).
    cfg = load_config(None, ["precision.dtype=fp16", "scaling.device=cpu"])
    with pytest.raises(ConfigError) as e:
        make_plan(cfg)
    assert "fp16" in str(e.value) and "bf16" in str(e.value)


def test_plan_on_gpu_uses_fp16_with_dynamic_loss_scaling():
    # DeepSpeed's fp16 engine (needed with ZeRO partitioning): dynamic loss scaling.
    cfg = load_config(None, ["scaling.device=gpu", "precision.initial_scale_power=12", "precision.zero_stage=2"])
    plan = make_plan(cfg)
    ds = deepspeed_config(cfg.optim, cfg.precision, plan)
    assert plan.precision == "fp16" and plan.gpus_per_worker == 1 and not plan.autocast
    assert ds["fp16"]["enabled"] and ds["fp16"]["loss_scale"] == 0 and ds["fp16"]["initial_scale_power"] == 12


def test_plan_on_gpu_picks_stage_0_and_autocast_when_the_state_fits():
    cfg = load_config(None, ["scaling.device=gpu"])
    plan = make_plan(cfg)
    ds = deepspeed_config(cfg.optim, cfg.precision, plan)
    assert plan.zero_stage == 0 and plan.autocast and "fit" in plan.zero_reason
    assert ds["torch_autocast"] == {"enabled": True, "dtype": "float16"} and "fp16" not in ds
    assert ds["zero_optimization"]["stage"] == 0


def test_zero_stage_auto_follows_the_memory_rule(monkeypatch):
    from orchestrator import plan as plan_mod

    cfg = load_config(None, ["scaling.device=gpu", "model.name=dit-xl2"])
    need = plan_mod.parameter_count(cfg.model, cfg.data) * plan_mod.STATE_BYTES_PER_PARAM
    # ~717.6M parameters (the registry test's unconditional count; 10 label embeddings add ~0.3M)
    # x 16 bytes.
    assert abs(need / 16 - 717.6e6) < 1e6
    monkeypatch.setattr(plan_mod, "_gpu_bytes", lambda scaling: int(need / plan_mod.ZERO0_MEMORY_SHARE) + 1)
    assert plan_mod.resolve_zero_stage(cfg, "gpu")[0] == 0
    monkeypatch.setattr(plan_mod, "_gpu_bytes", lambda scaling: int(need / plan_mod.ZERO0_MEMORY_SHARE) - 1)
    assert plan_mod.resolve_zero_stage(cfg, "gpu")[0] == 2
    assert make_plan(cfg).autocast is False  # stage 2: DeepSpeed's engine


def test_autocast_with_zero_partitioning_is_rejected():
    with pytest.raises(ConfigError, match="zero_stage=0"):
        load_config(None, ["precision.mixed=autocast", "precision.zero_stage=2"])


def test_lr_schedule_warmup_then_cosine_to_floor():
    cfg = load_config(None, ["optim.steps=110", "optim.warmup_steps=10", "optim.min_lr_ratio=0.1"])
    f = lr_lambda(cfg.optim)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the cosine
    assert f(110) == pytest.approx(0.1)


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    code = (
        "import sys; from orchestrator.cli import main; rc = main(sys.argv[1:]); "
        "ray = sys.modules.get('ray'); "
        "print('RAY_STARTED', bool(ray is not None and ray.is_initialized())); sys.exit(rc)"
    )
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})


def test_cli_rejects_bad_config_before_starting_ray(tmp_path):
    r = _cli("train", "precision.zero_stage=4", "optim.bogus=2", f"run.storage={tmp_path}", cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert "precision.zero_stage=4" in r.stderr and "optim.bogus" in r.stderr
    assert "RAY_STARTED False" in r.stdout
    assert not any(tmp_path.iterdir())  # nothing was written


def test_cli_dry_run_prints_config_and_plan(tmp_path):
    r = _cli("train", "--dry-run", "--config", str(ROOT / "jobs/demo.yaml"), "precision.zero_stage=3",
             f"run.storage={tmp_path}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "# resolved configuration" in out and "zero_stage: 3" in out
    for fragment in ("workers", "precision", "DeepSpeed ZeRO  : stage 3", "checkpoints     : every", "steps"):
        assert fragment in out
    assert "RAY_STARTED False" in out
    resolved = yaml.safe_load(out.split("# plan")[0])
    assert resolved["precision"]["zero_stage"] == 3
    assert not any(tmp_path.iterdir())
