"""Ray Train's fixed-size scaling policy for a Ray session that has no autoscaler.

Ray Train 2.60's ``FixedScalingPolicy`` registers the run's resources with Ray Data's
``AutoscalingCoordinator`` when its controller starts and every 20 s after, so that an autoscaler
adds nodes for them. That detached actor is a process of its own (1.1-1.3 CPU-s on this
project's 2-core machine), and the controller waits for its reply (up to 5 s) before it starts the
worker group, so raydiff starts it with a local Ray (ray_session.py). A local Ray that ``raydiff
train`` starts for one run has no autoscaler to tell: there the trainer (train/trainer.py) uses
this policy, and the actor is not started at all (issue 18).

A module of its own: the controller unpickles the policy, and this import is all it needs (not
``ray.train.torch``, which would import torch into the controller).
"""

from __future__ import annotations

try:
    from ray.train.v2._internal.execution.scaling_policy import FixedScalingPolicy
except ImportError:  # another Ray Train layout: the trainer keeps Ray's own policy
    FixedScalingPolicy = None

if FixedScalingPolicy is not None:
    class NoAutoscalerScalingPolicy(FixedScalingPolicy):
        """``FixedScalingPolicy`` minus its resource requests: the same decisions (start and keep
        ``num_workers`` workers), no ``AutoscalingCoordinator``."""

        def after_controller_start(self, train_run_context) -> None:
            pass

        def _maybe_send_resource_request(self) -> None:
            pass

        def _cancel_resource_request(self) -> None:
            pass
else:
    NoAutoscalerScalingPolicy = None
