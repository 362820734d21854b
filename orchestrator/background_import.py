"""Import modules in a background thread while the caller does other start-up work.

A driver's start-up is mostly waiting on other processes (Ray's GCS and raylet starting, storage
round trips); the heavy imports it needs later (torch through Ray Train's TorchTrainer, diffusers
for a parameter count) overlap that wait instead of following it (issue 18).
Python's per-module import locks make a later ``import`` of the same module in another thread wait
for this one to finish rather than import it twice, so callers import as usual where they need a
module; the thread only starts it earlier. Give it modules that the caller is not importing at
the same moment through other paths (leaves such as torch and the network code, after the
caller's own imports of the packages around them): two threads each part-way through importing
modules that import each other would stop one of them with Python's import-deadlock error.
"""

from __future__ import annotations

import importlib
import threading


def _import_all(modules: tuple[str, ...]) -> None:
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            pass  # the caller's own import raises it where the module is needed, with its traceback


def import_in_background(*modules: str, name: str = "raydiff-import") -> threading.Thread:
    """Start importing ``modules`` in order in a daemon thread; returns the thread."""
    thread = threading.Thread(target=_import_all, args=(modules,), name=name, daemon=True)
    thread.start()
    return thread
