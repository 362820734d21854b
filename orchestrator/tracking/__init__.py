"""Metric sinks beside ``metrics.jsonl``: TensorBoard event files (on by default), MLflow and
Weights & Biases (when enabled and installed).

Rank 0 hands every reduced metrics record (the one ``metrics.jsonl`` gets) and every sample grid
to one ``Tracker``, which fans them out to the enabled sinks. One module per concern:

- ``scalars``: a metrics record as flat, named scalars (the tags every sink uses).
- ``tensorboard``: event files in ``{run}/tensorboard``, staged and uploaded on object storage.
- ``mlflow_sink``, ``wandb_sink``: the optional services.
- ``mfu``: model FLOPs per image and device peaks, for model FLOPs utilisation on GPUs.
- ``tracker``: the fan-out and the package check that runs before Ray starts.
"""

from orchestrator.tracking.scalars import scalars_of
from orchestrator.tracking.tracker import TENSORBOARD_DIR, Tracker, build_tracker, check_tracking_packages

__all__ = ["TENSORBOARD_DIR", "Tracker", "build_tracker", "check_tracking_packages", "scalars_of"]
