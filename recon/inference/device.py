"""The device inference runs on: ``auto`` is CUDA where present, else the CPU.

The challenge's 3600 s budget is a limit on its GPU, so a verdict computed on the CPU of a machine
that has a GPU would be misleading; ``smartify submit`` and ``smartify reconstruct`` therefore
default to ``auto`` and record the device they resolved to.
"""

from __future__ import annotations

import torch

from recon.errors import InputError

AUTO = "auto"


def resolve_device(name: str) -> str:
    """The torch device ``name`` stands for, checked.

    Args:
        name: ``auto`` (``cuda`` when CUDA is available, else ``cpu``) or a torch device
            (``cpu``, ``cuda``, ``cuda:1``).

    Returns:
        The device as a string torch accepts (e.g. ``cuda`` or ``cpu``).

    Raises:
        InputError: not a torch device, or a CUDA device on a machine without CUDA.
    """
    if name.strip().lower() == AUTO:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise InputError(f"--device {name!r} is not a torch device (expected auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {name}: CUDA is not available on this machine (use auto or cpu)")
    return str(device)
