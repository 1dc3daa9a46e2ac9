"""Norm only: the normalisation layers' affine scale and shift stepped, every convolution kept (the idea of
adapting only normalisation to a new domain: AdaBN, Li et al. 2016; TENT, Wang et al. 2021, with labels here).

MONAI's UNet with ``norm="instance"`` (this project's default) builds InstanceNorm with ``affine=False``: it has
no parameter to step, so the variant does not apply to it — it applies to ``model-norm = "group"`` networks,
whose GroupNorm is affine. The nearest variant that applies to every network is ``bias-only``."""

from __future__ import annotations

from torch import nn

from fedmeta.common.adaptation_variants.base import SubsetVariant

NORMS = (nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm, nn.modules.batchnorm._BatchNorm)


class NormOnly(SubsetVariant):
    name = "norm-only"
    description = "norm only: fine-tune the normalisation layers' affine parameters (none with affine-free InstanceNorm)"

    def names(self, model):
        return [f"{module_name}.{name}" if module_name else name
                for module_name, module in model.named_modules() if isinstance(module, NORMS)
                for name, _ in module.named_parameters(recurse=False)]

    def why_not(self, target):
        reason = super().why_not(target)
        if reason is not None:
            return reason + " (its normalisation has no affine parameters: InstanceNorm with affine=False)"
        return None


__all__ = ["NORMS", "NormOnly"]
