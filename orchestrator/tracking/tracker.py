"""The fan-out that rank 0 calls (metrics.jsonl and the optional sinks), and the package check
that runs before Ray starts."""

from __future__ import annotations

import importlib.util
import logging
from typing import TYPE_CHECKING, Any, Protocol

from orchestrator.config import ConfigError, LoggingConfig, TrainConfig
from orchestrator.storage import LeaseLost, join
from orchestrator.storage.jsonl import JsonlLog
from orchestrator.storage.rundir import METRICS_LOG
from orchestrator.tracking.scalars import scalars_of

if TYPE_CHECKING:
    from orchestrator.storage import Fence

log = logging.getLogger("raydiff.tracking")

TENSORBOARD_DIR = "tensorboard"


class Sink(Protocol):
    name: str

    def scalars(self, step: int, values: dict[str, float]) -> None: ...
    def image(self, step: int, png: bytes) -> None: ...
    def rewind(self, step: int) -> None: ...
    def flush(self) -> None: ...
    def close(self) -> None: ...


class Tracker:
    """Every enabled sink gets each metrics record and sample grid. ``record`` (metrics.jsonl)
    gets each record whole and is the record of the run: its failures are not caught. An
    optional sink that fails (a tracking server down, a full disk) is reported once and
    dropped: training goes on."""

    def __init__(self, sinks: list[Sink], record: JsonlLog | None = None):
        self.sinks = list(sinks)
        self.record = record

    def _each(self, method: str, *args: Any) -> None:
        for sink in list(self.sinks):
            try:
                getattr(sink, method)(*args)
            except LeaseLost:
                raise  # not the sink's failure: this process may write nothing more (storage/fence.py)
            except Exception as e:  # noqa: BLE001 - any failure of an optional sink must not stop training
                log.warning("raydiff: %s tracking failed (%s: %s); it is off for the rest of this run",
                            sink.name, type(e).__name__, e)
                self.sinks.remove(sink)
                if method != "close":
                    try:
                        sink.close()
                    except Exception:  # noqa: BLE001 - already reported
                        pass

    def log(self, record: dict[str, Any]) -> None:
        """One metrics record (as written to metrics.jsonl); needs its ``step``."""
        if self.record is not None:
            self.record.write(record)
        self._each("scalars", int(record["step"]), scalars_of(record))

    def image(self, step: int, png: bytes) -> None:
        self._each("image", step, png)

    def rewind(self, step: int) -> None:
        """Training continues after ``step`` (a resume or a rollback): the steps after it are redone."""
        if self.record is not None:
            self.record.rewind(step)
        self._each("rewind", step)

    def flush(self) -> None:
        if self.record is not None:
            self.record.flush()  # the history reaches storage with every checkpoint
        self._each("flush")

    def close(self) -> None:
        try:
            if self.record is not None:
                self.record.close()
        finally:
            self._each("close")


_PACKAGES = (("mlflow", "mlflow"), ("wandb", "wandb"))


def check_tracking_packages(logging_cfg: LoggingConfig) -> None:
    """Enabled optional sinks need their package here (and on the workers: same environment)."""
    for key, package in _PACKAGES:
        if getattr(logging_cfg, key).enabled and importlib.util.find_spec(package) is None:
            raise ConfigError(f"logging.{key}.enabled=true but the {package} package is not installed. "
                              f"Fix: pip install {package} (in the environment of every node), or set "
                              f"logging.{key}.enabled=false")


def build_tracker(cfg: TrainConfig, run_uri: str, *, resume_step: int, params: dict[str, Any],
                  fence: "Fence | None" = None) -> Tracker:
    """metrics.jsonl, continued after ``resume_step`` (later records are redone), and the sinks
    ``cfg.logging`` enables. ``params``: the run's config (secrets masked), logged by MLflow and W&B.
    ``fence``: the lease holder's (storage/fence.py); metrics.jsonl and TensorBoard's files in the
    run directory are written only while the lease is its holder's."""
    record = JsonlLog(run_uri, METRICS_LOG, cfg.storage.s3, fence=fence)
    record.rewind(resume_step)
    sinks: list[Sink] = []
    lg = cfg.logging
    if lg.tensorboard:
        from orchestrator.tracking.tensorboard import TensorBoardSink

        sinks.append(TensorBoardSink(join(run_uri, TENSORBOARD_DIR), cfg.storage.s3, resume_step=resume_step,
                                     upload_every_s=lg.tensorboard_upload_s, fence=fence))
    if lg.mlflow.enabled:
        from orchestrator.tracking.mlflow_sink import MlflowSink

        sinks.append(MlflowSink(lg.mlflow, cfg.run.name, run_uri, params, resume_step=resume_step))
    if lg.wandb.enabled:
        from orchestrator.tracking.wandb_sink import WandbSink

        sinks.append(WandbSink(lg.wandb, cfg.run.name, run_uri, params, resume_step=resume_step))
    return Tracker(sinks, record)
