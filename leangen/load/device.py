"""The ``device`` setting: ``auto`` and a named device, checked against this machine."""

from __future__ import annotations

from typing import Callable

import torch

from leangen.errors import ConfigError, LeangenError

# Device types leangen runs on, each with how to tell that this machine has one.
DEVICE_AVAILABLE: dict[str, Callable[[], bool]] = {
    "cpu": lambda: True,
    "cuda": lambda: torch.cuda.is_available(),
    "mps": lambda: torch.backends.mps.is_available(),
}


def auto_device() -> torch.device:
    """What ``device: auto`` means: the GPU when torch sees one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(device: str | torch.device) -> torch.device:
    """``device`` as a torch device this machine has; ``auto`` as ``auto_device``."""
    if device == "auto":
        return auto_device()
    try:
        device = torch.device(device)
    except RuntimeError as e:  # torch's message lists some twenty device types: not worth a line
        raise ConfigError(f"device '{device}' is not a torch device. Use auto, cpu, cuda or cuda:N.") from e
    available = DEVICE_AVAILABLE.get(device.type)
    if available is None:
        raise ConfigError(f"device '{device}': leangen runs on {', '.join(DEVICE_AVAILABLE)}; "
                          "use one of those (or auto).")
    if not available():
        raise LeangenError(
            f"device '{device}' was asked for, but this torch ({torch.__version__}) sees no "
            f"{device.type.upper()} device. Use device: cpu (or auto)."
        )
    return device
