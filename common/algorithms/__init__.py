"""The algorithms, one object each behind one registry: ``ALGORITHMS[name]``.

Each method is a small class (:class:`~fedmeta.common.algorithms.base.Algorithm`) that owns what differs
between methods — its local update (the meta-gradient or pseudo-gradient a site sends), its adaptation rule
at a new site, its state on θ (learned step sizes; a learner's own parts live in its network), its cost in
local gradient steps, its config checks and a one-line description — over the one inner loop
(:mod:`fedmeta.common.inner_loop`). Adding a method: one module here with its class, one line below, its
tests (see the README's "Adding an algorithm").
"""

from __future__ import annotations

import torch

from fedmeta.common.algorithms.base import Algorithm, LoopSettings, Learner
from fedmeta.common.algorithms.contrastive_prototypes import ContrastivePrototypes
from fedmeta.common.algorithms.fast_weights import FastWeights
from fedmeta.common.algorithms.fedavg import FedAvg, FedProx
from fedmeta.common.algorithms.lstm_optimizer import LSTMOptimizer
from fedmeta.common.algorithms.maml import ANIL, FOMAML, MAML, MetaSGD
from fedmeta.common.algorithms.prototypes import Prototypes
from fedmeta.common.algorithms.reptile import Reptile


ALGORITHMS: dict[str, Algorithm] = {a.name: a for a in (
    MAML(), FOMAML(), Reptile(), MetaSGD(), ANIL(), FedAvg(), FedProx(),  # initialisations
    FastWeights(), Prototypes(), LSTMOptimizer(),  # learners: the UNet with parts of their own
    ContrastivePrototypes(),
)}



# The network each learner trains: the UNet with the learner's own parts (fedmeta.common.model.build_model).
NETWORKS: dict[str, type[torch.nn.Module]] = {a.learner: a.network for a in ALGORITHMS.values() if isinstance(a, Learner)}


def algorithm_named(name: str) -> Algorithm:
    """The registered algorithm ``name``; an unknown name is refused with the valid choices."""
    if name not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {name!r}; valid choices: {', '.join(ALGORITHMS)}.")
    return ALGORITHMS[name]


def algorithm_of(model) -> Algorithm | None:
    """The learner algorithm whose network ``model`` is, or None for a plain UNet."""
    kind = getattr(model, "learner", None)
    return next((a for a in ALGORITHMS.values() if kind is not None and a.learner == kind), None)


def names_where(attribute: str) -> list[str]:
    """The names of the algorithms for which ``attribute`` is true, in registry order (for messages and choices)."""
    return [name for name, a in ALGORITHMS.items() if getattr(a, attribute)]


__all__ = ["ALGORITHMS", "NETWORKS", "Algorithm", "LoopSettings", "Learner", "algorithm_named", "algorithm_of", "names_where"]
