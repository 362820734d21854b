"""Pretrained diffusers networks as raydiff denoisers, and LoRA adapters on them.

``read_pretrained`` reads what a local diffusers directory says without loading weights: the
network class, its conditioning, image size and channels (the model's ``config.json``) and the
noise schedule and prediction type (the ``scheduler_config.json`` next to it, when there is
one). ``build_pretrained`` loads the weights into a :class:`Denoiser`. Two layouts are read:

* a model folder: ``config.json`` + weights, as ``ModelMixin.save_pretrained`` writes it
  (``unet/``, ``transformer/``); a ``scheduler/`` folder beside it is read as its scheduler;
* a pipeline or ``raydiff export`` folder: ``unet/`` or ``transformer/`` with ``scheduler/``
  (and ``model_index.json`` or ``raydiff.json``).

Conditioning follows raydiff's null-class convention (model/networks.py): a ``UNet2DModel``
with ``num_class_embeds = K + 1`` is a K-class model whose last row is the null class; a
class-conditional ``DiTTransformer2DModel`` with ``num_embeds_ada_norm = K`` has K classes and
the LabelEmbedding's own extra row as null class, exactly like facebook/DiT checkpoints. A DiT
with one class is unconditional (raydiff's own unconditional DiT); an export's ``raydiff.json``
settles the question where it exists.

LoRA (Hu et al. 2022, "LoRA: Low-Rank Adaptation of Large Language Models") adds trainable
low-rank updates B·A (scaled by alpha / rank) beside frozen linear layers, injected with PEFT's
``inject_adapter_in_model``: the backbone keeps its structure (parameter names gain
``.lora_A.default`` / ``.lora_B.default`` under the adapted layers and ``.base_layer`` for the
frozen weight), so the Denoiser wrapper, the EMA and the checkpoints see a plain module. B starts
at zero, so the adapted network first computes exactly what the pretrained one does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:  # torch and diffusers load on use: the config schema reads directories with this module
    from torch import nn

    from .networks import Denoiser

BackboneKind = Literal["unet", "dit", "unet-text"]  # model/networks.py

# diffusers network class -> Denoiser kind. UNet2DConditionModel is Stable Diffusion's text-conditioned
# U-Net (Rombach et al. 2022), wrapped like raydiff's unet-text-* models (model/registry.py).
NETWORKS: dict[str, BackboneKind] = {"UNet2DModel": "unet", "DiTTransformer2DModel": "dit",
                                     "UNet2DConditionModel": "unet-text"}
# UNet2DConditionModel options beyond SD 1.x/2.x's plain cross-attention to the text encoder's
# hidden states (SDXL's added time/text embeddings, class or extra hidden-state projections):
# Denoiser passes encoder_hidden_states only.
UNSUPPORTED_TEXT_UNET = ("class_embed_type", "addition_embed_type", "encoder_hid_dim", "encoder_hid_dim_type",
                         "time_cond_proj_dim", "num_class_embeds")
SUBFOLDERS = ("unet", "transformer")
PREDICTION_FROM_DIFFUSERS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
# model/schedules.py's linear betas (Ho et al. 2020); other ranges are a schedule raydiff lacks.
LINEAR_BETAS = (1e-4, 0.02)
# Attention projections of diffusers' ``Attention`` (U-Net attention blocks and DiT blocks alike),
# the layers the LoRA paper and diffusers' LoRA training scripts adapt.
DEFAULT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


class PretrainedError(ValueError):
    """A pretrained directory raydiff cannot use; the message names the file and the fix."""


@dataclass(frozen=True)
class PretrainedInfo:
    """What a pretrained directory fixes about the run (read from JSON only)."""

    root: str  # the directory as given, made absolute
    model_dir: str  # the folder with the network's config.json and weights
    network_class: str  # "UNet2DModel" or "DiTTransformer2DModel"
    kind: BackboneKind
    in_channels: int
    sample_size: int
    num_classes: int | None
    scheduler_file: str | None  # the scheduler_config.json read, None when there is none
    schedule: str | None = None  # "linear" / "cosine" (model/schedules.py), None without a scheduler
    num_timesteps: int | None = None
    prediction: str | None = None  # "eps" / "v" / "x0"
    zero_terminal_snr: bool | None = None
    class_names: tuple[str, ...] | None = None
    scheduler_class: str | None = None  # e.g. "DDIMScheduler": how the directory sampled, not a training fact
    # Text-conditioned (UNet2DConditionModel) pipelines: the cross-attention width, the directory
    # whose text_encoder/ + tokenizer/ the run encodes prompts with (None: the pipeline has none),
    # and the pipeline's VAE folder (None: a pixel-space pipeline).
    text_dim: int | None = None
    text_encoder: str | None = None
    vae: str | None = None

    def taken(self) -> dict[str, tuple[Any, str]]:
        """Config key -> (value, where it comes from), for the keys the directory fixes."""
        out = self._taken()
        if self.text_dim is not None:
            cfg_file = str(Path(self.model_dir) / "config.json")
            out["data.conditional"] = (False, f"{cfg_file} (text-conditioned, cross_attention_dim={self.text_dim})")
            out["data.captions"] = (True, f"{cfg_file} (a text-to-image network trains on captions)")
            if self.text_encoder is not None:
                out["model.text_encoder"] = (self.text_encoder, f"{self.text_encoder}/text_encoder + tokenizer")
        return out

    def _taken(self) -> dict[str, tuple[Any, str]]:
        cfg_file = str(Path(self.model_dir) / "config.json")
        out: dict[str, tuple[Any, str]] = {
            "data.resolution": (self.sample_size, f"{cfg_file} sample_size"),
            "data.channels": (self.in_channels, f"{cfg_file} in_channels"),
            "data.conditional": (self.num_classes is not None,
                                 f"{cfg_file} ({self.num_classes or 'no'} classes)"),
        }
        if self.scheduler_file is not None:
            s = self.scheduler_file
            out["diffusion.schedule"] = (self.schedule, f"{s} beta_schedule")
            out["diffusion.num_timesteps"] = (self.num_timesteps, f"{s} num_train_timesteps")
            out["diffusion.prediction"] = (self.prediction, f"{s} prediction_type")
            out["diffusion.zero_terminal_snr"] = (self.zero_terminal_snr, f"{s} rescale_betas_zero_snr")
        return out


def _json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise PretrainedError(f"{path} cannot be read as JSON ({e})") from None


def _model_dir(root: Path) -> Path:
    if (root / "config.json").is_file():
        return root
    for sub in SUBFOLDERS:
        if (root / sub / "config.json").is_file():
            return root / sub
    index = root / "model_index.json"
    if index.is_file():
        parts = sorted(k for k in _json(index) if not k.startswith("_"))
        raise PretrainedError(f"{root} is a diffusers pipeline with components {parts} but no unet/ or transformer/ "
                              "network raydiff can train. Fix: point model.pretrained at a pipeline with a UNet2DModel "
                              "or DiTTransformer2DModel")
    raise PretrainedError(f"{root} holds neither a diffusers model (config.json) nor a pipeline (unet/ or "
                          "transformer/ with scheduler/). Fix: give the directory save_pretrained or `raydiff export` "
                          "wrote")


def _scheduler(model_dir: Path, root: Path) -> Path | None:
    for base in (root, model_dir.parent):
        f = base / "scheduler" / "scheduler_config.json"
        if f.is_file():
            return f
    return None


def _schedule(sched: dict[str, Any], where: Path) -> dict[str, Any]:
    if sched.get("trained_betas") is not None:
        raise PretrainedError(f"{where}: trained_betas (an explicit beta list) is not a schedule raydiff has. Fix: "
                              "use a model trained with a linear or squaredcos_cap_v2 schedule")
    kind = sched.get("beta_schedule", "linear")
    if kind == "squaredcos_cap_v2":
        schedule = "cosine"
    elif kind == "linear":
        lo, hi = float(sched.get("beta_start", 1e-4)), float(sched.get("beta_end", 0.02))
        if abs(lo - LINEAR_BETAS[0]) > 1e-12 or abs(hi - LINEAR_BETAS[1]) > 1e-12:
            raise PretrainedError(f"{where}: linear betas from {lo} to {hi}; raydiff's linear schedule runs from "
                                  f"{LINEAR_BETAS[0]} to {LINEAR_BETAS[1]} (Ho et al. 2020) and training on other betas "
                                  "than the model learned would change its noise levels. Fix: use a model with that "
                                  "schedule or squaredcos_cap_v2")
        schedule = "linear"
    else:
        raise PretrainedError(f"{where}: beta_schedule={kind!r} is not a schedule raydiff has (linear 1e-4..0.02, "
                              "squaredcos_cap_v2). Fix: use a model trained with one of those")
    pred = sched.get("prediction_type", "epsilon")
    if pred not in PREDICTION_FROM_DIFFUSERS:
        raise PretrainedError(f"{where}: prediction_type={pred!r}; raydiff trains "
                              f"{sorted(PREDICTION_FROM_DIFFUSERS)}")
    return {"schedule": schedule, "num_timesteps": int(sched.get("num_train_timesteps", 1000)),
            "prediction": PREDICTION_FROM_DIFFUSERS[pred],
            "zero_terminal_snr": bool(sched.get("rescale_betas_zero_snr", False))}


def read_pretrained(path: str | Path) -> PretrainedInfo:
    """What the diffusers directory ``path`` fixes; ``PretrainedError`` naming the problem."""
    root = Path(path).expanduser().absolute()
    if not root.is_dir():
        raise PretrainedError(f"{root} is not a directory. Fix: give a local diffusers model or pipeline directory "
                              "(written by save_pretrained or `raydiff export`)")
    mdir = _model_dir(root)
    conf = _json(mdir / "config.json")
    cls = conf.get("_class_name")
    if cls not in NETWORKS:
        raise PretrainedError(f"{mdir / 'config.json'}: network class {cls!r} is not one raydiff fine-tunes; "
                              f"supported: {sorted(NETWORKS)}")
    kind = NETWORKS[cls]
    size = conf.get("sample_size")
    if isinstance(size, (list, tuple)):
        if len(set(size)) != 1:
            raise PretrainedError(f"{mdir / 'config.json'}: non-square sample_size {size}; raydiff trains square images")
        size = size[0]
    cin, cout = int(conf.get("in_channels", 3)), conf.get("out_channels")
    if cout is not None and int(cout) != cin:
        raise PretrainedError(f"{mdir / 'config.json'}: out_channels={cout} != in_channels={cin} (a learned-variance "
                              "output); raydiff's samplers use fixed variances and train the mean only. Fix: use a "
                              "model whose out_channels equal its in_channels")
    meta_file = next((d / "raydiff.json" for d in (root, mdir.parent) if (d / "raydiff.json").is_file()), None)
    meta = _json(meta_file) if meta_file is not None else {}
    text: dict[str, Any] = {}
    if kind == "unet-text":
        text = _text_unet(conf, mdir, root)
        num_classes = None
    elif kind == "unet":
        if conf.get("class_embed_type") is not None:
            raise PretrainedError(f"{mdir / 'config.json'}: class_embed_type={conf['class_embed_type']!r}; raydiff "
                                  "conditions a UNet2DModel through num_class_embeds only")
        n = conf.get("num_class_embeds")
        if n is not None and int(n) < 2:
            raise PretrainedError(f"{mdir / 'config.json'}: num_class_embeds={n}: raydiff's class-conditional U-Net "
                                  "has K classes and a null class (K + 1 rows)")
        num_classes = None if n is None else int(n) - 1
    else:
        if conf.get("norm_type", "ada_norm_zero") != "ada_norm_zero":
            raise PretrainedError(f"{mdir / 'config.json'}: norm_type={conf.get('norm_type')!r}; raydiff's DiT is "
                                  "the class-conditional ada_norm_zero DiT (Peebles & Xie 2023)")
        k = int(conf.get("num_embeds_ada_norm") or 1)
        num_classes = None if ("num_classes" in meta and meta["num_classes"] is None) or k == 1 else k
    if "num_classes" in meta and meta["num_classes"] != num_classes:
        raise PretrainedError(f"{meta_file}: num_classes={meta['num_classes']} but {mdir / 'config.json'} has "
                              f"{num_classes}; the directory mixes two exports")
    names = meta.get("class_names")
    sfile = _scheduler(mdir, root)
    sched = _schedule(_json(sfile), sfile) if sfile is not None else {}
    if sfile is not None:
        sched["scheduler_class"] = _json(sfile).get("_class_name")
    return PretrainedInfo(root=str(root), model_dir=str(mdir), network_class=cls, kind=kind, in_channels=cin,
                          sample_size=int(size), num_classes=num_classes,
                          scheduler_file=str(sfile) if sfile is not None else None,
                          class_names=tuple(names) if names and num_classes and len(names) == num_classes else None,
                          **sched, **text)


def _text_unet(conf: dict[str, Any], mdir: Path, root: Path) -> dict[str, Any]:
    """What a UNet2DConditionModel's directory gives a text run: its cross-attention width, the
    pipeline's text encoder (text_encoder/ + tokenizer/ beside unet/, read by FrozenTextEncoder)
    and its VAE folder."""
    where = mdir / "config.json"
    extra = sorted(k for k in UNSUPPORTED_TEXT_UNET if conf.get(k) is not None)
    if extra:
        raise PretrainedError(f"{where}: {', '.join(f'{k}={conf[k]!r}' for k in extra)}: raydiff's text U-Net conditions "
                              "on the text encoder's hidden states through cross-attention only (Stable Diffusion "
                              "1.x/2.x); SDXL-style added embeddings are not supported. Fix: use such a pipeline")
    dim = conf.get("cross_attention_dim", 1280)
    if not isinstance(dim, int):
        raise PretrainedError(f"{where}: cross_attention_dim={dim!r} differs per block; raydiff's text U-Net reads one "
                              "text encoder width")
    base = root if (root / "unet" / "config.json").is_file() else mdir.parent
    has_encoder = (base / "text_encoder" / "config.json").is_file() and (base / "tokenizer").is_dir()
    vae = base / "vae" / "config.json"
    return {"text_dim": dim, "text_encoder": str(base) if has_encoder else None,
            "vae": str(vae.parent) if vae.is_file() else None}


def is_text_pretrained(path: str | Path) -> bool:
    """Whether the diffusers directory ``path`` holds a text-conditioned network (JSON only; False
    when it cannot be read: read_pretrained reports that)."""
    try:
        return read_pretrained(path).text_dim is not None
    except PretrainedError:
        return False


def load_backbone(info: PretrainedInfo, *, weights: bool = True) -> "nn.Module":
    """The diffusers network of ``info``: with its weights (``from_pretrained``), or only its
    architecture (``from_config``: for counting parameters on the meta device)."""
    import diffusers
    from diffusers.models.embeddings import LabelEmbedding

    cls = getattr(diffusers, info.network_class)
    net = cls.from_pretrained(info.model_dir) if weights else cls.from_config(cls.load_config(info.model_dir))
    for m in net.modules():
        if isinstance(m, LabelEmbedding):
            # As in model/registry.py: DiffusionObjective drops labels with the caller's generator.
            m.dropout_prob = 0.0
    return net.train()


def build_pretrained(info: PretrainedInfo, *, weights: bool = True) -> "Denoiser":
    from .networks import Denoiser

    return Denoiser(load_backbone(info, weights=weights), info.kind, in_channels=info.in_channels,
                    image_size=info.sample_size, num_classes=info.num_classes, text_dim=info.text_dim)


def add_lora(backbone: "nn.Module", rank: int, alpha: float, targets: tuple[str, ...] | list[str]) -> "nn.Module":
    """Inject LoRA adapters into ``backbone``'s ``targets`` layers and freeze everything else."""
    from peft import LoraConfig, inject_adapter_in_model
    from torch import nn

    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=True)
    try:
        inject_adapter_in_model(config, backbone)
    except ValueError as e:
        linear = sorted({".".join(n.split(".")[-2:]) if n.split(".")[-1].isdigit() else n.split(".")[-1]
                         for n, m in backbone.named_modules() if isinstance(m, nn.Linear)})
        raise PretrainedError(f"model.lora.targets={list(targets)}: {str(e).rstrip('.')}. Fix: name some of this "
                              f"network's linear layers: {linear}") from None
    for name, p in backbone.named_parameters():
        p.requires_grad_(".lora_" in name)
    backbone.lora_config = config  # read by the export (adapter_config.json)
    return backbone


def lora_state_dict(backbone: "nn.Module") -> dict[str, Any]:
    """The adapter weights in PEFT's saved form (no adapter name in the keys)."""
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(backbone)


def merge_lora(backbone: "nn.Module") -> "nn.Module":
    """Fold every adapter into its base layer (W + alpha/r B A) and remove the adapter layers, in place:
    the result is the plain diffusers network."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import _get_submodules

    for name, m in list(backbone.named_modules()):
        if isinstance(m, BaseTunerLayer):
            m.merge()
            parent, _, attr = _get_submodules(backbone, name)
            setattr(parent, attr, m.get_base_layer())
    for attr in ("peft_config", "lora_config"):
        if hasattr(backbone, attr):
            delattr(backbone, attr)
    return backbone


def diffusers_without_peft() -> bool:
    """Keep diffusers from importing PEFT in a process that adds no adapters; call it before
    anything imports ``diffusers.models``.

    diffusers imports PEFT whenever it is installed, for one feature raydiff never uses: its
    layerwise-casting hook (diffusers/hooks/layerwise_casting.py) disables PEFT's own input
    casting on LoRA layers. Measured on the 2-core VM (2026-12-07): 1.6 CPU-s of a fresh
    process's 2.5 s of network-code imports, and 0.4-0.6 s of a Ray Train worker's 2.9-3.2 s
    (Ray has loaded part of the same modules by then), paid by every rank of every run, resume
    and Tune trial (issue 18). LoRA here goes through PEFT's own ``inject_adapter_in_model``
    (``add_lora``), so a run without adapters needs none of it. Returns whether PEFT was kept out.
    """
    return _diffusers_sees_no("peft", before=("diffusers.hooks.layerwise_casting", "peft"))


def diffusers_without_transformers() -> bool:
    """Keep transformers and accelerate out of a process that runs no text encoder, no adapters
    and no pretrained network; call it before anything imports ``diffusers.models``.

    With transformers installed, diffusers' LoRA loaders import ``transformers.PreTrainedModel``
    (its modeling code) and ``diffusers.models.lora`` CLIP's text models, only to load adapters
    into text encoders; its quantizers import transformers' package for a quantization config
    class (a bare ``try: import``); and with accelerate installed, its offloading hooks import
    accelerate (and through it transformers' base package again). A network built from the
    registry and trained from scratch needs none of them: raydiff's text models load their
    encoders through transformers (model/text_encoder.py), pretrained networks load through
    accelerate's low-memory path, and neither happens in such a process. Measured on the 2-core
    VM (2026-12-07, a fresh process importing the training loop and DeepSpeed, 3 pairs): the
    integration flag alone 4.5-5.1 CPU-s against 4.8-5.5; the package and accelerate too (after
    Ray Train and torch, as in a worker) 2.1-2.4 CPU-s against 2.7-3.1. Returns whether
    diffusers' integration was kept out; transformers' package is then unimportable in this
    process (``sys.modules["transformers"] = None``: importing it raises ``ImportError``, which
    every optional import of it expects), unless it was already imported.
    """
    import sys

    kept_out = _diffusers_sees_no("transformers", before=("diffusers.loaders", "diffusers.models.lora"))
    if kept_out:
        _diffusers_sees_no("accelerate", before=_READS_ACCELERATE)
        sys.modules.setdefault("transformers", None)  # type: ignore[arg-type]
    return kept_out


# diffusers modules that read whether accelerate is installed when they are imported (and
# accelerate itself): once one is loaded, the answer is left as it is.
_READS_ACCELERATE = ("accelerate", "diffusers.hooks.group_offloading", "diffusers.models.modeling_utils",
                     "diffusers.models.model_loading_utils", "diffusers.loaders.lora_base", "diffusers.training_utils")


def _diffusers_sees_no(library: str, *, before: tuple[str, ...]) -> bool:
    """Set diffusers' answer to "is ``library`` installed?" to no, for this process only.

    diffusers reads the answer of its own availability check (``_<library>_available``) when each
    of its modules is imported: left alone when one of the modules that read it (``before``) is
    already loaded, or diffusers no longer has the flag."""
    import sys

    if any(m in sys.modules for m in before):
        return False
    from diffusers.utils import import_utils

    flag = f"_{library}_available"
    if not hasattr(import_utils, flag):
        return False
    setattr(import_utils, flag, False)
    return True
