"""Meta-training without Flower: the federation's round (``fedmeta.common.federated_round``) in a plain loop.

Only the transport differs from the apps: site sampling, the site update and the weighted mean are
the functions the ServerApp and ClientApp call. Two uses. ``pooled=True`` is the benchmark's upper bound: one learner that sees every training
site's patients as one pool (a "centralised" meta-learner, as if the hospitals had shared their
data), drawing per round as many episodes as the whole federation does. ``pooled=False`` runs the
federation's own rounds — the same site sampling generator, the same per-site episode seeds, the
same site-weighted float64 aggregation and the same meta-optimiser — so it is the "bare loop"
that ``fedmeta perf`` compares Flower's engines against, and a reference the federated θ can be
checked against.

The sites are taken in name order (the manifest's training order). The server samples and sums sites
in its own site order — partition ids when simulated, ``site-id`` from the node config when deployed —
so a federation whose nodes carry those in name order (:func:`training_node_configs`) samples the same
sites, draws the same episodes and sums in the same order: the same θ to float rounding.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from fedmeta.common.algorithms import ALGORITHMS
from fedmeta.common.config import RunConfig
from fedmeta.common.devices import pick_device
from fedmeta.common.data import SiteDataset, site_seed
from fedmeta.common.federated_round import (
    bound_replies, sample_sites, site_update, site_weights, weighted_mean, weighted_mean_scalars,
)
from fedmeta.common.metaopt import MetaOptimizer
from fedmeta.common.model import initial_params, seeded_model
from fedmeta.common.protocol import DATA_DIR_KEY, ROLE_KEY, ROLE_TRAIN, SITE_ID_KEY
from fedmeta.common.read_limits import ReadLimits
from fedmeta.common.synth import load_manifest


@dataclass
class CentralisedRun:
    """What a centralised run produced: θ, Meta-SGD step sizes, and per-round statistics."""

    params: dict[str, torch.Tensor]
    step_sizes: dict[str, torch.Tensor] | None
    rounds: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    optimizer_state: dict = field(default_factory=dict)  # MetaOptimizer.state_dict(), for a checkpoint


def train_centralised(
    config: RunConfig,
    federation_dir: Path | str,
    *,
    pooled: bool,
    train_sites: Sequence[str] | None = None,
) -> dict[str, torch.Tensor]:
    """The meta-learned θ after ``config.num_rounds`` rounds; see :func:`run_centralised`."""
    return run_centralised(config, federation_dir, pooled=pooled, train_sites=train_sites).params


def run_centralised(
    config: RunConfig,
    federation_dir: Path | str,
    *,
    pooled: bool,
    train_sites: Sequence[str] | None = None,
    on_round: Callable[[int, dict[str, float]], None] | None = None,
) -> CentralisedRun:
    """Meta-trains θ from ``seeded_model(config, config.seed)`` on the federation's training sites.

    ``pooled=False``: each round samples sites and episode seeds exactly as the ServerApp does,
    computes each site's update as the ClientApp does, and steps the meta-optimiser with the
    site-weighted mean (``site-weighting``). ``pooled=True``: the training sites' patients form one pool; each round
    draws ``sites × episodes-per-site`` episodes from it (support and query from different
    patients, possibly of different sites) and steps once on their mean.

    ``train_sites`` restricts training to these site names (default: the manifest's training sites),
    e.g. to keep a validation split of training sites out. ``on_round(round, stats)`` is called after
    every round.
    """
    began = time.perf_counter()
    sites = load_training_sites(federation_dir, config, train_sites)
    device = pick_device(config.device, "run config device")
    model = seeded_model(config.model_config(), config.seed).to(device)
    params = {n: p.to(device) for n, p in initial_params(model).items()}
    step_sizes = ALGORITHMS[config.algorithm].initial_step_sizes(params, config)
    optimizer = MetaOptimizer(params, optimizer=config.meta_optimizer, lr=config.meta_lr,
                              step_sizes=step_sizes, momentum=config.meta_momentum)
    pool = pool_sites(sites) if pooled else None
    # The server's generator: site sampling and round seeds, in the order the coordinator draws them.
    rng = np.random.Generator(np.random.PCG64(config.seed))
    run = CentralisedRun(params={}, step_sizes=None)

    for server_round in range(1, config.num_rounds + 1):
        chosen, round_seed = sample_sites(rng, len(sites), config.sites_per_round)
        theta, alphas = optimizer.params, optimizer.step_sizes
        if pool is not None:
            updates = [site_update(model, theta, alphas, pool, config, device=device, server_round=server_round,
                                   n_episodes=len(chosen) * config.episodes_per_site, seed=round_seed)]
        else:
            updates = [site_update(model, theta, alphas, sites[i], config, device=device, server_round=server_round,
                                   n_episodes=config.episodes_per_site, seed=site_seed(round_seed, sites[i].name))
                       for i in chosen]
        # The pooled learner makes one update a round: its weight does not matter.
        weights = site_weights(config, [pool.num_slices] if pool is not None else [sites[i].num_slices for i in chosen])
        grads = [grads for grads, _ in updates]
        if pool is None:  # the server's norm bound, so the bare loop and the apps step θ alike
            grads = bound_replies(grads, config.median_norm_bound)[0]
        optimizer.step(weighted_mean(grads, weights))
        stats = weighted_mean_scalars([{k: v for k, v in s.items() if k != "num_examples"} for _, s in updates],
                                      weights)
        stats["num_examples"] = float(sum(s["num_examples"] for _, s in updates))
        run.rounds.append(stats)
        if on_round is not None:
            on_round(server_round, stats)

    run.params = {n: p.cpu() for n, p in optimizer.params.items()}
    run.step_sizes = ({n: a.cpu() for n, a in optimizer.step_sizes.items()}
                      if optimizer.step_sizes is not None else None)
    run.optimizer_state = optimizer.state_dict()
    run.seconds = time.perf_counter() - began
    return run


def training_node_configs(infos) -> list[dict[str, str | int]]:
    """Node configs for the in-process engine: one per training site, ``site-id`` in name order.

    ``site-id`` fixes the server's site order to this module's, and is what a deployed hospital
    would pass; node ids, which Flower draws at random, then play no part.
    """
    return [{DATA_DIR_KEY: str(info.folder()), ROLE_KEY: ROLE_TRAIN, SITE_ID_KEY: i}
            for i, info in enumerate(sorted(infos, key=lambda info: info.name))]


def load_training_sites(
    federation_dir: Path | str, config: RunConfig, names: Sequence[str] | None = None
) -> list[SiteDataset]:
    """The federation's training sites (or the named ones), loaded as the ClientApp loads them."""
    manifest = load_manifest(Path(federation_dir))
    available = {info.name: info for info in manifest.train_sites}
    if names is None:
        chosen = [available[name] for name in sorted(available)]  # name order, as the docstring promises
    else:
        unknown = sorted(set(names) - set(available))
        if unknown:
            raise ValueError(
                f"train_sites {unknown} are not training sites of {federation_dir}; "
                f"choose among {', '.join(sorted(available))}."
            )
        chosen = [available[n] for n in sorted(set(names))]
    if not chosen:
        raise ValueError(f"{federation_dir}: no training site to meta-train on.")
    return [SiteDataset.load(info.folder(), config.data_config(limits=ReadLimits.from_environment())) for info in chosen]


def pool_sites(sites: Sequence[SiteDataset]) -> SiteDataset:
    """All patients of ``sites`` as one site (patient ids prefixed with their site's name)."""
    first = sites[0]
    return SiteDataset(
        name="pooled",
        root=first.root.parent,
        config=first.config,
        patient_ids=[f"{s.name}/{p}" for s in sites for p in s.patient_ids],
        images=[x for s in sites for x in s.images],
        labels=[y for s in sites for y in s.labels],
        train_slices=[i for s in sites for i in s.train_slices],
    )


__all__ = ["CentralisedRun", "load_training_sites", "pool_sites", "run_centralised", "train_centralised",
           "training_node_configs"]
