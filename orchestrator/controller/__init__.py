"""The job controller: submits raydiff job specs to a Ray cluster with the Ray Jobs API, watches
them, and resubmits a job whose driver failed or was lost under the same run name (so that it
resumes from its latest good checkpoint), with backoff and a cap on restarts; failures that are
the user's (invalid config, import error, missing data) are not retried.

- ``state``: the controller's memory in SQLite (jobs and attempts), so that the controller can be
  killed and started again without losing track of its jobs.
- ``policy``: whose fault a failed job is, and how long to wait before the next attempt.
- ``runner``: the watch loop.
- ``head``: a local Ray head owned by ``raydiff controller run --local``.

The command line is ``orchestrator/cli/controller.py``.
"""
