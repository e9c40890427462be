"""One place that attaches PyTorch hooks and always takes them off again.

Every hook in sponlab (sparsification, SPON biases, calibration recording, analysis captures) is
registered through :func:`installed`, so an exception half-way through registration or inside the
block can never leave a hook on the model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from sponlab.model.sites import Site, SiteMap


@contextmanager
def installed(registrations: Iterable[RemovableHandle]) -> Iterator[None]:
    """Keep the hooks that ``registrations`` registers attached inside the block.

    ``registrations`` is typically a generator expression of ``module.register_*_hook(...)``
    calls: it is consumed here, so the hooks registered before a failing registration are
    removed as well.
    """
    handles: list[RemovableHandle] = []
    try:
        for handle in registrations:
            handles.append(handle)
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def capture_inputs(
    model: nn.Module,
    site_map: SiteMap,
    sites: Sequence[Site],
    sink: Callable[[Site, torch.Tensor], None],
    prepend: bool = False,
) -> Iterator[None]:
    """Call ``sink(site, x)`` with the input ``[B, T, D_in]`` of every site's linear on each
    forward: the input the layer is given (``prepend``: before any other pre-hook, e.g. the
    sparsifying one, has changed it)."""
    with installed(
        site_map.linear(model, site).register_forward_pre_hook(
            lambda _m, args, site=site: sink(site, args[0]), prepend=prepend
        )
        for site in site_map.require(sites)
    ):
        yield


@contextmanager
def capture_outputs(
    model: nn.Module,
    site_map: SiteMap,
    sites: Sequence[Site],
    sink: Callable[[Site, torch.Tensor, torch.Tensor], None],
) -> Iterator[None]:
    """Call ``sink(site, x, y)`` with the input ``x`` [B, T, D_in] each site's linear used (after
    its pre-hooks) and its output ``y`` [B, T, D_out] on each forward."""
    with installed(
        site_map.linear(model, site).register_forward_hook(
            lambda _m, args, out, site=site: sink(site, args[0], out)
        )
        for site in site_map.require(sites)
    ):
        yield
