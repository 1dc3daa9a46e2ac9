"""Bias only: the convolutions' biases stepped, every weight kept (BitFit, Ben Zaken et al. 2022): a few hundred
parameters per UNet, present in every network, where ``norm-only`` finds none (affine-free InstanceNorm)."""

from __future__ import annotations

from fedmeta.common.adaptation_variants.base import SubsetVariant


class BiasOnly(SubsetVariant):
    name = "bias-only"
    description = "bias only (BitFit): fine-tune the biases, keep every weight of θ"

    def names(self, model):
        own = getattr(model, "is_own_parameter", lambda name: False)
        return [n for n, _ in model.named_parameters() if n.rsplit(".", 1)[-1] == "bias" and not own(n)]


__all__ = ["BiasOnly"]
