"""The decoded training set, built while the training workers start.

Decoding every training sample into the object store (the reader's cache, data/reader.py) took
most of the seconds between Ray's start and the workers' (issue 18). Nothing needs the decoded
blocks until a rank's first batch, after its process, its imports and its engine are up, so a
small actor decodes them meanwhile and the driver goes straight on to start the workers. The
actor owns the blocks (Ray's ownership: objects live as long as their owner), so the driver
keeps it until training ends.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from orchestrator.config import DataConfig
    from orchestrator.data.info import DatasetInfo


class _Decoder:
    """Runs the training set's Ray Data decode; its process owns the resulting blocks."""

    def __init__(self, verbose: bool) -> None:
        from orchestrator.logs import configure_worker

        # Per process: the driver's filters and Ray Data settings do not reach an actor.
        configure_worker(verbose)
        self.verbose = verbose

    def decode(self, cfg: "DataConfig", info: "DatasetInfo", counter_name: str | None) -> list[Any]:
        import ray

        from orchestrator.data.pipeline import build_train_dataset, decode_here, decodes_here

        if decodes_here(cfg, info):  # small and local: no Ray Data job (its process starts cost more)
            return [ray.put(block) for block in decode_here(cfg, info, counter_name=counter_name)]
        # Ray Data only here: importing it is 0.6 CPU-s that the decode above does without.
        from ray.data import DataContext

        DataContext.get_current().enable_progress_bars = self.verbose
        return build_train_dataset(cfg, info, counter_name=counter_name).to_numpy_refs()


@dataclass
class BackgroundDecode:
    """A decode under way: ``blocks`` resolves to the list of block ObjectRefs."""

    actor: Any
    blocks: Any  # ObjectRef[list[ObjectRef]]

    def error(self) -> BaseException | None:
        """The decode's own exception when it has failed (for the driver's message), else None."""
        import ray

        ready, _ = ray.wait([self.blocks], timeout=0)
        if not ready:
            return None
        try:
            ray.get(self.blocks)
        except ray.exceptions.RayTaskError as e:
            return e.as_instanceof_cause()
        except ray.exceptions.RayError as e:
            return e
        return None

    def stop(self) -> None:
        import ray

        ray.kill(self.actor)


def decode_in_background(cfg: "DataConfig", info: "DatasetInfo", *, counter_name: str | None,
                         verbose: bool) -> BackgroundDecode:
    import ray

    # num_cpus=0: it waits on its Ray Data tasks, which ask for CPUs of their own.
    actor = ray.remote(num_cpus=0)(_Decoder).remote(verbose)
    return BackgroundDecode(actor, actor.decode.remote(cfg, info, counter_name))
