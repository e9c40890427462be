"""One place that attaches PyTorch hooks and always takes them off again.

Every hook in sponlab (sparsification, SPON biases, calibration recording, analysis captures) is
registered through :func:`installed`, so an exception half-way through registration or inside the
block can never leave a hook on the model.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from torch.utils.hooks import RemovableHandle


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
