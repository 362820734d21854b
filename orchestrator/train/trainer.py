"""Ray Train's ``TorchTrainer`` as raydiff runs it: without torch in the driver and without the
helper actors a run does not need.

It is Ray Train's ``DataParallelTrainer`` with raydiff's process-group backend (train/backend.py),
which is all ``TorchTrainer`` adds for raydiff's workers; ``TorchTrainer``'s module
(``ray.train.torch``) imports torch, 1.2-1.4 CPU-s of every driver's and every Tune trial's
start-up on this project's 2-core machine (issue 18) for a process that never touches a tensor.

Ray Train 2.60 adds its default callbacks to every trainer (``DataParallelTrainer.
_create_default_callbacks``); two of them start an actor per run, each a new process (it inherits
the controller's runtime env, so no idle worker fits) importing Ray Data and Ray Train, started
while the workers import torch on the same cores (issue 18):

- the datasets callback's ``DatasetManager`` (1.4 CPU-s per run on this 2-core machine), even for
  a trainer given no datasets; raydiff's workers read through their own reader (data/reader.py),
  never through Ray Train's ``datasets=``;
- the ``PlacementGroupCleaner`` (1.8 CPU-s before the first step, then a state-API query every
  second for the whole run), which removes the run's placement group if the controller dies while
  the Ray session goes on (a Tune sweep's driver, a notebook). Left out when the Ray session ends
  with the run (a local Ray that ``raydiff train`` started itself shuts down with it, and
  everything it reserved with it) and when the session serves no state API for it to ask (a local
  Ray started without a dashboard: raydiff's own, and so every Tune trial of a local sweep, whose
  groups tune/cleanup.py frees instead; the tests' shared Ray): there it could only warn every
  second, or, with another Ray's dashboard on this machine, ask that one.

The same local Ray has no autoscaler to tell about the run's resources: there the controller
gets a scaling policy that asks none (train/scaling.py). And the controller sets up the workers'
process group through ``ProcessGroupConfig`` (train/backend.py), not ``TorchConfig``, so that it
never imports torch itself; and when the Ray session's processes already have the settings Ray
Train passes its controller and workers, neither gets a runtime env to pass them in
(train/session_env.py). Its controller registers the workers' reports (checkpoints) as fast as
they come, not one per poll interval (train/report_drain.py).
"""

from __future__ import annotations

import signal
import threading

import ray
from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

from orchestrator.ray_session import inherited, state_api_served
from orchestrator.train.backend import ProcessGroupConfig
from orchestrator.train.report_drain import ReportDrainingController
from orchestrator.train.session_env import SessionEnvController, controller_env
from orchestrator.train.scaling import FixedScalingPolicy, NoAutoscalerScalingPolicy

try:
    from ray.train.v2._internal.callbacks import DatasetsCallback
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
except ImportError:  # another Ray Train layout: keep its callbacks as they are
    DatasetsCallback = PlacementGroupCleanerCallback = None


class Trainer(DataParallelTrainer):
    """``TorchTrainer`` for raydiff's workers: its process group set up by ``ProcessGroupConfig``
    (gloo, NCCL where the workers have GPUs, as ``TorchTrainer`` chooses) unless another
    ``torch_config`` is given, minus the datasets callback when no datasets are given, minus the
    placement-group cleaner when ``ray_session_ends_with_run`` or the session serves no state API,
    and minus the autoscaler requests when ``ray_session_ends_with_run``."""

    def __init__(self, train_loop_per_worker, *, torch_config=None, ray_session_ends_with_run: bool = False, **kwargs):
        if torch_config is None:
            scaling = kwargs.get("scaling_config")
            torch_config = ProcessGroupConfig(backend="nccl" if scaling is not None and scaling.use_gpu else "gloo")
        super().__init__(train_loop_per_worker, backend_config=torch_config, **kwargs)
        self._ray_session_ends_with_run = ray_session_ends_with_run

    def _create_default_callbacks(self):
        callbacks = super()._create_default_callbacks()
        unneeded = []
        if not self.datasets and DatasetsCallback is not None:
            unneeded.append(DatasetsCallback)
        if (self._ray_session_ends_with_run or not state_api_served()) and PlacementGroupCleanerCallback is not None:
            unneeded.append(PlacementGroupCleanerCallback)
        return [c for c in callbacks if not isinstance(c, tuple(unneeded))]

    def _initialize_and_run_controller(self, **controller_init_kwargs):
        policy = controller_init_kwargs.get("scaling_policy")
        # (type None when Ray Train has another layout: Ray's own policy is kept)
        if self._ray_session_ends_with_run and type(policy) is FixedScalingPolicy:
            controller_init_kwargs["scaling_policy"] = NoAutoscalerScalingPolicy(policy.scaling_config)
        return self._run_controller(controller_init_kwargs)

    def _run_controller(self, controller_init_kwargs):
        """Ray Train 2.60's ``_initialize_and_run_controller`` with a controller that registers the
        workers' reports as fast as they come (train/report_drain.py), minus the runtime env when
        every process of the Ray session already has the variables it would set (a local Ray
        started with them, ray_session.py), with a worker group that does the same for the workers
        (train/session_env.py). In-process on this 2-core machine: workers phase 4.7 -> 4.2 s
        and 1.3 CPU-s less per run for the controller and its helper actors (issue 18)."""
        env = controller_env()
        if env is None:
            return super()._initialize_and_run_controller(**controller_init_kwargs)
        actor_cls, options = controller_actor(env)
        controller = ray.remote(**options)(actor_cls).remote(**controller_init_kwargs)
        # Outside the main thread (a Tune trial) a SIGINT handler cannot be registered.
        previous = None
        if threading.current_thread() is threading.main_thread():
            previous = signal.getsignal(signal.SIGINT)
            self._register_sigint_handler(controller)
        try:
            ray.get(controller.run.remote())
            return ray.get(controller.get_result.remote())
        finally:
            # Ray's handler holds the controller's handle, which keeps the controller alive (an
            # idle process, about 0.8% of a core here) while the Ray session lasts; and Ctrl-C after
            # the run (a notebook, the next run of a sweep) is for the caller again.
            if previous is not None:
                signal.signal(signal.SIGINT, previous)


def controller_actor(env: dict[str, str]) -> tuple[type, dict]:
    """Ray Train's controller class and actor options for a run whose controller needs the
    variables ``env``: on the driver's node like Ray's own, without a runtime env when every
    process of the session already has ``env`` (and a worker group that does the same), Ray's own
    way (the variables in a runtime env) otherwise; both drain reports (train/report_drain.py)."""
    options: dict = {"num_cpus": 0, "label_selector": {ray._raylet.RAY_NODE_ID_KEY: ray.get_runtime_context().get_node_id()}}
    if inherited(env):
        return SessionEnvController, options
    return ReportDrainingController, {**options, "runtime_env": {"env_vars": env}}
