"""``raydiff tune``: hyperparameter search where every trial is a full raydiff training run.

- ``config.py``: the ``tune:`` section (``TuneJob`` = ``TrainConfig`` + ``tune``), one typed tree;
- ``space.py``: search-space validation against the training config, conversion to Ray Tune;
- ``trainable.py``: the Tune function trainable that runs one trial's Ray Train run and reports
  its validation loss (and a checkpoint pointer) to Tune;
- ``cleanup.py``: removal of the placement groups of Train runs whose trial Tune stopped;
- ``runner.py``: searcher, scheduler, ``Tuner`` / ``Tuner.restore``;
- ``results.py``: results table (CSV), metric plot (PNG), best configuration as a job spec.
"""
