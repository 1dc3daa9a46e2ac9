"""Uncertainty of a mean, as every comparison reports it: a two-sided t-interval."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

# Margins and means are reported with a two-sided confidence interval at this level.
CONFIDENCE = 0.95


def interval(values: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float] | None:
    """Two-sided ``confidence`` t-interval of the mean of ``values`` (None with fewer than two)."""
    from scipy import stats  # here: scipy.stats takes seconds to import, and the benchmark's --help imports this module

    if len(values) < 2:
        return None
    mean, sem = float(np.mean(values)), float(np.std(values, ddof=1) / math.sqrt(len(values)))
    half = float(stats.t.ppf(0.5 + confidence / 2, len(values) - 1)) * sem
    return mean - half, mean + half


__all__ = ["CONFIDENCE", "interval"]
