"""The one hook context manager and the device batch loop."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sponlab.io.data import device_batches
from sponlab.model.hooks import installed


def _hook_count(module: nn.Module) -> int:
    return len(module._forward_pre_hooks) + len(module._forward_hooks)


def test_installed_removes_hooks_after_the_block_and_on_error():
    layers = [nn.Linear(3, 3) for _ in range(3)]
    with installed(m.register_forward_pre_hook(lambda _m, a: None) for m in layers):
        assert [_hook_count(m) for m in layers] == [1, 1, 1]
    assert [_hook_count(m) for m in layers] == [0, 0, 0]
    with (
        pytest.raises(RuntimeError),
        installed(m.register_forward_hook(lambda *a: None) for m in layers),
    ):
        raise RuntimeError("inside")
    assert [_hook_count(m) for m in layers] == [0, 0, 0]


def test_installed_removes_what_was_registered_when_a_registration_fails():
    layers = [nn.Linear(3, 3) for _ in range(2)]

    def registrations():
        yield layers[0].register_forward_pre_hook(lambda _m, a: None)
        raise KeyError("second site unknown")

    with pytest.raises(KeyError), installed(registrations()):
        pass
    assert _hook_count(layers[0]) == 0


def test_device_batches_cover_blocks_in_order_on_the_device():
    blocks = torch.arange(7 * 4).reshape(7, 4)
    got = list(device_batches(blocks, 3, torch.device("cpu"), "test"))
    assert [start for start, _ in got] == [0, 3, 6]
    assert [len(ids) for _, ids in got] == [3, 3, 1]
    assert torch.equal(torch.cat([ids for _, ids in got]), blocks)
    meta = list(device_batches(blocks, 4, torch.device("meta"), "test"))
    assert all(ids.device.type == "meta" for _, ids in meta)
