"""FedAvg (McMahan et al., 2017) and FedProx (Li et al., 2020): local SGD from θ, sent as θ − θ_local, so the
server's SGD with learning rate 1 is FedAvg; FedProx adds μ/2‖θ_local − θ‖² to every local step."""

from __future__ import annotations

from fedmeta.common import inner_loop, protocol
from fedmeta.common.algorithms.base import Algorithm


class FedAvg(Algorithm):
    name = protocol.FEDAVG
    description = "FedAvg: local SGD epochs over the episodes' batches, averaged"
    data_weighted = True

    def local_update(self, model, params, episodes, loop):
        """``inner_steps`` local epochs, each through every episode's support then query batch in order: one
        continuous SGD run from θ."""
        anchor = {n: p.detach() for n, p in params.items()}
        local = dict(anchor)
        proximal = (loop.proximal_mu, anchor) if loop.proximal_mu > 0 else None  # μ = 0 is FedAvg exactly
        for _ in range(loop.inner_steps):
            for support_x, support_y, query_x, query_y in episodes:
                for x, y in ((support_x, support_y), (query_x, query_y)):
                    local, _, _ = inner_loop.inner_step(model, local, loop.names, x, y, loop.step_size, loop.loss_fn,
                                                        first_order=True, proximal=proximal)
        statistics = [inner_loop.episode_statistics(model, loop.loss_fn, e, anchor, local) for e in episodes]
        return {n: anchor[n] - local[n] for n in anchor}, inner_loop.mean_statistics(statistics, episodes)

    def local_steps(self, inner_steps: int, episodes: int) -> int:
        return inner_steps * episodes * 2  # each local epoch: support then query of every episode


class FedProx(FedAvg):
    name = protocol.FEDPROX
    description = "FedProx: FedAvg with a proximal term μ/2‖θ_local − θ‖²"
    proximal = True

    def proximal_mu(self, config) -> float:
        return config.proximal_mu


__all__ = ["FedAvg", "FedProx"]
