"""Ray Train's ``TorchTrainer`` as raydiff runs it: without Ray Train's dataset manager.

raydiff's workers read their data through their own reader (data/reader.py), never through Ray
Train's ``datasets=``. Ray Train 2.60 still adds its datasets callback to a trainer given no
datasets (``DataParallelTrainer._create_default_callbacks``), and that callback starts a
``DatasetManager`` actor for every worker group: a new process (it inherits the controller's
runtime env, so no idle worker fits) importing Ray Data and Ray Train, 1.4 CPU-s per run measured
on this 2-core machine, spent while the workers import torch on the same cores (issue 18).
"""

from __future__ import annotations

from ray.train.torch import TorchTrainer

try:
    from ray.train.v2._internal.callbacks import DatasetsCallback
except ImportError:  # another Ray Train layout: keep its callbacks as they are
    DatasetsCallback = None


class Trainer(TorchTrainer):
    """``TorchTrainer`` minus the datasets callback when no datasets are given."""

    def _create_default_callbacks(self):
        callbacks = super()._create_default_callbacks()
        if self.datasets or DatasetsCallback is None:
            return callbacks
        return [c for c in callbacks if not isinstance(c, DatasetsCallback)]
