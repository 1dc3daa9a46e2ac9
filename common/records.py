"""Tensors to and from Flower records: the one place in ``common/`` that knows Flower.

Parameters travel as one ArrayRecord: θ under its parameter names and, for Meta-SGD, the step
sizes under ``lr.<name>`` (the same keys ``fedmeta.common.meta.meta_gradient`` returns its gradients under).
"""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, MetricRecord

from fedmeta.common.meta import STEP_SIZE_PREFIX


def to_array_record(tensors: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """Packs named tensors (any device) into an ArrayRecord, keeping names, shapes and dtypes."""
    record = ArrayRecord()
    for name, tensor in tensors.items():
        record[name] = Array(tensor.detach().cpu().contiguous().numpy())
    return record


def from_array_record(record: ArrayRecord, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Unpacks an ArrayRecord into writable tensors on ``device``."""
    out = {}
    for name, array in record.items():
        # np.load hands back a read-only buffer; torch warns on those and in-place ops would fail.
        out[name] = torch.from_numpy(np.array(array.numpy(), copy=True)).to(device)
    return out


def pack_params(params: Mapping[str, torch.Tensor], step_sizes: Mapping[str, torch.Tensor] | None) -> ArrayRecord:
    """θ plus optional Meta-SGD step sizes (stored as ``lr.<name>``) in one record."""
    tensors = dict(params)
    for name, alpha in (step_sizes or {}).items():
        tensors[STEP_SIZE_PREFIX + name] = alpha
    return to_array_record(tensors)


def split_params(
    tensors: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """Inverse of :func:`pack_params`: (θ, step sizes or None)."""
    params = {k: v for k, v in tensors.items() if not k.startswith(STEP_SIZE_PREFIX)}
    steps = {k[len(STEP_SIZE_PREFIX):]: v for k, v in tensors.items() if k.startswith(STEP_SIZE_PREFIX)}
    return params, (steps or None)


def to_metric_record(metrics: Mapping[str, float | int]) -> MetricRecord:
    """Scalar metrics only; a tensor, string or non-finite value is a programming error here."""
    record = MetricRecord()
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"metric {key!r} must be an int or float, got {type(value).__name__}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"metric {key!r} is {value}; only finite values may leave a site")
        record[key] = value
    return record


__all__ = [
    "STEP_SIZE_PREFIX",
    "from_array_record",
    "pack_params",
    "split_params",
    "to_array_record",
    "to_metric_record",
]
