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
    DATA_DIR_KEY, FLOOR_CLIP_KEY, FLOOR_DP_KEY, FLOOR_NOISE_KEY, FLOOR_SECURE_AGGREGATION_KEY, FLOOR_SITES_KEY,
    FLOOR_THRESHOLD_KEY,
)


def _number(node_config: Mapping[str, Any], key: str, default: float, *, positive: bool = False,
            integer: bool = False) -> float:
    value = node_config.get(key, default)
    try:
        number = math.nan if isinstance(value, bool) else float(value)
    except (TypeError, ValueError):
        number = math.nan
    bad = not math.isfinite(number) or number < 0 or (positive and key in node_config and number <= 0)
    if bad or (integer and number != int(number)):
        kind = "a whole number" if integer else "a number"
        raise ValueError(f"node config {key}={value!r}: must be {kind} {'> 0' if positive else '>= 0'} (the site's "
                         "privacy floor).")
    return number


def floor_problem(config: RunConfig, node_config: Mapping[str, Any]) -> str | None:
    """Why the run config is below the site's floor, naming the setting, or None.

    Any DP setting in the floor means local DP (a site cannot check noise a server says it adds) without
    reproducible noise; any secure-aggregation setting, or a DP one, means secure aggregation.
    """
    secure_wanted = _choice(node_config, FLOOR_SECURE_AGGREGATION_KEY, ("secagg+",))
    dp_wanted = _choice(node_config, FLOOR_DP_KEY, ("local",))
    sigma = _number(node_config, FLOOR_NOISE_KEY, 0.0)
    clip = _number(node_config, FLOOR_CLIP_KEY, 0.0, positive=True)
    fraction = _number(node_config, FLOOR_THRESHOLD_KEY, 0.0)
    sites = sites_floor(node_config)
    dp_floor = bool(dp_wanted or sigma or clip)
    secure_floor = bool(secure_wanted or dp_floor or fraction or sites)
    problems = []
    if secure_floor and config.secure_aggregation != "secagg+":
        problems.append(f"the floor ({_named(node_config)}) needs secure-aggregation='secagg+' but the run has "
                        f"{config.secure_aggregation!r}")
    if dp_floor and config.dp != "local":
        problems.append(f"the floor ({_named(node_config)}) needs dp='local' (noise the site adds itself) but the run "
                        f"has dp={config.dp!r}")
    if dp_floor and config.dp_seeded_noise:
        problems.append("the run has dp-seeded-noise=true: noise anyone with the run config can regenerate")
    if sigma and config.dp_noise_multiplier < sigma:
        problems.append(f"{FLOOR_NOISE_KEY}={sigma:g} but the run has "
                        f"dp-noise-multiplier={config.dp_noise_multiplier:g}")
    if clip and config.dp_clip_norm > clip:
        problems.append(f"{FLOOR_CLIP_KEY}={clip:g} but the run has dp-clip-norm={config.dp_clip_norm:g}")
    if fraction and config.secagg_threshold < fraction:
        problems.append(f"{FLOOR_THRESHOLD_KEY}={fraction:g} but the run has "
                        f"secagg-threshold={config.secagg_threshold:g}")
    if config.dp_seeded_noise and DATA_DIR_KEY in node_config and config.dp != "none":
        # A deployed site (it names its data folder): reproducible noise is a simulation device, never a defence.
        problems.append("the run has dp-seeded-noise=true, which is for simulations only")
    return "; ".join(problems) or None


def _named(node_config: Mapping[str, Any]) -> str:
    keys = (FLOOR_SECURE_AGGREGATION_KEY, FLOOR_DP_KEY, FLOOR_NOISE_KEY, FLOOR_CLIP_KEY, FLOOR_SITES_KEY,
            FLOOR_THRESHOLD_KEY)
    return ", ".join(f"{k}={node_config[k]!r}" for k in keys if k in node_config)


def _choice(node_config: Mapping[str, Any], key: str, allowed: tuple[str, ...]) -> str | None:
    value = node_config.get(key)
    if value in (None, "", "none"):
        return None
    if value not in allowed:
        raise ValueError(f"node config {key}={value!r}: use {' or '.join(repr(a) for a in allowed)} (or 'none'); "
                         "a site can only require what it can check itself.")
    return str(value)


def sites_floor(node_config: Mapping[str, Any]) -> int:
    """The fewest sites whose sum this site helps unmask, by its own floor (0: none set)."""
    return int(_number(node_config, FLOOR_SITES_KEY, 0.0, integer=True))


__all__ = ["floor_problem", "sites_floor"]
