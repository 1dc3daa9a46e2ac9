"""Site-level differential privacy for meta-gradients: clipping, Gaussian noise and the accountant.

The unit of privacy is a *site* (client-level DP, McMahan et al. 2018): a site's whole reply — every
array of θ's meta-gradient, Meta-SGD's ``lr.*`` arrays included — is clipped to L2 norm C, and the
round's sum carries Gaussian noise of standard deviation σ·C, added by the server (``dp = "central"``,
a trusted aggregator) or split over the sites (``dp = "local"``: each adds σ·C/√q, q the round's
quorum of m listed sites, so that any sum of q or more replies carries at least σ·C; it protects the
sites from the server only when the server sees nothing but the sum, i.e. with secure aggregation, and
sites refuse to unmask a sum of fewer than q).

Accounting: Google's ``dp-accounting`` RDP accountant, because it is the maintained accountant that
matches how fedmeta samples sites — a fixed-size subset of m of the n training sites, without
replacement, every round (``SampledWithoutReplacementDpEvent``, Wang, Balle & Kasiviswanathan 2019).
Opacus' accountants and Flower's own DP wrappers assume Poisson sampling, which fedmeta does not do.
That event is defined for "replace one" neighbouring federations (n is public); replacing one site's
clipped reply by another's moves the sum by up to 2C, so noise σ·C is a noise multiplier of σ/2
against that sensitivity. Pure numerics: no Flower here (``common`` knows none).
"""

from __future__ import annotations

import copy
import math
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from fedmeta.common.protocol import DP_MODES


def update_norm(update: Mapping[str, torch.Tensor]) -> float:
    """The L2 norm of a whole reply: every array together, in float64."""
    return math.sqrt(sum(float(t.detach().to(torch.float64).pow(2).sum()) for t in update.values()))


def clip_update(update: Mapping[str, torch.Tensor], clip_norm: float) -> tuple[dict[str, torch.Tensor], float]:
    """``update`` scaled to L2 norm at most ``clip_norm`` (all arrays together), and its norm before clipping."""
    if not (math.isfinite(clip_norm) and clip_norm > 0):
        raise ValueError(f"clip_norm={clip_norm!r} must be a finite number > 0 (dp-clip-norm).")
    norm = update_norm(update)
    if not math.isfinite(norm):
        raise ValueError("the update holds NaN or Inf; it cannot be clipped.")
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    return {k: (t * scale).to(t.dtype) for k, t in update.items()}, norm


def noise_generator(seed: int | None) -> torch.Generator:
    """The generator DP noise is drawn from: ``seed`` for a reproducible simulation, else fresh OS randomness.

    A seeded generator makes the noise predictable to anyone who knows the seed, so it is for
    simulations only; a deployed run draws a new 63-bit seed from ``secrets`` every round.
    """
    generator = torch.Generator()
    generator.manual_seed(secrets.randbits(63) if seed is None else int(seed))
    return generator


def add_gaussian_noise(
    update: Mapping[str, torch.Tensor], std: float, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """``update`` plus independent N(0, std²) noise on every element (drawn in float64, key order)."""
    if not (math.isfinite(std) and std >= 0):
        raise ValueError(f"noise std={std!r} must be a finite number >= 0.")
    noisy = {}
    for key in sorted(update):
        tensor = update[key]
        noise = torch.randn(tensor.shape, generator=generator, dtype=torch.float64) * std
        noisy[key] = (tensor.detach().cpu().to(torch.float64) + noise).to(tensor.dtype).to(tensor.device)
    return {k: noisy[k] for k in update}


def local_noise_split(config, listed: int) -> int:
    """Over how many replies a site under local DP splits the round's noise: the round's quorum (the fewest
    answering sites, never below min-sites, whose sum the protocol lets the server unmask), so that every
    sum the server can obtain carries at least σ·C. Splitting over all m listed sites would leave a sum of
    a < m replies with only σ·C·√(a/m); sites refuse to unmask fewer than this many."""
    return config.quorum(int(listed))


@dataclass(frozen=True)
class RoundEvent:
    """One round's release: ``sampled`` of ``population`` training sites, Gaussian noise σ·C on the sum.

    ``noise_multiplier`` is σ as configured (std / C); the accountant sees σ/2 (sensitivity 2C under
    "replace one"). In local mode with dropouts σ is the noise the answering sites actually added.
    """

    population: int
    sampled: int
    noise_multiplier: float

    def __post_init__(self) -> None:
        if not 1 <= self.sampled <= self.population:
            raise ValueError(f"a round samples 1..{self.population} sites, not {self.sampled}.")
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier > 0):
            raise ValueError(f"noise multiplier {self.noise_multiplier!r} must be > 0 for an accountable release.")


@dataclass
class PrivacyAccountant:
    """ε at δ of the rounds released so far (site-level, RDP, sampling without replacement).

    ``history`` (one event per round, in order) is what a checkpoint stores; a resumed run rebuilds
    the same ε from it. Composing a subsampled event costs ~0.5 s, so the accountant keeps its
    composed state and the prediction for the next round, and reuses the prediction when that
    round's event is the predicted one.
    """

    delta: float
    history: list[RoundEvent] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not 0 < self.delta < 1:
            raise ValueError(f"dp-delta={self.delta!r} must be in (0, 1), e.g. 1e-5 (below 1/number of sites).")
        self._accountant = _composed(self.history)
        self._predicted: tuple[RoundEvent, object] | None = None

    @property
    def epsilon(self) -> float:
        """ε of every round released so far (0 before the first)."""
        return float(self._accountant.get_epsilon(self.delta)) if self.history else 0.0

    def epsilon_after(self, event: RoundEvent) -> float:
        """ε if one more round ``event`` were released: the check before a round runs."""
        return float(self._after(event).get_epsilon(self.delta))

    def spend(self, event: RoundEvent) -> float:
        """Records a released round; returns the new ε."""
        self._accountant = self._after(event)
        self._predicted = None
        self.history.append(event)
        return self.epsilon

    def state_dict(self) -> dict:
        return {"delta": self.delta,
                "history": [[e.population, e.sampled, e.noise_multiplier] for e in self.history]}

    @classmethod
    def from_state_dict(cls, state: Mapping) -> "PrivacyAccountant":
        return cls(float(state["delta"]), [RoundEvent(int(n), int(m), float(s)) for n, m, s in state["history"]])

    def _after(self, event: RoundEvent):
        if self._predicted is not None and self._predicted[0] == event:
            return self._predicted[1]
        accountant = copy.deepcopy(self._accountant)
        accountant.compose(_dp_event(event))
        self._predicted = (event, accountant)
        return accountant


def noise_multiplier_for(epsilon: float, delta: float, population: int, sampled: int, rounds: int) -> float:
    """The smallest σ (to 1 %) whose ``rounds`` releases of ``sampled`` of ``population`` sites stay within
    ε at δ: how a consortium turns the budget it will sign off into ``dp-noise-multiplier``."""
    if not (epsilon > 0 and 0 < delta < 1 and rounds >= 1 and 1 <= sampled <= population):
        raise ValueError(f"epsilon={epsilon}, delta={delta}, rounds={rounds}, sampled={sampled} of {population}: "
                         "need epsilon > 0, 0 < delta < 1, rounds >= 1 and 1 <= sampled <= population.")

    def spent(sigma: float) -> float:
        return PrivacyAccountant(delta, [RoundEvent(population, sampled, sigma)] * rounds).epsilon

    low, high = 0.5, 1.0  # bracket: spent(low) > epsilon >= spent(high)
    while spent(high) > epsilon:
        low, high = high, high * 2
        if high > 1e6:
            raise ValueError(f"no noise multiplier up to 1e6 keeps {rounds} rounds within epsilon={epsilon}.")
    while spent(low) <= epsilon:  # a generous budget: walk down until the noise is too little
        low, high = low / 2, low
        if low < 1e-3:
            return high  # below 1e-3 the noise is no protection worth a figure; this budget needs no more
    while high / low > 1.01:
        middle = math.sqrt(low * high)
        low, high = (low, middle) if spent(middle) <= epsilon else (middle, high)
    return high


def _dp_event(event: RoundEvent):
    from dp_accounting import dp_event  # 2 s to import: only runs with DP pay it

    gaussian = dp_event.GaussianDpEvent(event.noise_multiplier / 2)  # sensitivity 2C: replace one site
    if event.sampled == event.population:
        return gaussian
    return dp_event.SampledWithoutReplacementDpEvent(event.population, event.sampled, gaussian)


def _composed(history: list[RoundEvent]):
    # dp_accounting: +0.55 s on this module's import, +20 ms on the ClientApp's (python -X importtime); only runs with
    # DP pay it.
    from dp_accounting import NeighboringRelation
    from dp_accounting.rdp import RdpAccountant  # lazy: see above

    accountant = RdpAccountant(neighboring_relation=NeighboringRelation.REPLACE_ONE)
    counts: dict[RoundEvent, int] = {}
    for event in history:  # RDP composes additively: identical rounds compose at the cost of one
        counts[event] = counts.get(event, 0) + 1
    for event, count in counts.items():
        accountant.compose(_dp_event(event), count)
    return accountant


__all__ = ["DP_MODES", "PrivacyAccountant", "RoundEvent", "add_gaussian_noise", "clip_update", "noise_generator",
           "local_noise_split", "noise_multiplier_for", "update_norm"]
