"""The torch device a run computes on: the one rule the ClientApp, the hospital's commands and the
centralised runs share."""

from __future__ import annotations

import torch


def pick_device(requested: str, where: str = "--device") -> torch.device:
    """``auto`` (a GPU when torch sees one), ``cpu``, ``cuda`` or ``cuda:N``.

    CUDA asked for on a machine without one is a RuntimeError naming ``where``, the option or run-config key
    the value came from (``--device``, ``run config device``); so is a name torch does not know.
    """
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"{where}={requested!r} but this node has no CUDA device; use 'auto' or 'cpu'.")
    return torch.device(requested)


__all__ = ["pick_device"]
