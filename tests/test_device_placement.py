"""Tensors that cross layers follow each layer's device (``device_map: auto`` puts layers on
different GPUs). CPU has one device, so a second one is stood in for: ``meta`` for the SAE (a CPU
weight meeting a meta activation raises), a mask usable only through ``.to(device)`` for the
padding mask. Each test fails when the fix it guards is reverted."""

from __future__ import annotations

import torch

from sponlab.analysis.capture import LayerAggregate, sae_targets
from sponlab.analysis.sae import SparseAutoencoder


def test_sae_features_run_on_the_device_of_their_layer():
    sae = SparseAutoencoder(8, 16)  # loaded on the host, as load_saes does
    x = torch.zeros(2, 3, 8, device="meta")  # the layer's activations on another device
    for aggregate_by in ("values", "gradients"):
        feats = sae_targets({0: sae}, aggregate_by)[0](x)
        assert feats.device.type == "meta" and feats.shape == (2, 3, 16)
    assert all(p.device.type == "meta" for p in sae.parameters())


class _MaskOnOtherDevice:
    """A padding mask held on another device: usable only through ``.to(device)``, which records
    the device asked for (meta cannot play this role: a meta mask has no data to copy)."""

    def __init__(self, mask: torch.Tensor) -> None:
        self.mask, self.asked = mask, []

    def to(self, device: torch.device) -> torch.Tensor:
        self.asked.append(torch.device(device))
        return self.mask.to(device)


def test_padding_mask_follows_the_activations_device():
    # the mask is built on the embedding device; a later layer's activations live elsewhere
    feats = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4)  # [B, T, F]
    mask = _MaskOnOtherDevice(torch.tensor([[True, True, False], [True, False, False]]))
    aggregate = LayerAggregate()
    aggregate.add(feats, mask)  # type: ignore[arg-type]
    assert mask.asked == [feats.device]
    assert aggregate.tokens == 3 and aggregate.total is not None
    assert aggregate.total.tolist() == [0 + 4 + 12, 1 + 5 + 13, 2 + 6 + 14, 3 + 7 + 15]
