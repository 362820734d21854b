"""The schema of a raydiff run's configuration: one typed tree.

Loaded from ``jobs/*.yaml`` and overridden with ``key.sub=value`` arguments. Every model forbids
unknown keys, so a typo is rejected before Ray starts, with the allowed keys in the message
(the style of torchtitan's config dataclasses and Ray's release-test experiment configs).
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, PrivateAttr, SecretStr, field_validator, model_validator

from model.choices import TEXT_MODEL_NAMES, PredictionType, SamplerName, ScheduleKind, Spacing, Weighting
from orchestrator.config.base import ConfigError, _Strict
from orchestrator.config.model import LoraConfig, ModelConfig, apply_pretrained

__all__ = ["ConfigError", "LoraConfig", "ModelConfig", "_Strict"]  # defined beside, part of the tree


class S3Config(_Strict):
    """Connection settings for S3-compatible object storage (AWS, MinIO, Ceph, R2 ...).

    Credentials left unset come from the standard AWS chain (environment, profile, instance role).
    They are ``SecretStr`` so that they never appear in printed or saved configs.
    """

    endpoint_url: str | None = None
    region: str | None = None
    access_key_id: SecretStr | None = None
    secret_access_key: SecretStr | None = None
    session_token: SecretStr | None = None
    profile: str | None = None
    addressing_style: Literal["auto", "path", "virtual"] = "auto"
    max_attempts: int = Field(8, ge=1, le=50)
    connect_timeout_s: float = Field(10.0, gt=0)
    read_timeout_s: float = Field(60.0, gt=0)


class StorageConfig(_Strict):
    """Object storage, for everything a run reads or writes: the dataset, the run directory,
    checkpoints, TensorBoard logs and the lease. One section, so that a run whose data and
    checkpoints share a bucket (the common case) states its endpoint and credentials once."""

    s3: S3Config = S3Config()


class DataConfig(_Strict):
    # "builtin" writes the procedurally generated demo dataset under the run directory.
    source: str = "builtin"
    # latents (from `raydiff data encode`): channels default to 4, resolution is the latent size.
    format: Literal["auto", "imagefolder", "webdataset", "parquet", "latents"] = "auto"
    # For image folders without class sub-directories: a CSV/JSON file mapping paths to labels.
    labels_file: str | None = None
    image_column: str = "image"
    label_column: str | None = "label"
    resolution: int = Field(32, ge=8, le=1024)
    channels: Literal[1, 3, 4] = 3
    center_crop: bool = True
    random_flip: bool = True
    # Use class labels when the dataset has them; false trains an unconditional model.
    conditional: bool = True
    builtin_images_per_class: int = Field(300, ge=1)
    seed: int = 0
    # Samples per window of the epoch's seeded shuffle (orchestrator/data/position.py): it mixes
    # samples of neighbouring shards; 0 or 1 keeps each unit's samples in stored order.
    local_shuffle_buffer: int = Field(512, ge=0)
    prefetch_batches: int = Field(2, ge=0)
    # Keep decoded images in Ray's object store across epochs when they fit this budget.
    cache_max_bytes: int = Field(2 << 30, ge=0)
    decode_batch_size: int = Field(64, ge=1)
    # Images held out of training for the validation loss: whole work units (files, shards,
    # row groups) chosen with data.seed, of which the first val_images decoded images are used.
    # 0 = nothing held out.
    val_images: int = Field(0, ge=0)
    # Text-to-image (issue 20; orchestrator/data/captions.py): read one caption per sample and
    # hand it to the workers as "text". Image folders: metadata.jsonl / metadata.csv (file_name +
    # the caption column, Hugging Face's imagefolder convention) or a .txt beside each image;
    # WebDataset: the .<caption_column> or .txt member, else that field of the .json member;
    # Parquet: the caption column (Hugging Face datasets' layout included).
    captions: bool = False
    caption_column: str = Field("text", min_length=1)
    # A sample whose caption is missing or empty: "bad" drops it (counted as missing_caption),
    # "unconditional" trains it with the empty prompt "" (counted as uncaptioned_kept). Never fatal.
    missing_caption: Literal["bad", "unconditional"] = "bad"
    # The run's storage.s3 settings, set by TrainConfig (not a key of this section): the data
    # readers take this section alone, and an s3:// source needs the connection settings.
    _s3: S3Config = PrivateAttr(default_factory=S3Config)

    @property
    def s3(self) -> S3Config:
        return self._s3

    def with_storage(self, s3: S3Config) -> "DataConfig":
        """This section reading object storage through ``s3`` (for a DataConfig built alone)."""
        out = self.model_copy()
        out._s3 = s3
        return out


class DiffusionConfig(_Strict):
    # Defaults measured with `raydiff bench quality` on the built-in shapes (BENCHMARKS.md,
    # "Training choices"): v prediction (Salimans & Ho 2022) recognised far more samples than
    # eps at the same steps; cosine (Nichol & Dhariwal 2021) vs linear was within noise there,
    # and cosine is the one chosen with v, where it was never worse.
    schedule: ScheduleKind = "cosine"
    num_timesteps: int = Field(1000, ge=2, le=100_000)
    zero_terminal_snr: bool = False
    prediction: PredictionType = "v"
    # min-SNR-gamma (Hang et al. 2023): better than uniform for eps by the judges (BENCHMARKS.md);
    # for v with cosine within noise of uniform (one seed).
    weighting: Weighting = "min_snr"
    min_snr_gamma: float = Field(5.0, gt=0)
    p2_gamma: float = Field(1.0, ge=0)
    p2_k: float = Field(1.0, gt=0)
    # Classifier-free guidance training: probability of replacing a label with the null class.
    label_dropout: float = Field(0.1, ge=0, lt=1)
    loss_bins: int = Field(10, ge=1, le=1000)

    @model_validator(mode="after")
    def _zero_snr_needs_v(self) -> "DiffusionConfig":
        if self.zero_terminal_snr and self.prediction == "eps":
            raise ValueError(
                "diffusion.zero_terminal_snr=true with diffusion.prediction=eps: at SNR=0 the "
                "noise is the whole input and an eps model cannot recover x0 (Lin et al. 2023, "
                "sec. 3.2). Fix: set diffusion.prediction=v"
            )
        return self


class OptimConfig(_Strict):
    # The demo's length: 400 steps of unet-demo at batch 64 train in about 6 minutes on 2 CPU
    # cores, and their samples show the built-in shapes (shape judge 72%; BENCHMARKS.md).
    steps: int = Field(400, ge=1)
    # Global batch: split evenly over scaling.num_workers.
    batch_size: int = Field(64, ge=1)
    lr: float = Field(1e-3, gt=0, le=1)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    warmup_steps: int = Field(50, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.999, ge=0, lt=1)
    eps: float = Field(1e-8, gt=0)
    grad_clip: float = Field(1.0, ge=0)
    ema_decay: float = Field(0.999, ge=0, lt=1)
    ema_warmup: bool = True


class PrecisionConfig(_Strict):
    # auto: fp16 with dynamic loss scaling on GPU; bf16 on CPUs with bf16 units, else fp32.
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    # How fp16/bf16 is applied. "engine": DeepSpeed's fp16/bf16 engine (weights in half
    # precision, fp32 master copy in the optimizer; needed for ZeRO 1-3 memory savings).
    # "autocast": fp32 weights and torch.autocast in the forward pass (DeepSpeed's
    # torch_autocast with a GradScaler; ZeRO stage 0 only). auto: autocast where stage 0 is
    # resolved on a GPU, else engine.
    mixed: Literal["auto", "engine", "autocast"] = "auto"
    # auto: 0 on a GPU when the model's training state fits in a fraction of one GPU's memory
    # (no partitioning overhead), else 2; 2 on CPU.
    zero_stage: Literal["auto", 0, 1, 2, 3] = "auto"
    # fp16 loss scaling (DeepSpeed keys): 0 = dynamic.
    loss_scale: float = Field(0.0, ge=0)
    initial_scale_power: int = Field(16, ge=0, le=32)
    loss_scale_window: int = Field(1000, ge=1)
    hysteresis: int = Field(2, ge=1)
    min_loss_scale: float = Field(1.0, gt=0)
    # torch.compile the denoiser inside the engine (GPU only; first steps pay the compile time).
    compile: bool = False


class ScalingConfig(_Strict):
    num_workers: int = Field(2, ge=1, le=4096)
    device: Literal["auto", "cpu", "gpu"] = "auto"
    cpus_per_worker: float = Field(1.0, gt=0)
    # GPU share of each worker on GPU runs: below 1, small models share a card (a sweep's
    # trials side by side); Ray schedules by these fractions, it does not partition memory.
    gpus_per_worker: float = Field(1.0, gt=0, le=1)
    # None: local Ray on this machine. "auto" or "ray://..." joins a running cluster.
    ray_address: str | None = None
    accelerator_type: str | None = None
    # Local paths in run.storage/data.source are one filesystem mounted on every node (NFS, EFS,
    # Lustre). Without it a run spanning several nodes refuses local paths (cluster/rules.py).
    shared_filesystem: bool = False

    @field_validator("num_workers", mode="before")
    @classmethod
    def _fixed_worker_count(cls, v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            raise ValueError(
                f"a range of workers {list(v)} (elastic training) is not supported: "
                "DeepSpeed ZeRO checkpoints hold one shard per rank and resuming at another world size "
                "needs universal checkpoints. Fix: a fixed number, e.g. scaling.num_workers="
                f"{max(v) if v else 2}; after a node loss the run restarts at that size from its checkpoint"
            )
        return v


class CheckpointConfig(_Strict):
    every_steps: int = Field(200, ge=1)
    keep: int = Field(2, ge=1)


SamplePrecision = Literal["auto", "fp32", "bf16", "fp16"]


class SamplingConfig(_Strict):
    every_steps: int = Field(400, ge=1)
    sampler: SamplerName = "ddim"
    num_steps: int = Field(25, ge=1)
    # DDIM eta 1 (stochastic; with all 1000 steps and no clipping it is ancestral DDPM).
    # Deterministic DDIM (eta 0) follows the probability-flow ODE, which carries the model's and
    # the x0 clipping's errors forward; fresh noise every step corrects them (Karras et al. 2022,
    # sec. 4). Measured on an eps demo model (BENCHMARKS.md, issue 13): eta 0 gets worse with
    # more steps, eta 1 better, and eta 1 at 50 steps is at least as good as DDPM at 1000.
    eta: float = Field(1.0, ge=0)
    spacing: Spacing = "trailing"
    guidance_scale: float = Field(2.0, ge=0)
    # Clip the predicted x0 to the data range [-1, 1] at every step (DDPM/DDIM reference
    # implementations do): eps-prediction x0 estimates at high noise are far outside it and
    # unclipped DDIM then saturates.
    clip_sample: bool = True
    # DDIM: recompute eps from the clipped x0 (diffusers' use_clipped_model_output). Off by
    # default like diffusers: on the under-trained demo model it saturated backgrounds (class
    # recognition 43% vs 59% at guidance 2, measured on runs/demo at step 800).
    use_clipped_model_output: bool = False
    # Columns of the grid; one row per class (or one row for unconditional models).
    per_class: int = Field(8, ge=1, le=64)
    max_rows: int = Field(10, ge=1, le=1000)
    seed: int = 0
    # The network's precision in `raydiff sample` and `raydiff eval` (the sampler's arithmetic
    # stays float32). auto: bf16 where the hardware has it natively (CPUs with AVX512-BF16/AMX,
    # GPUs since Ampere: 2.7x faster than fp32 on this project's CPU, BENCHMARKS.md), fp16 on
    # older GPUs, fp32 elsewhere.
    precision: SamplePrecision = "auto"
    # Text models: the prompts of the training grids (one row each, per_class columns, the first
    # max_rows) and of the report; empty: one row of the empty prompt (unconditional samples).
    prompts: list[str] = Field(default_factory=list, max_length=64)
    # Text models: the unconditional half of guidance ("" = the empty prompt, as trained).
    negative_prompt: str = ""

    def grid_prompts(self) -> list[str]:
        """The rows of a text model's grid: ``prompts`` (the first ``max_rows``), or the empty
        prompt alone (unconditional samples) when none are configured. Here, not beside the
        sampler, so that the run report reads its row labels without importing torch."""
        return list(self.prompts[: self.max_rows]) or [""]


class MlflowConfig(_Strict):
    """Optional MLflow tracking (needs `pip install mlflow`); off unless enabled."""

    enabled: bool = False
    tracking_uri: str | None = None  # None: MLFLOW_TRACKING_URI, else MLflow's own local default
    experiment: str = "raydiff"


class WandbConfig(_Strict):
    """Optional Weights & Biases tracking (needs `pip install wandb`); off unless enabled."""

    enabled: bool = False
    project: str = "raydiff"
    entity: str | None = None
    mode: Literal["online", "offline"] = "online"


class LoggingConfig(_Strict):
    every_steps: int = Field(10, ge=1)
    progress: bool = True
    # Without a terminal (job logs, CI, a file) progress is a plain line every this many seconds
    # (and one per checkpoint) instead of a live bar (orchestrator/train/progress.py).
    progress_every_s: float = Field(30.0, gt=0)
    # Validation loss (EMA weights, held-out images, fixed timesteps and noise) every N steps
    # and at the end; 0 = off. Needs data.val_images > 0.
    val_every_steps: int = Field(0, ge=0)
    # Timesteps per held-out image, evenly spaced over [0, diffusion.num_timesteps).
    val_timesteps: int = Field(8, ge=1, le=1000)
    # TensorBoard event files in {run}/tensorboard (orchestrator/tracking/); on object storage
    # a new event file is uploaded every tensorboard_upload_s seconds and at checkpoints.
    tensorboard: bool = True
    tensorboard_upload_s: float = Field(120.0, gt=0)
    mlflow: MlflowConfig = MlflowConfig()
    wandb: WandbConfig = WandbConfig()


class RunConfig(_Strict):
    name: str = "demo"
    # Local directory or s3://bucket/prefix; the run lives in {storage}/{name}.
    storage: str = "runs"
    max_failures: int = Field(2, ge=0)
    # Rollbacks to the last good checkpoint after NaN/inf training (train/divergence.py).
    max_rollbacks: int = Field(3, ge=0)
    # After training, score generated samples with a classifier trained on the real data.
    evaluate: bool = True
    eval_per_class: int = Field(10, ge=1)

    @field_validator("name")
    @classmethod
    def _name_is_path_safe(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", v):
            raise ValueError(
                f"run.name={v!r} must be 1-128 characters of letters, digits, '.', '_' or '-' "
                "(it becomes a directory and an object-store prefix)"
            )
        return v


class TrainConfig(_Strict):
    run: RunConfig = RunConfig()
    storage: StorageConfig = StorageConfig()
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    diffusion: DiffusionConfig = DiffusionConfig()
    optim: OptimConfig = OptimConfig()
    precision: PrecisionConfig = PrecisionConfig()
    scaling: ScalingConfig = ScalingConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    sampling: SamplingConfig = SamplingConfig()
    logging: LoggingConfig = LoggingConfig()
    seed: int = 0

    @model_validator(mode="before")
    @classmethod
    def _latent_defaults(cls, data: Any) -> Any:  # the VAE's 4 channels; no x0 clipping to [-1, 1]
        d, s = (data.get("data"), data.get("sampling") or {}) if isinstance(data, dict) else (None, None)
        if isinstance(d, dict) and d.get("format") == "latents" and isinstance(s, dict):
            data = {**data, "data": {"channels": 4, **d}, "sampling": {"clip_sample": False, **s}}
        return data

    @model_validator(mode="before")
    @classmethod
    def _moved_keys(cls, data: Any) -> Any:
        d = data.get("data") if isinstance(data, dict) else None
        if isinstance(d, dict) and "s3" in d:
            keys = sorted(d["s3"]) if isinstance(d["s3"], dict) else []
            example = ", ".join(f"storage.s3.{k}" for k in keys) or "storage.s3.endpoint_url"
            raise ValueError(f"data.s3 moved to storage.s3 (it serves the data, run directory and checkpoints alike). "
                             f"Fix: write {example} instead of data.s3.* (in job files: a top-level storage: s3: section)")
        return data

    @model_validator(mode="after")
    def _share_storage(self) -> "TrainConfig":
        self.data._s3 = self.storage.s3
        return self

    def _text_checks(self) -> None:
        m, captions = self.model, self.data.captions
        if m.text_conditioned:
            what = f"model.pretrained={m.pretrained}" if m.pretrained is not None else f"model.name={m.name}"
            if not m.text_encoder:
                raise ValueError(f"{what} is text-conditioned and needs a frozen text encoder. Fix: set "
                                 "model.text_encoder to a local directory with a transformers CLIP/T5 text model and its "
                                 "tokenizer (e.g. the one `raydiff data make-demo --captions` writes)")
            if not captions:
                raise ValueError(f"{what} is text-conditioned and trains on captions. Fix: set "
                                 "data.captions=true (and data.caption_column if the captions are not under 'text')")
        elif m.text_encoder:
            # (data.captions alone is allowed: `raydiff data` commands read captions of any dataset.)
            raise ValueError(f"model.text_encoder is for text-conditioned models but model.name={m.name} is not one. "
                             f"Fix: set model.name to one of {', '.join(TEXT_MODEL_NAMES)}, or unset model.text_encoder")

    @model_validator(mode="after")
    def _from_pretrained(self) -> "TrainConfig":
        apply_pretrained(self)  # keys a model.pretrained directory fixes (config/model.py)
        return self

    @model_validator(mode="after")
    def _cross_checks(self) -> "TrainConfig":
        w = self.scaling.num_workers
        if self.optim.batch_size % w:
            lo = (self.optim.batch_size // w) * w or w
            raise ValueError(
                f"optim.batch_size={self.optim.batch_size} is not divisible by "
                f"scaling.num_workers={w}. Fix: set optim.batch_size={lo} or {lo + w}"
            )
        if self.precision.mixed == "autocast" and self.precision.zero_stage not in ("auto", 0):
            raise ValueError(
                f"precision.mixed=autocast with precision.zero_stage={self.precision.zero_stage}: DeepSpeed "
                "applies torch autocast with its own loss scaler only without ZeRO partitioning. Fix: set "
                "precision.zero_stage=0 (or auto), or precision.mixed=engine"
            )
        if self.logging.val_every_steps and not self.data.val_images:
            raise ValueError(
                f"logging.val_every_steps={self.logging.val_every_steps} needs held-out images. "
                "Fix: set data.val_images (e.g. 64), or logging.val_every_steps=0"
            )
        d, clip = self.data, self.sampling.clip_sample
        if (d.format == "latents") != (d.channels == 4) or (d.format == "latents" and clip):
            raise ValueError(f"data.format={d.format} with data.channels={d.channels}, sampling.clip_sample={str(clip).lower()}: "
                             "VAE latents (`raydiff data encode`) have 4 channels and exceed [-1, 1]; images have 1 or 3 "
                             "channels. Fix: set data.format=latents and leave data.channels/sampling.clip_sample unset, or data.channels=3")
        self._text_checks()
        if self.scaling.device == "cpu" and self.precision.compile:
            raise ValueError("precision.compile=true is for GPU training. Fix: set precision.compile=false")
        return self
