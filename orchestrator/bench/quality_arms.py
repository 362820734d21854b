"""What ``raydiff bench quality`` compares (bench/quality.py) and how every arm is trained and
sampled (bench/quality_run.py): one training configuration (``Arm``), one way of sampling
(``SamplerSpec``) and the compute all arms share (``Setting``)."""

from __future__ import annotations

from dataclasses import dataclass

from orchestrator.config import OptimConfig
from orchestrator.plan import cpu_has_bf16


@dataclass(frozen=True)
class Arm:
    """One training configuration; the fields are raydiff's ``diffusion.*`` keys."""

    name: str
    schedule: str = "linear"
    prediction: str = "eps"
    weighting: str = "uniform"
    label_dropout: float = 0.1


@dataclass(frozen=True)
class SamplerSpec:
    """One way of sampling a trained model; the fields are raydiff's ``sampling.*`` keys."""

    name: str
    sampler: str = "ddim"
    num_steps: int = 20
    # DDIM eta; 1 is raydiff's default (sampling.eta; BENCHMARKS.md "DDIM eta").
    eta: float = 1.0
    guidance_scale: float = 1.0
    spacing: str = "trailing"
    clip_sample: bool = True
    use_clipped_model_output: bool = False


@dataclass(frozen=True)
class Setting:
    model: str = "unet-demo"
    resolution: int = 32
    images_per_class: int = 300
    steps: int = 600
    batch: int = 64
    lr: float = 1e-3
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1
    ema_decay: float = 0.999
    eval_every: int = 200
    eval_per_class: int = 20
    val_per_class: int = 10
    curve_sampler: SamplerSpec = SamplerSpec("ddim-20")
    # The final models' sampler sweep: DDIM at these step counts (the second and the last also
    # with eta = 0; guidance at 20, which must be one of them) against ancestral DDPM at ddpm_steps.
    ddim_steps: tuple[int, ...] = (10, 20, 50, 100)
    ddpm_steps: int = 1000
    seeds: tuple[int, ...] = (0,)
    # Train under bf16 autocast (the demo trains in bf16 too); None: where the CPU has native
    # bf16 (orchestrator/plan.py), 1.5x faster there, and emulated (slower) elsewhere.
    bf16: bool | None = None

    def use_bf16(self) -> bool:
        return cpu_has_bf16() if self.bf16 is None else self.bf16

    def optim(self) -> OptimConfig:
        """The optimizer section ``raydiff train`` would run with: its LR schedule (warm-up,
        cosine to ``min_lr_ratio``) is the one every arm trains with."""
        return OptimConfig(steps=self.steps, batch_size=self.batch, lr=self.lr, warmup_steps=self.warmup_steps,
                           min_lr_ratio=self.min_lr_ratio, ema_decay=self.ema_decay)


# The arms `raydiff bench quality` compares (its --arms choices).
BASE = Arm("base")
ARMS: tuple[Arm, ...] = (
    BASE,
    Arm("min-snr", weighting="min_snr"),
    Arm("p2", weighting="p2"),
    Arm("cosine", schedule="cosine"),
    Arm("v-pred", prediction="v"),
    Arm("v-cosine", prediction="v", schedule="cosine"),
    Arm("v-cosine-min-snr", prediction="v", schedule="cosine", weighting="min_snr"),
    Arm("dropout-0", label_dropout=0.0),
)
