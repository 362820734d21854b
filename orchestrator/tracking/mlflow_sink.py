"""MLflow tracking (``logging.mlflow.enabled=true``; ``pip install mlflow``).

Each invocation of a run (a resume too) is one MLflow run named after ``run.name`` and tagged
with the run directory and the step it started from: MLflow keeps every value logged at a step,
so continuing one MLflow run after a resume would show the redone steps twice.
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, Any

from PIL import Image

if TYPE_CHECKING:
    from orchestrator.config import MlflowConfig


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, f"{key}."))
        else:
            out[key] = str(v)[:500]  # MLflow's parameter value limit
    return out


class MlflowSink:
    name = "mlflow"

    def __init__(self, mcfg: "MlflowConfig", run_name: str, run_uri: str, params: dict[str, Any], *,
                 resume_step: int):
        import mlflow

        self.mlflow = mlflow
        if mcfg.tracking_uri:
            mlflow.set_tracking_uri(mcfg.tracking_uri)
        mlflow.set_experiment(mcfg.experiment)
        self.run = mlflow.start_run(run_name=run_name, tags={"raydiff.run_dir": run_uri,
                                                             "raydiff.start_step": str(resume_step)})
        mlflow.log_params(flatten(params))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self.mlflow.log_metrics(values, step=step)

    def image(self, step: int, png: bytes) -> None:
        self.mlflow.log_image(Image.open(io.BytesIO(png)), artifact_file=f"samples/step_{step:07d}.png")

    def rewind(self, step: int) -> None:
        # A rollback redoes steps after `step`: marked, since MLflow cannot drop logged values.
        self.mlflow.set_tag("raydiff.rolled_back_to_step", str(step))

    def flush(self) -> None:
        pass  # MLflow sends each call synchronously

    def close(self) -> None:
        self.mlflow.end_run()
