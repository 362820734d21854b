"""Weights & Biases tracking (``logging.wandb.enabled=true``; ``pip install wandb``).

Each invocation of a run (a resume too) is one W&B run in the group ``run.name``, with the run
directory and start step in its config: W&B refuses steps below a run's current step, so a
resumed invocation continuing the same W&B run would lose the redone steps.
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, Any

from PIL import Image

if TYPE_CHECKING:
    from orchestrator.config import WandbConfig


class WandbSink:
    name = "wandb"

    def __init__(self, wcfg: "WandbConfig", run_name: str, run_uri: str, params: dict[str, Any], *,
                 resume_step: int):
        import wandb

        self.wandb = wandb
        self.run = wandb.init(project=wcfg.project, entity=wcfg.entity, mode=wcfg.mode, name=run_name,
                              group=run_name, config={**params, "raydiff": {"run_dir": run_uri,
                                                                            "start_step": resume_step}})

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def image(self, step: int, png: bytes) -> None:
        self.run.log({"samples": self.wandb.Image(Image.open(io.BytesIO(png)))}, step=step)

    def rewind(self, step: int) -> None:
        # W&B drops steps below its current one: after a rollback the redone steps are not logged
        # until training passes the step it rolled back from (metrics.jsonl and TensorBoard have them).
        self.run.summary["raydiff_rolled_back_to_step"] = step

    def flush(self) -> None:
        pass  # the W&B client uploads in its own process

    def close(self) -> None:
        self.run.finish()
