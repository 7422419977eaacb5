"""Where device-agnostic code takes the CPU's path, and a switch that makes the CPU take the
accelerator's.

On the CPU reading a tensor's value costs nothing and an fp32 matmul is IEEE fp32 by default, so
some solvers stop at an exact fixed point, the protocol skips the identity averaging, and fp32
products use the BLAS directly. On an accelerator the same code runs its fixed work without
reading anything back, and its products do not depend on TF32. :func:`force_device_path` makes
the CPU run the accelerator's path, so that a machine without a GPU can test what runs on one.
"""

import contextlib
from collections.abc import Iterator

import torch

_forced = 0  # active force_device_path() blocks (process-wide: the hook may run on a worker)


def cpu_path(device: torch.device) -> bool:
    """Whether code on ``device`` takes the CPU's path: on the CPU, unless forced off."""
    return device.type == "cpu" and not _forced


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor on ``device`` without synchronising: through pinned memory and a
    non-blocking copy (a pageable host-to-device copy waits for the stream)."""
    if device.type == "cpu":
        return host
    return host.pin_memory().to(device, non_blocking=True)


@contextlib.contextmanager
def force_device_path() -> Iterator[None]:
    """Run the accelerator's code path on the CPU too, in every thread, until the block exits."""
    global _forced
    _forced += 1
    try:
        yield
    finally:
        _forced -= 1
