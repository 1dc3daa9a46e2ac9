"""How the round's accepted replies become one update for θ: the weighted mean, a Byzantine-robust
rule, or the differentially private mean of clipped replies.

The median and trimmed mean are Flower 1.41's own (``flwr.server.strategy.aggregate``), applied per
array in float64; Multi-Krum scores replies as Flower's ``aggregate_krum`` does, once, so that the
round record can say which replies it kept (Flower returns only their average). Flower's trimmed mean
cuts ``int(β·n)`` replies per side, which is none of 3 replies at β = 0.2, so one hostile site among
three would pass untouched: fedmeta cuts at least one per side whenever 3 or more answered. Robust
rules weigh every reply alike — a weight a site claims is exactly what a hostile site would inflate.

Whatever the rule, each reply is first scaled down to at most ``median-norm-bound`` times the round's
lower median reply norm (norm bounding, Sun et al. 2019, "Can you really backdoor federated
learning?"). The bound comes from the round's own replies, so it needs no tuning per model, and the
lower median is one that a minority of sites cannot raise: with two replies it is the smaller one.
Without it a single finite reply ×1e30 overflows Adam's second moment and freezes θ for good, and a
×1000 reply dominates the mean. The default, 1, lets no reply count for more than the median one:
Adam follows the mean's direction, so at 3 one boosted site of three still steers it (smoke, measured:
0-step Dice 0.286 under ×1e30 against 0.366 clean; at 1: 0.356 against 0.367). Central DP clips to its
own C instead, and secure aggregation never shows the server a single reply (the sites clip
elementwise before masking).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from flwr.server.strategy.aggregate import aggregate_median, aggregate_trimmed_avg

from fedmeta.common.config import RunConfig
from fedmeta.common.federated_round import bound_replies, weighted_mean
from fedmeta.common.privacy import add_gaussian_noise, clip_update, noise_generator

log = logging.getLogger("fedmeta.server")

Update = Mapping[str, torch.Tensor]


@dataclass
class Aggregate:
    """The round's combined update and what the server did to get it (a round record's ``aggregation``)."""

    update: dict[str, torch.Tensor]
    rule: str
    replies: int
    trimmed_per_side: int = 0
    krum_selected: list[int] | None = None  # positions (in site order) Multi-Krum kept
    # Central DP: replies whose norm exceeded dp-clip-norm. Kept for tests, never put in the round record:
    # a count of the sites' data released without noise is outside what the accountant's epsilon covers.
    clipped: int = 0
    noise_std: float = 0.0  # central DP: std of the noise added to the mean
    note: str = ""  # why the rule could not give its guarantee this round (too few replies), or ""
    norms: list[float] | None = None  # each reply's L2 norm before bounding, in site order
    norm_bound: float = 0.0  # median-norm-bound x the round's lower median norm; 0 = not bounded this round
    bounded: list[int] | None = None  # positions (in site order) scaled down to norm_bound

    def record(self) -> dict:
        out: dict = {"rule": self.rule, "replies": self.replies}
        if self.rule == "trimmed-mean":
            out["trimmed_per_side"] = self.trimmed_per_side
        if self.krum_selected is not None:
            out["krum_selected"] = self.krum_selected
        if self.noise_std:
            out["noise_std"] = self.noise_std
        if self.note:
            out["note"] = self.note
        if self.norm_bound:
            out["norm_bound"] = self.norm_bound
            out["bounded"] = self.bounded or []
        return out


def trim_count(config: RunConfig, replies: int) -> int:
    """Replies cut from each side by the trimmed mean: ⌊β·n⌋, but at least one whenever 3 or more answered."""
    if replies < 3:
        return 0
    return min(max(1, int(config.aggregation_trim * replies)), (replies - 1) // 2)


def aggregate(config: RunConfig, updates: Sequence[Update], weights: Sequence[float], *,
              noise_seed: int | None = None, norms: Sequence[float] | None = None) -> Aggregate:
    """Combines ``updates`` (in site order) by the run's rule.

    ``weights`` count only for the mean. With ``dp = "central"`` every update is clipped to C and the
    mean carries N(0, (σ·C / n)²) per element (σ·C on the sum); ``noise_seed`` seeds it
    (``dp-seeded-noise``), else the noise comes from OS randomness. With ``dp = "local"`` the sites
    clipped and noised their replies themselves and the server takes the plain mean.
    """
    if not updates:
        raise ValueError("no update to aggregate.")
    if config.dp == "central":
        return _central_dp_mean(config, updates, noise_seed)
    n = len(updates)
    updates, norms, bound, bounded = bound_replies(updates, config.median_norm_bound, norms)
    bounds = {"norms": norms, "norm_bound": bound, "bounded": bounded}
    if config.aggregation == "mean" or n == 1:
        note = "" if config.aggregation == "mean" else f"{config.aggregation} needs 2 or more replies; 1 answered"
        return Aggregate(weighted_mean(updates, weights), "mean", n, note=note, **bounds)
    return _robust(config, updates, Aggregate({}, config.aggregation, n, **bounds))


def _central_dp_mean(config: RunConfig, updates: Sequence[Update], noise_seed: int | None) -> Aggregate:
    """Every update clipped to C, their plain mean, and N(0, (σ·C / n)²) per element on it."""
    n = len(updates)
    clipped, norms = zip(*(clip_update(u, config.dp_clip_norm) for u in updates))
    std = config.dp_noise_multiplier * config.dp_clip_norm / n
    mean = weighted_mean(list(clipped), [1.0] * n)
    generator = noise_generator(noise_seed if config.dp_seeded_noise else None)
    # No per-reply norms in the record: they describe the sites' data outside the accountant's epsilon.
    return Aggregate(add_gaussian_noise(mean, std, generator), "mean", n,
                     clipped=sum(norm > config.dp_clip_norm for norm in norms), noise_std=std)


def _robust(config: RunConfig, updates: Sequence[Update], result: Aggregate) -> Aggregate:
    """Fills ``result`` (2 or more bounded replies) with the run's robust rule: median, trimmed mean or Multi-Krum."""
    n = result.replies
    keys = list(updates[0])
    arrays = [[u[k].detach().cpu().to(torch.float64).numpy() for k in keys] for u in updates]
    results = [(a, 1) for a in arrays]  # every reply weighs the same under a robust rule
    rule = config.aggregation
    if rule == "krum" and n < 2 * config.krum_byzantine + 3:
        # Krum's guarantee needs n >= 2f + 3 (Blanchard et al. 2017); with fewer it would score replies on
        # too few neighbours. The coordinate-wise median is the robust rule that still means something.
        result.rule = rule = "median"
        result.note = f"krum needs {2 * config.krum_byzantine + 3} replies for krum-byzantine={config.krum_byzantine}; " \
                      f"{n} answered, so the median was used"
    if n == 2:  # the median and a trimmed mean of two replies are their mean: one hostile site moves it freely
        result.note = result.note or f"{rule} of 2 replies is their mean: no protection against a hostile site"
    if rule == "median":
        combined = aggregate_median(results)
    elif rule == "trimmed-mean":
        result.trimmed_per_side = cut = trim_count(config, n)
        # Flower cuts int(p·n) per side; (cut + 0.25) / n makes that exactly `cut` and stays below 0.5.
        combined = aggregate_trimmed_avg(results, (cut + 0.25) / n) if cut else _plain_mean(arrays)
    else:  # krum: Multi-Krum (El Mhamdi et al. 2018) keeps the n - f replies with the best Krum scores
        keep = max(1, n - config.krum_byzantine)
        # Flower's aggregate_krum returns only the average; scoring once here gives the same selection
        # (its scores, its tie order) and says which replies were kept.
        result.krum_selected = _krum_selected(arrays, config.krum_byzantine, keep)
        combined = _plain_mean([arrays[i] for i in result.krum_selected])
    first = updates[0]
    result.update = {k: torch.as_tensor(np.asarray(v)).to(dtype=first[k].dtype, device=first[k].device)
                     for k, v in zip(keys, combined)}
    return result


def check_finite(params: Mapping[str, torch.Tensor], server_round: int) -> None:
    """Raises when θ holds NaN or Inf after a round: a broken θ must stop the run, not be sent to sites."""
    bad = sorted(k for k, t in params.items() if not torch.isfinite(t).all())
    if bad:
        raise FloatingPointError(
            f"θ became non-finite in round {server_round} ({', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}); "
            "the run stops with the last good checkpoint (round "
            f"{server_round - 1}). Lower meta-lr, bound replies (max-update-norm) or use a robust aggregation."
        )


def _plain_mean(arrays: list[list[np.ndarray]]) -> list[np.ndarray]:
    return [np.mean(np.stack(layer), axis=0) for layer in zip(*arrays)]


def _krum_selected(arrays: list[list[np.ndarray]], byzantine: int, keep: int) -> list[int]:
    """Which replies Multi-Krum averaged (Flower returns only the average), for the round record.

    The arithmetic is Flower's own (``aggregate_krum``): squared norms of direct differences (a Gram-matrix
    shortcut loses digits on near-ties and can pick another reply), its default argsort for ties."""
    flat = [np.concatenate([a.ravel() for a in reply]) for reply in arrays]
    distances = np.array([[np.linalg.norm(a - b) ** 2 for b in flat] for a in flat])
    closest = max(1, len(arrays) - byzantine - 2)
    scores = [np.sum(row[np.argsort(row)[1:closest + 1]]) for row in distances]
    return sorted(int(i) for i in np.argsort(scores)[:keep])


def reply_norm_ok(config: RunConfig, norm: float) -> bool:
    """Whether a reply's norm is within ``max-update-norm`` (always, when no bound is set)."""
    return not config.max_update_norm or (math.isfinite(norm) and norm <= config.max_update_norm)


__all__ = ["Aggregate", "aggregate", "check_finite", "reply_norm_ok", "trim_count"]
