"""Reptile (Nichol et al., 2018): the pseudo-gradient θ − θ′ after the inner SGD steps on the support set,
which the server's optimiser steps like a gradient."""

from __future__ import annotations

from fedmeta.common import inner_loop, protocol
from fedmeta.common.algorithms.base import Algorithm
from fedmeta.common.algorithms.maml import _adapt_first_order, refuse_batching


class Reptile(Algorithm):
    name = protocol.REPTILE
    description = "Reptile: the pseudo-gradient θ − θ′ of the inner SGD steps"

    def local_update(self, model, params, episodes, loop):
        refuse_batching(self.name, loop)
        return super().local_update(model, params, episodes, loop)

    def episode_update(self, model, params, episode, loop):
        _, _, query_x, query_y = episode
        adapted, support_before = _adapt_first_order(model, params, episode, loop)
        query_after = inner_loop.no_grad_loss(model, adapted, query_x, query_y, loop.loss_fn)
        return {n: params[n] - adapted[n] for n in params}, adapted, {
            "support_loss_before": support_before, "query_loss_after": query_after,
            "query_loss_before": query_after if loop.inner_steps == 0 else None}

    def local_steps(self, inner_steps: int, episodes: int) -> int:
        return inner_steps * episodes  # no query gradient


__all__ = ["Reptile"]
