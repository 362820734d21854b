"""Input checks that never stall a GPU.

Reading a value of a CUDA tensor on the host (``int(t.min())``, ``.item()``) waits for every
kernel queued before it: one such check per training step serialises the CPU and the GPU and
costs the overlap that keeps the GPU busy. Range checks therefore run only on CPU tensors,
where they are free; on accelerators the data was already checked where it entered (the data
pipeline validates labels, timesteps are drawn in range), and an out-of-range index still fails
inside the indexing kernel, only later and with a less precise message.
"""

from __future__ import annotations

from torch import Tensor


def check_range(x: Tensor, low: int, high: int, message: str) -> None:
    """Raise ``ValueError`` (``message`` and the range found) unless every element lies in
    ``[low, high]``; CPU tensors only, see the module docstring."""
    if x.device.type != "cpu" or not x.numel():
        return
    lo, hi = int(x.min()), int(x.max())
    if lo < low or hi > high:
        raise ValueError(f"{message}, got range [{lo}, {hi}]")
