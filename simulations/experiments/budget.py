"""Budgets of local gradient steps: what makes two methods' training comparable.

Every method is given the same number of local gradient steps (forward-backward passes on one
batch) per site and round, and in all; FedAvg's local epochs are chosen to match.
"""

from __future__ import annotations

from typing import Any


def local_steps_per_round(config) -> int:
    """Gradient steps one site makes per round (forward-backward passes on one batch): the algorithm's cost."""
    from fedmeta.common.algorithms import ALGORITHMS  # loads torch (+2.7 s): not for `fedmeta simulate --help`

    return ALGORITHMS[config.algorithm].local_steps(config.inner_steps, config.episodes_per_site)


def fedavg_epochs_for_budget(config) -> int:
    """FedAvg's local epochs that match ``config``'s local steps per site and round as closely as possible."""
    return max(1, round(local_steps_per_round(config) / (2 * config.episodes_per_site)))


def budget(config, num_train_sites: int) -> dict[str, int]:
    """A run's budget of local gradient steps, from its config and the number of training sites."""
    # The server and the bare loop train every site when sites-per-round is 0 or at least their number.
    sites = min(config.sites_per_round or num_train_sites, num_train_sites)
    per_site_round = local_steps_per_round(config)
    return {
        "rounds": config.num_rounds,
        "sites_per_round": sites,
        "episodes_per_site": config.episodes_per_site,
        "inner_steps": config.inner_steps,
        "local_steps_per_site_round": per_site_round,
        "local_steps_total": config.num_rounds * sites * per_site_round,
        "images_per_site_round": config.episodes_per_site * (config.k_shot + config.q_query),
    }


def check_equal_budget(budgets: dict[str, dict[str, int]], where: Any) -> int:
    """The one total of local steps every method gets; refuses budgets that differ, naming them."""
    totals = {key: b["local_steps_total"] for key, b in budgets.items()}
    if len(set(totals.values())) > 1:
        listing = ", ".join(f"{k}: {v}" for k, v in sorted(totals.items()))
        raise ValueError(
            f"{where}: the methods' budgets of local gradient steps differ ({listing}). Fix inner-steps or "
            "episodes-per-site under [training.*] so that rounds × sites × episodes × steps per episode match "
            "(meta-learners: inner-steps + 1 per episode, prototypes: inner-steps + 2, Reptile: "
            "inner-steps, FedAvg/FedProx: 2 × inner-steps)."
        )
    return next(iter(totals.values()), 0)


__all__ = ["budget", "check_equal_budget", "fedavg_epochs_for_budget", "local_steps_per_round"]
