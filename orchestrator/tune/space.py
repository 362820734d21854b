"""The search space: which training keys may vary, how, and what Ray Tune gets.

A space maps training keys (``optim.lr``) to one distribution, written in the job file as
``{loguniform: [1e-4, 3e-3]}``, ``{uniform: [lo, hi]}``, ``{randint: [lo, hi]}`` (both ends
included), ``{choice: [a, b]}`` or ``{grid: [a, b]}`` (every value, once per sample). Keys may be
dotted (``optim.lr: ...``) or nested (``optim: {lr: ...}``). Every training key is a legal key,
except the few that must be the same in every trial (listed in ``NOT_SEARCHABLE``); every value
a distribution can produce is checked against the training config before any trial starts.
"""

from __future__ import annotations

import copy
import math
import re
from typing import Any

from pydantic import BaseModel, ValidationError

from orchestrator.config import TrainConfig

KINDS = ("loguniform", "uniform", "randint", "choice", "grid")

# Keys every trial must share, with the reason (shown in the error).
NOT_SEARCHABLE = {
    "run.name": "each trial gets its own run name under the sweep's directory",
    "run.storage": "trials live under the sweep's directory ({run.storage}/{run.name})",
    "scaling.ray_address": "every trial runs on the sweep's cluster",
    "data.source": "trials are ranked on one dataset's held-out images; run one sweep per dataset",
    "data.seed": "it picks the held-out images and their noise, which every trial must share",
    "data.val_images": "the validation set must be the same in every trial",
    "logging.val_every_steps": "trials report the metric at the same steps",
    "logging.val_timesteps": "the validation loss must be measured the same way in every trial",
}
NOT_SEARCHABLE_PREFIXES = {"storage.s3.": "storage connection settings are not hyperparameters"}

# What population-based training may change when a trial continues from another trial's
# checkpoint: optimizer, schedule and loss settings. The model, batch, noise schedule, precision
# and data cannot change under loaded weights and optimizer state.
PBT_MUTABLE = frozenset({
    "optim.lr", "optim.min_lr_ratio", "optim.warmup_steps", "optim.weight_decay", "optim.beta1",
    "optim.beta2", "optim.eps", "optim.grad_clip", "optim.ema_decay", "diffusion.weighting",
    "diffusion.min_snr_gamma", "diffusion.p2_gamma", "diffusion.p2_k", "diffusion.label_dropout",
})


class SpaceError(ValueError):
    """A search-space entry that cannot be used; the message starts with the key."""


def flatten_space(tree: Any, prefix: str = "") -> dict[str, dict[str, Any]]:
    """``{"optim": {"lr": {...}}}`` and ``{"optim.lr": {...}}`` -> ``{"optim.lr": {...}}``."""
    if not isinstance(tree, dict):
        raise SpaceError(f"tune.space{('.' + prefix) if prefix else ''} must be a mapping of training keys to "
                         "distributions, e.g. optim.lr: {loguniform: [1e-4, 3e-3]}")
    out: dict[str, dict[str, Any]] = {}
    for k, v in tree.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) and v and set(v) & set(KINDS):
            out[key] = normalize(v)
        elif isinstance(v, dict) and v:
            out.update(flatten_space(v, key))
        else:
            raise SpaceError(f"tune.space.{key}: expected a distribution such as {{choice: [a, b]}} "
                             f"(one of {', '.join(KINDS)}), got {v!r}")
    return out


_SCI = re.compile(r"[-+]?(\d+(\.\d*)?|\.\d+)[eE][-+]?\d+")


def _number(v: Any) -> Any:
    """YAML 1.1 reads ``1e-4`` (no dot) as a string; users mean the number."""
    return float(v) if isinstance(v, str) and _SCI.fullmatch(v.strip()) else v


def normalize(spec: dict[str, Any]) -> dict[str, Any]:
    return {k: [_number(x) for x in v] if isinstance(v, list) else v for k, v in spec.items()}


def field_annotation(key: str) -> Any:
    """The annotation of training key ``key``; SpaceError naming the key if it is not a leaf."""
    cls: Any = TrainConfig
    parts = key.split(".")
    for i, part in enumerate(parts):
        fields = cls.model_fields if isinstance(cls, type) and issubclass(cls, BaseModel) else {}
        if part not in fields:
            where = ".".join(parts[:i]) or "the training config"
            allowed = ", ".join(sorted(fields)) if fields else "none"
            raise SpaceError(f"tune.space.{key}: unknown key (no {part!r} in {where}; allowed there: {allowed})")
        cls = fields[part].annotation
    if isinstance(cls, type) and issubclass(cls, BaseModel):
        raise SpaceError(f"tune.space.{key}: a section, not a value; search one of its keys, e.g. "
                         f"{key}.{sorted(cls.model_fields)[0]}")
    return cls


def _is(annotation: Any, kind: type) -> bool:
    return annotation is kind


def set_key(tree: dict[str, Any], key: str, value: Any) -> None:
    node = tree
    for part in key.split(".")[:-1]:
        node = node.setdefault(part, {})
    node[key.split(".")[-1]] = value


def _check_value(base: dict[str, Any], key: str, value: Any) -> None:
    tree = copy.deepcopy(base)
    set_key(tree, key, value)
    try:
        TrainConfig.model_validate(tree)
    except ValidationError as e:
        msgs = "; ".join(err["msg"].removeprefix("Value error, ") for err in e.errors())
        raise SpaceError(f"tune.space.{key}: value {value!r} is not a valid training config: {msgs}") from None


def check_entry(key: str, spec: dict[str, Any], base: dict[str, Any]) -> None:
    """Raise SpaceError naming ``key`` when ``spec`` is not a usable distribution for it."""
    if key in NOT_SEARCHABLE:
        raise SpaceError(f"tune.space.{key}: not searchable: {NOT_SEARCHABLE[key]}. Fix: set it outside tune.space")
    for prefix, why in NOT_SEARCHABLE_PREFIXES.items():
        if key.startswith(prefix):
            raise SpaceError(f"tune.space.{key}: not searchable: {why}. Fix: set it outside tune.space")
    annotation = field_annotation(key)
    kinds = [k for k in spec if k in KINDS]
    extra = [k for k in spec if k not in KINDS]
    if len(kinds) != 1 or extra:
        raise SpaceError(f"tune.space.{key}: give exactly one of {', '.join(KINDS)}, got {sorted(spec)}")
    kind = kinds[0]
    arg = spec[kind]
    if kind in ("choice", "grid"):
        if not isinstance(arg, list) or not arg:
            raise SpaceError(f"tune.space.{key}: {kind} needs a non-empty list of values, got {arg!r}")
        for v in arg:
            _check_value(base, key, v)
        return
    if not (isinstance(arg, list) and len(arg) == 2 and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                               for x in arg)):
        raise SpaceError(f"tune.space.{key}: {kind} needs [low, high] numbers, got {arg!r}")
    low, high = arg
    if not low < high:
        raise SpaceError(f"tune.space.{key}: {kind} low={low} must be < high={high}")
    if kind == "randint":
        if not _is(annotation, int):
            raise SpaceError(f"tune.space.{key}: randint is for integer keys; this key is not one. Fix: use uniform, "
                             "loguniform or choice")
        if not (float(low).is_integer() and float(high).is_integer()):
            raise SpaceError(f"tune.space.{key}: randint bounds must be integers, got {arg!r}")
    else:
        if not _is(annotation, float):
            raise SpaceError(f"tune.space.{key}: {kind} draws real numbers and this key is not a float. "
                             "Fix: use randint (integers) or choice")
        if kind == "loguniform" and low <= 0:
            raise SpaceError(f"tune.space.{key}: loguniform needs low > 0, got {low}. Fix: use a positive low "
                             "bound (e.g. 1e-5), or uniform")
    for v in (low, high):
        _check_value(base, key, int(v) if kind == "randint" else float(v))


def grid_size(space: dict[str, dict[str, Any]]) -> int:
    return math.prod(len(spec["grid"]) for spec in space.values() if "grid" in spec)


def to_ray(spec: dict[str, Any]) -> Any:
    """One entry as a Ray Tune search-space object."""
    from ray import tune

    kind, arg = next((k, spec[k]) for k in KINDS if k in spec)
    if kind == "loguniform":
        return tune.loguniform(float(arg[0]), float(arg[1]))
    if kind == "uniform":
        return tune.uniform(float(arg[0]), float(arg[1]))
    if kind == "randint":
        return tune.randint(int(arg[0]), int(arg[1]) + 1)  # Ray's upper bound is exclusive
    if kind == "choice":
        return tune.choice(list(arg))
    return tune.grid_search(list(arg))


def param_space(space: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {key: to_ray(spec) for key, spec in space.items()}


def pbt_mutations(space: dict[str, dict[str, Any]], keys: list[str]) -> dict[str, Any]:
    """PBT's ``hyperparam_mutations``: lists for choice/grid (PBT steps to a neighbouring value),
    Ray distributions otherwise (PBT scales by 0.8/1.2 or resamples)."""
    out = {}
    for key in keys:
        spec = space[key]
        out[key] = list(spec.get("choice") or spec.get("grid") or []) or to_ray(spec)
    return out


def clip_to_space(config: dict[str, Any], space: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """PBT's explore step scales numbers by 0.8 or 1.2 without bounds (an EMA decay of 0.95 would
    become 1.14): keep ranged values inside the space (PBT's ``custom_explore_fn``)."""
    for key, spec in space.items():
        kind = next(k for k in KINDS if k in spec)
        if kind in ("uniform", "loguniform", "randint") and isinstance(config.get(key), (int, float)):
            low, high = spec[kind]
            value = min(max(config[key], low), high)
            config[key] = int(round(value)) if kind == "randint" else float(value)
    return config


def trial_tree(base: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """The training tree of one trial: ``base`` with the sampled values set."""
    tree = copy.deepcopy(base)
    for key, value in params.items():
        set_key(tree, key, value)
    return tree
