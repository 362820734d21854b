"""The plan's parameter counts, remembered in raydiff's cache (orchestrator/param_counts.py): the
same numbers as counting, without importing diffusers, and never a stale one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fresh_python import run_fresh_python

from orchestrator import param_counts
from orchestrator.config import load_config
from orchestrator.plan import parameter_counts

@pytest.fixture()
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("RAYDIFF_CACHE_DIR", str(tmp_path))
    return tmp_path / "parameter-counts"


def test_a_count_is_counted_once_then_read_back_without_diffusers(cache):
    cfg = load_config(None, ["model.name=unet-tiny", "data.resolution=16"])
    assert param_counts.lookup(cfg.model, cfg.data) is None
    counted = parameter_counts(cfg.model, cfg.data)
    assert counted[0] == counted[1] > 100_000 and param_counts.lookup(cfg.model, cfg.data) == counted
    # A new process (the next run's driver) reads it back without importing the network code.
    code = ("import sys; from orchestrator.config import load_config; from orchestrator.plan import network_lines; "
            "cfg = load_config(None, ['model.name=unet-tiny', 'data.resolution=16']); print(network_lines(cfg)[0]); "
            "print('diffusers' in sys.modules, 'torch' in sys.modules)")
    line, imported = run_fresh_python(code).splitlines()
    assert f"{counted[1]:,} trainable of {counted[1]:,}" in line and imported == "False False"


def test_what_changes_a_count_changes_the_key(cache):
    def key(*overrides):
        cfg = load_config(None, ["model.name=unet-tiny", *overrides])
        return param_counts.cache_key(cfg.model, cfg.data)

    keys = [key(), key("model.name=unet-demo"), key("data.resolution=16"), key("data.conditional=false"),
            key("model.unet={block_out_channels: [16, 32]}")]
    assert len(set(keys)) == len(keys) and None not in keys
    assert key("optim.lr=1e-3") == key()  # the network does not depend on it
    # Files that can change under the same config are counted every time.
    assert key("model.name=unet-text-tiny", "data.captions=true", "model.text_encoder=/some/encoder") is None
    cfg = load_config(None, ["model.name=unet-tiny"])
    assert param_counts.cache_key(cfg.model.model_copy(update={"pretrained": "/some/pipeline"}), cfg.data) is None


def test_a_damaged_or_unwritable_cache_is_counted_again(cache):
    cfg = load_config(None, ["model.name=unet-tiny", "data.resolution=16"])
    counted = parameter_counts(cfg.model, cfg.data)
    (entry,) = cache.iterdir()
    entry.write_text("{not json")
    assert param_counts.lookup(cfg.model, cfg.data) is None
    assert parameter_counts(cfg.model, cfg.data) == counted
    assert json.loads(entry.read_text()) == {"trainable": counted[0], "total": counted[1]}  # rewritten
    for f in cache.iterdir():
        f.unlink()
    cache.rmdir()
    cache.write_text("a file where the cache's folder goes")  # unwritable, even for root
    assert parameter_counts(cfg.model, cfg.data) == counted  # not cached, still counted
    assert param_counts.lookup(cfg.model, cfg.data) is None
