"""Run a snippet in a new Python process with the project importable: for the tests that check
what a process imports (a fresh interpreter has nothing imported yet, unlike pytest's)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_fresh_python(code: str, timeout: float = 120) -> str:
    """``python -c code`` from the repo root; asserts it succeeded and returns its stripped stdout."""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip()
