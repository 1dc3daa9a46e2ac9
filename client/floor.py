"""A site's own privacy floor: what it requires of a run before it takes part, set in its node config.

Every check a site makes under secure aggregation and local DP takes its numbers from the run config —
and the run config is the server's: a deviating server could simply send ``secure-aggregation = "none"``
or ``dp-noise-multiplier = 0.01`` and receive raw meta-gradients. The node config is the site
operator's (``flower-supernode --node-config``), so the floor lives there::

    --node-config "data-dir='/data/site' require-secure-aggregation='secagg+' require-dp='local'
                   min-dp-noise-multiplier=1.0 max-dp-clip-norm=1.0 min-secagg-sites=5 min-secagg-threshold=0.6"

A run below the floor is refused at every train-side message with a reply naming the setting (counted
as ``secagg-refused``: the site is not failing, the run is below what it agreed to).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from fedmeta.common.config import RunConfig
from fedmeta.common.protocol import (
    FLOOR_CLIP_KEY, FLOOR_DP_KEY, FLOOR_NOISE_KEY, FLOOR_SECURE_AGGREGATION_KEY, FLOOR_SITES_KEY,
    FLOOR_THRESHOLD_KEY,
)


def _number(node_config: Mapping[str, Any], key: str, default: float) -> float:
    value = node_config.get(key, default)
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number) or number < 0:
        raise ValueError(f"node config {key}={value!r}: must be a number >= 0 (the site's privacy floor).")
    return number


def floor_problem(config: RunConfig, node_config: Mapping[str, Any]) -> str | None:
    """Why the run config is below the site's floor, naming the setting, or None."""
    problems = []
    wanted = node_config.get(FLOOR_SECURE_AGGREGATION_KEY)
    if wanted not in (None, "", "none") and config.secure_aggregation != wanted:
        problems.append(f"{FLOOR_SECURE_AGGREGATION_KEY}={wanted!r} but the run has "
                        f"secure-aggregation={config.secure_aggregation!r}")
    wanted = node_config.get(FLOOR_DP_KEY)
    if wanted not in (None, "", "none") and config.dp != wanted:
        problems.append(f"{FLOOR_DP_KEY}={wanted!r} but the run has dp={config.dp!r}")
    sigma = _number(node_config, FLOOR_NOISE_KEY, 0.0)
    if sigma and (config.dp == "none" or config.dp_noise_multiplier < sigma):
        problems.append(f"{FLOOR_NOISE_KEY}={sigma:g} but the run has dp={config.dp!r}, "
                        f"dp-noise-multiplier={config.dp_noise_multiplier:g}")
    clip = _number(node_config, FLOOR_CLIP_KEY, 0.0)
    if clip and (config.dp == "none" or config.dp_clip_norm > clip):
        problems.append(f"{FLOOR_CLIP_KEY}={clip:g} but the run has dp={config.dp!r}, dp-clip-norm={config.dp_clip_norm:g}")
    fraction = _number(node_config, FLOOR_THRESHOLD_KEY, 0.0)
    if fraction and config.secagg_threshold < fraction:
        problems.append(f"{FLOOR_THRESHOLD_KEY}={fraction:g} but the run has secagg-threshold={config.secagg_threshold:g}")
    sites_floor(node_config)  # a bad value is the operator's error: named here, before any round
    return "; ".join(problems) or None


def sites_floor(node_config: Mapping[str, Any]) -> int:
    """The fewest sites whose sum this site helps unmask, by its own floor (0: none set)."""
    return int(_number(node_config, FLOOR_SITES_KEY, 0.0))


__all__ = ["floor_problem", "sites_floor"]
