"""Config errors found by the reliability pass: non-finite numbers, and job files that are not
readable YAML text, each a one-line message with exit code 2 (no traceback)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.cli import main
from orchestrator.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("override, shown", [
    ("optim.lr=nan", "optim.lr: must be a finite number, got nan"),
    ("optim.lr=inf", "optim.lr: must be a finite number, got inf"),
    ("optim.lr=.nan", "optim.lr: must be a finite number, got nan"),
    ("optim.weight_decay=inf", "optim.weight_decay: must be a finite number, got inf"),  # had no upper bound: accepted
    ("diffusion.min_snr_gamma=-inf", "diffusion.min_snr_gamma: must be a finite number, got -inf"),
    ("storage.s3.read_timeout_s=nan", "storage.s3.read_timeout_s: must be a finite number, got nan"),
])
def test_non_finite_floats_are_named(override, shown):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert shown in str(e.value)
    assert "less than" not in str(e.value) and "greater than" not in str(e.value)


def test_finite_values_still_checked_against_their_range():
    with pytest.raises(ConfigError, match=r"optim.lr=2.0: Input should be less than or equal to 1"):
        load_config(None, ["optim.lr=2.0"])
    assert load_config(None, ["optim.lr=3e-4"]).optim.lr == 3e-4


def _cli(capsys, *args: str) -> tuple[int, str]:
    rc = main(["train", "--dry-run", *args])
    return rc, capsys.readouterr().err


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("raydiff: config file ")
    return lines[0]


def test_binary_config_is_one_line_exit_2(tmp_path, capsys):
    f = tmp_path / "weights.yaml"
    f.write_bytes(bytes(range(256)) * 4)
    rc, err = _cli(capsys, "--config", str(f))
    assert rc == 2
    assert "is not a text file" in _one_line(err)


def test_directory_config_is_one_line_exit_2(tmp_path, capsys):
    rc, err = _cli(capsys, "--config", str(tmp_path))
    assert rc == 2
    assert "is a directory" in _one_line(err)


def test_device_config_is_refused_without_reading(capsys):
    rc, err = _cli(capsys, "--config", "/dev/zero")  # reading it would never end
    assert rc == 2
    assert "is not a regular file" in _one_line(err)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_config_by_mode(tmp_path, capsys):
    f = tmp_path / "secret.yaml"
    f.write_text("run: {name: x}\n")
    f.chmod(0)
    rc, err = _cli(capsys, "--config", str(f))
    assert rc == 2
    assert "cannot be read (Permission denied)" in _one_line(err)


def test_unreadable_config_io_error(capsys):
    # A regular file whose read fails for every user, root included: offset 0 of the process's
    # own memory is unmapped, so the read ends in EIO.
    rc, err = _cli(capsys, "--config", "/proc/self/mem")
    assert rc == 2
    assert "cannot be read (Input/output error)" in _one_line(err)


def test_malformed_yaml_is_one_line(tmp_path, capsys):
    f = tmp_path / "bad.yaml"
    f.write_text("run:\n  name: [unclosed\n")
    rc, err = _cli(capsys, "--config", str(f))
    assert rc == 2
    assert "is not valid YAML" in _one_line(err) and "line 3" in err


def test_binary_config_in_a_real_process_has_no_traceback(tmp_path):
    f = tmp_path / "model.ckpt"
    f.write_bytes(b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19." * 64)  # a pickle header, as in a checkpoint
    p = subprocess.run([sys.executable, "-m", "orchestrator", "train", "--config", str(f), "--dry-run"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert "Traceback" not in p.stderr
    assert p.stderr.strip() == f"raydiff: config file {str(f)!r} is not a text file (byte 0 is not UTF-8). " \
                               "Fix: pass a YAML job file (see jobs/*.yaml)"


@pytest.mark.parametrize("text", ["", "# nothing set yet\n", "\n\n"])
def test_empty_job_file_is_one_line_exit_2(tmp_path, capsys, text):
    f = tmp_path / "job.yaml"
    f.write_text(text)
    rc, err = _cli(capsys, "--config", str(f))
    assert rc == 2
    assert "is empty" in _one_line(err)


def test_overrides_after_options_are_overrides(capsys):
    # argparse stops the overrides positional at the first option; later key=value words count too.
    assert main(["train", "--dry-run", "optim.lr=3e-4", "--verbose", "optim.steps=7"]) == 0
    out = capsys.readouterr().out
    assert "lr: 0.0003" in out and "steps: 7" in out
    with pytest.raises(SystemExit) as e:
        main(["train", "--dry-run", "--no-such-flag"])
    assert e.value.code == 2
    assert "unrecognized arguments: --no-such-flag" in capsys.readouterr().err
