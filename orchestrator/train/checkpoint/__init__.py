"""The checkpoint lifecycle, owned by ``Checkpointer`` (manager.py) and, inside the training
workers, ``TrainCheckpointer`` (training.py). The pieces, each importing only those above it:

- ``layout``: what a checkpoint directory holds, its name, the listing of a run's checkpoints.
- ``persist``: the per-rank manifest, and ``PersistCheckpoint`` (Ray Train's async upload).
- ``verify``: whether a checkpoint can be trusted; the newest good one; set aside, prune.
- ``elastic``: re-sharding at another world size (DeepSpeed's universal checkpoint).
- ``files``: writing and reading one checkpoint directory (engine, EMA).
- ``warmstart``: a run's own hyperparameters on top of another run's checkpoint.
- ``manager``: ``Checkpointer``, the decisions that need no engine (driver, sample, export, eval).
- ``training``: ``TrainCheckpointer``, restore / save / rollback through the engine.
- ``events``: ``CheckpointEvents`` (driver side): the ``checkpoint`` event once every rank
  committed, then pruning to ``checkpoint.keep``.
"""
