"""The workers' torch.distributed process group, set up without importing torch into Ray Train's
controller.

``TorchTrainer`` hands its controller a ``TorchConfig``, whose module (``ray.train.torch.config``)
imports torch at the top: unpickling it in the controller process costs about a second of CPU
(1.0-1.2 s on this project's 2-core machine), and the controller does it before it asks for a
single worker, on every run, every resume and every Tune trial (issue 18). The controller only
sends functions to the workers; torch is needed there, not here. ``ProcessGroupConfig`` is the
same set-up as ``TorchConfig`` for the backends raydiff trains with (gloo on CPU, NCCL on GPU):
Ray's own worker-side functions do the work, imported inside the worker process.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Literal

from ray.train._internal.utils import get_address_and_port
from ray.train.backend import Backend, BackendConfig

try:
    from ray.train.v2._internal.util import TrainingFramework
except ImportError:  # another Ray Train layout: no framework to report
    TrainingFramework = None

logger = logging.getLogger(__name__)


@dataclass
class ProcessGroupConfig(BackendConfig):
    """``TorchConfig``'s fields, for a gloo or NCCL process group over the run's workers
    (rendezvous through ``MASTER_ADDR``/``MASTER_PORT``: TorchConfig's default ``env`` method)."""

    backend: Literal["gloo", "nccl"] = "gloo"
    timeout_s: int = 1800

    @property
    def backend_cls(self):
        return ProcessGroupBackend

    @property
    def train_func_context(self):
        return DeviceContext

    @property
    def framework(self):
        # Ray Train's run state records torch's version, read on a worker.
        return TrainingFramework.TORCH if TrainingFramework is not None else None

    def to_dict(self) -> dict:
        return {"backend": self.backend, "init_method": "env", "timeout_s": self.timeout_s}


class DeviceContext:
    """``TorchConfig``'s context around the training function (the worker's default CUDA device)."""

    def __enter__(self):
        from ray.train.torch.config import TorchConfigContextManager

        self._inner = TorchConfigContextManager()
        return self._inner.__enter__()

    def __exit__(self, *exc):
        return self._inner.__exit__(*exc)


def _set_master(addr: str, port: int) -> None:
    os.environ["MASTER_ADDR"] = addr
    os.environ["MASTER_PORT"] = str(port)


def _set_rank_env() -> None:
    from ray.train.torch.config import _set_torch_distributed_env_vars

    _set_torch_distributed_env_vars()


def _init_process_group(**kwargs) -> None:
    from ray.train.torch.config import _setup_torch_process_group

    _setup_torch_process_group(**kwargs)


def _shutdown(destroy_process_group: bool) -> None:
    from ray.train.torch.config import _shutdown_torch

    _shutdown_torch(destroy_process_group=destroy_process_group)


class ProcessGroupBackend(Backend):
    """``_TorchBackend.on_start``/``on_shutdown`` of Ray 2.60 for gloo and NCCL, run from the
    controller with every torch call on the workers."""

    share_cuda_visible_devices: bool = True  # as torch's: NCCL peers on a node see each other's GPUs

    def on_start(self, worker_group, backend_config: ProcessGroupConfig) -> None:
        import ray

        addr, port = worker_group.execute_single(0, get_address_and_port)
        worker_group.execute(_set_master, addr=addr, port=port)
        # RANK, LOCAL_RANK, WORLD_SIZE, ... before init_process_group, as torchrun sets them.
        worker_group.execute(_set_rank_env)
        ray.get([worker_group.execute_single_async(i, _init_process_group, backend=backend_config.backend,
                                                   world_rank=i, world_size=len(worker_group),
                                                   init_method="env://", timeout_s=backend_config.timeout_s)
                 for i in range(len(worker_group))])

    def on_shutdown(self, worker_group, backend_config: ProcessGroupConfig) -> None:
        import ray
        from ray._private import ray_constants
        from ray.exceptions import GetTimeoutError
        from ray.train.constants import (DEFAULT_TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S,
                                         TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S)

        futures = worker_group.execute_async(_shutdown, destroy_process_group=len(worker_group) > 1)
        timeout_s = ray_constants.env_integer(TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S,
                                              DEFAULT_TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S)
        try:
            ray.get(futures, timeout=timeout_s)
        except GetTimeoutError:
            logger.warning("torch process group shutdown timed out after %s seconds", timeout_s)
