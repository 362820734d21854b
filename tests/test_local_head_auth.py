"""The local head's token authentication is decided by raydiff, not by what lies in ~/.ray
(fast: nothing is started)."""

from __future__ import annotations

import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchestrator.cluster.local_head import LocalHead


@pytest.fixture
def clean_auth_env(monkeypatch, tmp_path):
    for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    return tmp_path


def test_head_gets_a_token_of_its_own_that_its_jobs_inherit(clean_auth_env):
    (clean_auth_env / ".ray").mkdir()
    (clean_auth_env / ".ray" / "auth_token").write_text("someone-elses")
    head = LocalHead(num_cpus=1, temp_root=str(clean_auth_env))
    env = head.environment()
    assert env["RAY_AUTH_MODE"] == "token"
    assert env["RAY_AUTH_TOKEN_PATH"] == head.token_file
    assert Path(head.token_file).parent == Path(head.temp_dir)
    assert stat.S_IMODE(Path(head.token_file).stat().st_mode) == 0o600
    assert head.token == Path(head.token_file).read_text() and len(head.token) == 64
    assert head.token != LocalHead(num_cpus=1, temp_root=str(clean_auth_env)).token  # one per head


def test_head_respects_an_explicit_mode_or_token(clean_auth_env):
    off = LocalHead(num_cpus=1, env={"RAY_AUTH_MODE": "disabled"}, temp_root=str(clean_auth_env))
    assert off.token is None and off.token_file is None and off.environment()["RAY_AUTH_MODE"] == "disabled"
    given = LocalHead(num_cpus=1, env={"RAY_AUTH_TOKEN": "tok-123"}, temp_root=str(clean_auth_env))
    assert given.token == "tok-123" and given.token_file is None
    assert given.environment()["RAY_AUTH_MODE"] == "token" and given.environment()["RAY_AUTH_TOKEN"] == "tok-123"


def test_local_controller_rejects_a_bad_spec_before_starting_a_head(clean_auth_env):
    spec = clean_auth_env / "bad.yaml"
    spec.write_text("optim: {lr: -1}\n")
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "orchestrator", "controller", "run", "--local", "--db",
                          str(clean_auth_env / "c.db"), "--working-dir", str(clean_auth_env), str(spec)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "optim.lr" in out.stderr and "Traceback" not in out.stderr
    assert "started a local Ray head" not in out.stdout + out.stderr
    assert time.monotonic() - t0 < 60  # no head start (tens of seconds) in between
