"""One federated round, written once: which sites train, what a site computes, how updates combine.

The ServerApp and ClientApp call these functions with Flower carrying the messages between them;
the centralised loop (``fedmeta.simulations.experiments.centralised``) calls the same functions with
no transport at all. So the same seed samples the same sites, draws the same episodes, computes the
same updates and sums them in the same order, whichever way a round travels.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from fedmeta.common.algorithms import ALGORITHMS
from fedmeta.common.config import RunConfig
from fedmeta.common.adaptation import adaptation_curve, site_patients
from fedmeta.common.data import SiteDataset, adaptation_support, sample_episodes
from fedmeta.common.losses import DiceCELoss, one_hot
from fedmeta.common.metrics import foreground_classes
from fedmeta.common.meta import Params, StepSize, meta_gradient, multi_step_loss_weights
from fedmeta.common.privacy import update_norm

# Seeds are drawn below 2^31 - 1 so that they fit every integer type they are stored in.
_SEED_BOUND = 2**31 - 1


def sample_sites(rng: np.random.Generator, num_sites: int, sites_per_round: int) -> tuple[list[int], int]:
    """This round's sites (indices into the site order, ascending) and its round seed.

    ``sites_per_round`` 0 (or at least ``num_sites``) takes every site. Both draws come from
    ``rng``, the server's generator, whose state is checkpointed: a resumed run draws what the
    uninterrupted one would have.
    """
    if num_sites < 1:
        raise ValueError(f"num_sites={num_sites}: a round needs at least one training site.")
    wanted = sites_per_round or num_sites
    if wanted < num_sites:
        chosen = sorted(int(i) for i in rng.choice(num_sites, size=wanted, replace=False))
    else:
        chosen = list(range(num_sites))
    return chosen, int(rng.integers(0, _SEED_BOUND))


def adaptation_rule(
    config: RunConfig, model: torch.nn.Module, step_sizes: Mapping[str, torch.Tensor] | None
) -> tuple[StepSize, list[str] | None]:
    """(inner step size, adapted parameter names) the run's algorithm adapts with (Meta-SGD: its learned step
    sizes; ANIL: the head only; the others: every parameter with inner-lr). Training and evaluation both ask here."""
    algorithm = ALGORITHMS[config.algorithm]
    if algorithm.learns_step_sizes and step_sizes is None:
        raise ValueError(f"algorithm {config.algorithm} adapts with learned step sizes (lr.<name>), and none were given.")
    return algorithm.step_size(config.inner_lr, step_sizes), algorithm.adapted_names(model)


def site_update(
    model: torch.nn.Module,
    params: Mapping[str, torch.Tensor],
    step_sizes: Mapping[str, torch.Tensor] | None,
    site: SiteDataset,
    config: RunConfig,
    *,
    n_episodes: int,
    seed: int,
    server_round: int,
    device: torch.device | str = "cpu",
) -> tuple[Params, dict[str, float]]:
    """What one site computes in a round: ``n_episodes`` seeded episodes, then its meta-gradient.

    Returns ``(grads, stats)`` as :func:`fedmeta.common.meta.meta_gradient` does; ``grads`` is what
    the site sends. A federated site passes ``config.episodes_per_site`` and
    ``site_seed(round_seed, site.name)``; the pooled upper bound passes the whole federation's
    episode count and the round seed. ``server_round`` (1-based) drives MAML++'s schedules.
    """
    raw = sample_episodes(site, n_episodes, config.k_shot, config.q_query, seed=seed)
    episodes = [
        (sx.to(device), _target(sy, config, device), qx.to(device), _target(qy, config, device))
        for sx, sy, qx, qy in raw
    ]
    inner_lr, inner_params = adaptation_rule(config, model, step_sizes)
    return meta_gradient(
        model,
        params,
        episodes,
        algorithm=config.algorithm,
        inner_steps=config.inner_steps,
        inner_lr=inner_lr,
        loss_fn=DiceCELoss(config.num_classes),
        inner_params=inner_params,
        proximal_mu=ALGORITHMS[config.algorithm].proximal_mu(config),
        # MAML++'s schedules depend on the round: the multi-step loss early, first order earlier still.
        step_weights=multi_step_loss_weights(config.inner_steps, server_round, config.multi_step_loss_rounds),
        first_order=server_round <= config.first_order_rounds,
        truncation=config.lstm_truncation,
    )


def site_evaluation(model: torch.nn.Module, params: Mapping[str, torch.Tensor],
                    step_sizes: Mapping[str, torch.Tensor] | None, site: SiteDataset, config: RunConfig, *, seed: int,
                    device: torch.device | str = "cpu") -> tuple[dict[int, dict], int]:
    """What a held-out site computes in an evaluation round: θ adapted on ``eval-k-shot`` seeded support slices
    with the run's adaptation rule and variant (``adapt-variant``), scored after each of ``eval-steps`` steps by
    Dice per patient on its other patients (:func:`fedmeta.common.adaptation.adaptation_curve`). Returns the curve
    and the patients scored."""
    support_x, support_y = adaptation_support(site, config.eval_k_shot, seed=seed)
    patients = site_patients(site, seed, config.eval_max_images, device)
    inner_lr, inner_params = adaptation_rule(config, model, step_sizes)
    curve = adaptation_curve(
        model, params, support_x.to(device), support_y.to(device), patients, steps=list(config.adaptation_steps),
        inner_lr=inner_lr, loss_fn=DiceCELoss(config.num_classes), num_classes=config.num_classes,
        classes=foreground_classes(site.label_names, config.num_classes, site.labelled_classes),
        inner_params=inner_params, batch_size=config.eval_batch_size, variant=config.adapt_variant,
    )
    return curve, len(patients)


def site_weights(config: RunConfig, train_slices: Sequence[float]) -> list[float]:
    """Each answering site's weight in the round's mean, in the order of ``train_slices``.

    ``per-site``: 1 each (task-averaged MAML). ``data``: the labelled training slices each site
    holds (McMahan et al.'s n_k), each capped at ``max-weight-ratio`` (r) times the median of the
    *other* sites' counts, since the server cannot check a count and a site must not name a huge one.
    The cap bounds one site's share at r / (r + n − 1) of n sites (one of 8 at r = 10: 59 %); it does
    not bound what the update itself holds (robust aggregation does that). One site alone weighs 1.
    """
    if not train_slices:
        raise ValueError("no site answered: there is nothing to weigh.")
    if config.weighting == "per-site" or len(train_slices) == 1:
        return [1.0] * len(train_slices)
    sizes = [float(n) for n in train_slices]
    caps = [config.max_weight_ratio * float(np.median(sizes[:i] + sizes[i + 1:])) for i in range(len(sizes))]
    return [min(n, cap) for n, cap in zip(sizes, caps)]


def bound_replies(
    updates: Sequence[Mapping[str, torch.Tensor]], factor: float, norms: Sequence[float] | None = None,
) -> tuple[list[Mapping[str, torch.Tensor]], list[float], float, list[int]]:
    """Each update scaled down to L2 norm at most ``factor`` × the lower median of the updates' norms.

    ``norms``: the updates' L2 norms when the caller measured them already (the server, validating replies).
    Returns the bounded updates, every norm before bounding (site order), the bound (0 when none applied:
    ``factor`` is 0, or a single reply has no other to be measured against) and the positions scaled down.
    The lower median of n norms is the ⌈n/2⌉-th smallest: more than half the sites must send large
    replies to raise it, and one of two sites cannot.
    """
    norms = list(norms) if norms is not None else [update_norm(u) for u in updates]  # the server measured them
    if not factor or len(updates) < 2:
        return list(updates), norms, 0.0, []
    bound = factor * sorted(norms)[(len(norms) - 1) // 2]
    if not (math.isfinite(bound) and bound > 0):  # most replies are zero (or broken): nothing to measure against
        return list(updates), norms, 0.0, []
    bounded = [i for i, norm in enumerate(norms) if norm > bound]
    out = list(updates)
    for i in bounded:
        # The scale in float64, applied in the reply's dtype: a ×1e30 reply scaled by 1e-30 stays finite.
        out[i] = {k: (t.to(torch.float64) * (bound / norms[i])).to(t.dtype) for k, t in updates[i].items()}
    return out, norms, bound, bounded


def weighted_mean(
    updates: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]
) -> dict[str, torch.Tensor]:
    """Σ wᵢ·gᵢ / Σ wᵢ per key, accumulated in float64 in the order given, cast back to each key's dtype.

    A fixed order and float64 accumulation make the same updates give the same bits in every run;
    the caller orders ``updates`` (by site order) and has checked that they share keys and dtypes.
    """
    if not updates or len(updates) != len(weights):
        raise ValueError(f"weighted_mean needs one weight per update; got {len(updates)} updates, {len(weights)} weights.")
    total = float(sum(weights))
    if not (math.isfinite(total) and total > 0):
        raise ValueError(f"weights {list(weights)[:5]} sum to {total}; every weight must be positive.")
    mean = {}
    for key, first in updates[0].items():
        acc = torch.zeros_like(first, dtype=torch.float64)
        for update, weight in zip(updates, weights):
            acc += update[key].to(torch.float64) * (weight / total)
        mean[key] = acc.to(first.dtype)
    return mean


def weighted_mean_scalars(stats: Sequence[Mapping[str, float]], weights: Sequence[float]) -> dict[str, float]:
    """The weighted mean of every scalar all of ``stats`` report (in key order)."""
    total = float(sum(weights))
    keys = set.intersection(*(set(s) for s in stats))
    return {k: float(sum(s[k] * w for s, w in zip(stats, weights)) / total) for k in sorted(keys)}


def _target(labels: torch.Tensor, config: RunConfig, device: torch.device | str) -> torch.Tensor:
    return one_hot(labels, config.num_classes).to(device)


__all__ = ["adaptation_rule", "sample_sites", "site_evaluation", "site_update", "site_weights", "weighted_mean", "weighted_mean_scalars"]
