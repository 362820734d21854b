"""EMA: decay schedule, closed-form averaging, swap_into, state_dict round trip, bf16."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from model.ema import EMA


def _net(dtype=torch.float32):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).to(dtype)
    return net


def _set(net, value):
    with torch.no_grad():
        for p in net.parameters():
            p.fill_(value)


def test_decay_schedule_warmup_and_constant():
    ema = EMA(_net(), decay=0.999, warmup=True, warmup_power=2 / 3)
    assert ema.get_decay(0) == 0.0
    assert ema.get_decay(1) == pytest.approx(1 - 2 ** (-2 / 3))
    assert ema.get_decay(10) == pytest.approx(1 - 11 ** (-2 / 3))
    assert ema.get_decay(10**9) == 0.999  # capped at decay
    assert EMA(_net(), decay=0.9, warmup=False).get_decay(0) == 0.9


def test_closed_form_after_updates():
    net = _net()
    ema = EMA(net, decay=0.5, warmup=False)
    init = {n: p.detach().clone() for n, p in net.named_parameters()}
    _set(net, 1.0)
    assert ema.update(net) == 0.5
    _set(net, 3.0)
    ema.update(net)
    # s2 = d^2 s0 + d (1-d) 1 + (1-d) 3 with d = 0.5
    for n, s in ema.shadow_params.items():
        torch.testing.assert_close(s, 0.25 * init[n] + 0.25 * 1.0 + 0.5 * 3.0)
    assert ema.num_updates == 2

    # With warmup, update 0 copies (d_0 = 0), update 1 uses d_1 = 1 - 2^(-2/3).
    net2 = _net()
    ema2 = EMA(net2, decay=0.9999, warmup=True)
    _set(net2, 2.0)
    ema2.update(net2)
    _set(net2, 5.0)
    ema2.update(net2)
    d1 = 1 - 2 ** (-2 / 3)
    for s in ema2.shadow_params.values():
        torch.testing.assert_close(s, torch.full_like(s, d1 * 2.0 + (1 - d1) * 5.0))


def test_explicit_step_overrides_counter():
    net = _net()
    ema = EMA(net, decay=0.99)
    assert ema.update(net, step=5) == pytest.approx(1 - 6 ** (-2 / 3))
    assert ema.num_updates == 6


def test_swap_into_restores_even_on_exception():
    net = _net()
    ema = EMA(net, decay=0.5, warmup=False)
    _set(net, 4.0)
    ema.update(net)
    before = {n: t.clone() for n, t in net.state_dict().items()}
    with ema.swap_into(net):
        for n, p in net.named_parameters():
            torch.testing.assert_close(p, ema.shadow_params[n])
    for n, t in net.state_dict().items():
        assert torch.equal(t, before[n])
    with pytest.raises(RuntimeError, match="boom"):
        with ema.swap_into(net):
            raise RuntimeError("boom")
    for n, t in net.state_dict().items():
        assert torch.equal(t, before[n])


def test_state_dict_round_trip_and_copy_to():
    net = _net()
    ema = EMA(net, decay=0.9)
    _set(net, 1.5)
    ema.update(net)
    ema.update(net)
    state = ema.state_dict()
    other = EMA(_net(), decay=0.1, warmup=False)
    other.load_state_dict(state)
    assert other.decay == 0.9 and other.warmup and other.num_updates == 2
    for n in ema.shadow_params:
        assert torch.equal(other.shadow_params[n], ema.shadow_params[n])
    target = _net()
    other.copy_to(target)
    for n, p in target.named_parameters():
        assert torch.equal(p, ema.shadow_params[n])
    with pytest.raises(ValueError, match="missing"):
        other.load_state_dict({"decay": 0.9})
    with pytest.raises(ValueError, match="match"):
        EMA(nn.Linear(2, 2)).load_state_dict(state)


def test_bf16_module_keeps_fp32_shadow():
    net = _net(torch.bfloat16)
    ema = EMA(net, decay=0.9999, warmup=False)
    assert all(s.dtype == torch.float32 for s in ema.shadow_params.values())
    start = {n: s.clone() for n, s in ema.shadow_params.items()}
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    for _ in range(3):
        ema.update(net)
    # Each update moves by 1e-4 * (p - s): far below bf16 resolution (~4e-3 near 1) but
    # visible in the fp32 shadow.
    for n, s in ema.shadow_params.items():
        delta = (s - start[n]).abs().max().item()
        assert 1e-4 < delta < 1e-3
    with ema.swap_into(net):
        assert all(p.dtype == torch.bfloat16 for p in net.parameters())
