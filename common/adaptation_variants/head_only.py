"""Head only: the UNet's last block stepped, the encoder and decoder kept as trained (ANIL's inner loop, Raghu
et al. 2020, applied at test time to any initialisation; linear probing's idea, Kumar et al. 2022)."""

from __future__ import annotations

from fedmeta.common.adaptation_variants.base import SubsetVariant, algorithm_for
from fedmeta.common.unet import head_parameter_names


class HeadOnly(SubsetVariant):
    name = "head-only"
    description = "head only: fine-tune the UNet's last block, keep the rest of θ"

    def names(self, model):
        own = getattr(model, "is_own_parameter", lambda name: False)
        return [n for n in head_parameter_names(model) if not own(n)]

    def why_not(self, target):
        algorithm = algorithm_for(target)
        if algorithm is not None and algorithm.head_only:
            return f"{algorithm.name} already adapts only the head: its fine-tune is head-only"
        return super().why_not(target)


__all__ = ["HeadOnly"]
