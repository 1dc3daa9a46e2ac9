"""Test-time adaptation variants, one object each behind one registry: ``VARIANTS[name]``.

The initialisation's training decides θ and its adaptation rule; a variant decides what a new site does with
them on its k labelled slices (:class:`~fedmeta.common.adaptation_variants.base.Variant`): which parameters it
steps, whether it is held near θ, and how it predicts. ``fine-tune`` is what every comparison did before
variants existed, and the default (``fedmeta.common.adaptation.score_site(variant=...)``). The others try to
keep what fine-tuning a meta-learned start on unfamiliar data can lose (issue 27, item 4); which of them the
validation split supports is measured by ``fedmeta variants`` (simulations/experiments/variants.py).
Adding a variant: one module here with its class, one line below.
"""

from __future__ import annotations

from fedmeta.common.adaptation_variants.base import Target, Variant
from fedmeta.common.adaptation_variants.bias_only import BiasOnly
from fedmeta.common.adaptation_variants.ensemble import Ensemble
from fedmeta.common.adaptation_variants.fine_tune import FineTune
from fedmeta.common.adaptation_variants.frozen_prototypes import FrozenPrototypes
from fedmeta.common.adaptation_variants.head_only import HeadOnly
from fedmeta.common.adaptation_variants.norm_only import NormOnly
from fedmeta.common.adaptation_variants.proximal import MUS, Proximal

DEFAULT = "fine-tune"

VARIANTS: dict[str, Variant] = {v.name: v for v in (
    FineTune(), HeadOnly(), NormOnly(), BiasOnly(), *(Proximal(mu) for mu in MUS), Ensemble(), FrozenPrototypes(),
)}


def variant_named(name: str | Variant) -> Variant:
    """The registered variant ``name`` (a Variant passes through); an unknown name is refused with the choices."""
    if isinstance(name, Variant):
        return name
    if name not in VARIANTS:
        raise ValueError(f"unknown adaptation variant {name!r}; valid choices: {', '.join(VARIANTS)}.")
    return VARIANTS[name]


def check_applies(variant: Variant, *targets: Target) -> None:
    """Refuses a variant that cannot adapt one of ``targets`` (an algorithm name, a network), saying why."""
    for target in targets:
        reason = variant.why_not(target)
        if reason is not None:
            what = target if isinstance(target, str) else type(target).__name__
            usable = [name for name, other in VARIANTS.items() if other.applies_to(target)]
            raise ValueError(f"adaptation variant {variant.name!r} does not apply to {what}: {reason}. "
                             f"Choose another (these apply: {', '.join(usable)}).")


__all__ = ["DEFAULT", "VARIANTS", "Variant", "check_applies", "variant_named"]
