"""raydiff orchestration: Ray Data / Train / Tune / Jobs glue, controller and CLI."""
