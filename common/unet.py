"""The MONAI UNet's named parts that the algorithms address: its head (ANIL's adapted block)."""

from __future__ import annotations

import torch


def head_parameter_names(model: torch.nn.Module) -> list[str]:
    """Names of the head parameters: the last block of the UNet (its final up-sampling layer).

    ANIL adapts only these in the inner loop. For MONAI's UNet the network is
    ``Sequential(down, SkipConnection(...), up)``; the head is the last element's parameters.
    """
    inner = getattr(model, "model", None)
    if isinstance(inner, torch.nn.Sequential) and len(inner) > 0:
        last_index = len(inner) - 1
        prefix = f"model.{last_index}."
        names = [n for n, _ in model.named_parameters() if n.startswith(prefix)]
        if names:
            return names
    # Any other module: its last direct child that owns parameters.
    children = [(n, c) for n, c in model.named_children() if any(True for _ in c.parameters())]
    if not children:
        raise ValueError(f"{type(model).__name__} has no parameters, so it has no head to adapt.")
    last_name, last_child = children[-1]
    return [f"{last_name}.{n}" for n, _ in last_child.named_parameters()]


__all__ = ["head_parameter_names"]
