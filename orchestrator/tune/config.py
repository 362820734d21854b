"""The ``tune:`` section of a sweep's job file, beside the ordinary training sections.

``TuneJob`` is ``TrainConfig`` plus ``tune``: one typed tree, loaded and overridden like a training
job (``raydiff tune --config jobs/tune-smoke.yaml optim.steps=50 tune.num_samples=8``) and
rejected with the same one-line-per-problem messages. The training sections are the base every
trial starts from; ``tune.space`` says which of their keys vary.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, cast

from pydantic import Field, field_validator, model_validator

from orchestrator.config import TrainConfig, _Strict, config_to_dict, load_config
from orchestrator.tune import space as S


class AshaConfig(_Strict):
    # Steps every trial trains before it can be stopped (the first rung).
    grace_period: int = Field(100, ge=1)
    # Keep the best 1/reduction_factor of the trials at each rung.
    reduction_factor: float = Field(3.0, gt=1)
    brackets: int = Field(1, ge=1)


class PbtConfig(_Strict):
    # Steps between exploit/explore decisions (Tune's perturbation_interval on the step count).
    perturbation_interval: int = Field(200, ge=1)
    # Keys of tune.space that explore may change; empty: every one that may change mid-run.
    mutate: list[str] = Field(default_factory=list)
    quantile_fraction: float = Field(0.25, gt=0, le=0.5)
    resample_probability: float = Field(0.25, ge=0, le=1)
    # Synchronous PBT: all trials reach the same step before any is exploited.
    synch: bool = True
    burn_in_steps: int = Field(0, ge=0)


class TrialResources(_Strict):
    """What a trial's driver reserves; its training workers reserve scaling.* themselves
    (fractional GPUs: scaling.gpus_per_worker)."""

    cpu: float = Field(0.25, ge=0)
    gpu: float = Field(0.0, ge=0)


class TuneSection(_Strict):
    space: dict[str, dict[str, Any]]
    searcher: Literal["optuna", "random", "grid"] = "optuna"
    scheduler: Literal["asha", "pbt", "fifo"] = "asha"
    num_samples: int = Field(8, ge=1)
    max_concurrent_trials: int = Field(2, ge=1)
    # val_loss: the held-out validation loss (data.val_images, logging.val_every_steps);
    # loss: the training loss of the last logging window (noisier).
    metric: Literal["val_loss", "loss"] = "val_loss"
    mode: Literal["min", "max"] = "min"
    seed: int = 0
    # Tune restarts a failed trial from its last checkpoint this many times.
    max_failures: int = Field(1, ge=0)
    resources: TrialResources = TrialResources()
    asha: AshaConfig = AshaConfig()
    pbt: PbtConfig = PbtConfig()

    @field_validator("space", mode="before")
    @classmethod
    def _flatten(cls, v: Any) -> dict[str, dict[str, Any]]:
        flat = S.flatten_space(v)
        if not flat:
            raise ValueError("tune.space is empty. Fix: give at least one key, e.g. optim.lr: {loguniform: [1e-4, 3e-3]}")
        return flat


class TuneJob(TrainConfig):
    tune: TuneSection

    @model_validator(mode="after")
    def _check_sweep(self) -> "TuneJob":
        t = self.tune
        base = self.training_tree()
        for key, spec in t.space.items():
            S.check_entry(key, spec, base)
        kinds = {key: next(k for k in S.KINDS if k in spec) for key, spec in t.space.items()}
        if t.metric == "val_loss" and not self.logging.val_every_steps:
            raise ValueError("tune.metric=val_loss needs a validation loss. Fix: set data.val_images (e.g. 64) and "
                             "logging.val_every_steps (e.g. 100)")
        if t.mode == "max":
            raise ValueError(f"tune.mode=max with tune.metric={t.metric}: the metrics are losses, lower is better. "
                             "Fix: tune.mode=min")
        grids = [k for k, kind in kinds.items() if kind == "grid"]
        if t.searcher == "optuna" and grids:
            raise ValueError(f"tune.space.{grids[0]}: grid with tune.searcher=optuna (Optuna samples; it does not "
                             "enumerate). Fix: use choice, or tune.searcher=grid")
        if t.searcher == "grid":
            bad = [k for k, kind in kinds.items() if kind not in ("grid", "choice")]
            if bad:
                raise ValueError(f"tune.space.{bad[0]}: tune.searcher=grid enumerates lists; {kinds[bad[0]]} is a range. "
                                 "Fix: give a grid of values, or tune.searcher=random")
        if t.scheduler == "pbt":
            self._check_pbt(kinds)
        if t.scheduler == "asha" and t.asha.grace_period >= self.optim.steps:
            raise ValueError(f"tune.asha.grace_period={t.asha.grace_period} is not below optim.steps={self.optim.steps}: "
                             f"ASHA could never stop a trial. Fix: e.g. tune.asha.grace_period={max(1, self.optim.steps // 4)}")
        return self

    def _check_pbt(self, kinds: dict[str, str]) -> None:
        t = self.tune
        if t.searcher == "optuna":
            raise ValueError("tune.scheduler=pbt with tune.searcher=optuna: PBT evolves its own population and "
                             "takes no model-based searcher. Fix: tune.searcher=random (or grid)")
        for key in t.pbt.mutate:
            if key not in t.space:
                raise ValueError(f"tune.pbt.mutate: {key} is not in tune.space. Fix: add it to tune.space or "
                                 "remove it from tune.pbt.mutate")
            if key not in S.PBT_MUTABLE:
                raise ValueError(f"tune.pbt.mutate: {key} cannot change when a trial continues from another trial's "
                                 f"checkpoint. Mutable keys: {', '.join(sorted(S.PBT_MUTABLE))}")
        if not self.pbt_keys():
            raise ValueError("tune.scheduler=pbt but no key of tune.space may change mid-run "
                             f"(mutable: {', '.join(sorted(S.PBT_MUTABLE))}). Fix: search e.g. optim.lr")
        if t.pbt.perturbation_interval < self.checkpoint.every_steps:
            raise ValueError(
                f"tune.pbt.perturbation_interval={t.pbt.perturbation_interval} is shorter than "
                f"checkpoint.every_steps={self.checkpoint.every_steps}: an exploited trial continues from the donor's "
                f"checkpoint, so one must exist. Fix: tune.pbt.perturbation_interval={self.checkpoint.every_steps} "
                "or a multiple")

    # -- views ------------------------------------------------------------------------------
    def pbt_keys(self) -> list[str]:
        return list(self.tune.pbt.mutate) or [k for k in self.tune.space if k in S.PBT_MUTABLE]

    def training_tree(self, *, reveal_secrets: bool = False) -> dict[str, Any]:
        """The training sections as a plain tree (the base of every trial)."""
        tree = config_to_dict(self, reveal_secrets=reveal_secrets)
        tree.pop("tune", None)
        return tree

    def training_config(self) -> TrainConfig:
        return TrainConfig.model_validate(self.training_tree(reveal_secrets=True))

    def num_trials(self) -> int:
        return self.tune.num_samples * S.grid_size(self.tune.space)


def load_tune_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> TuneJob:
    """Read a sweep's job file, apply ``key.sub=value`` overrides, validate the whole tree
    (search space included) and return it; ConfigError names the first bad key."""
    return cast(TuneJob, load_config(path, overrides, schema=TuneJob))
