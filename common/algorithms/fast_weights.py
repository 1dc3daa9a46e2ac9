"""Fast weights (task-conditioned weight generation, a hypernetwork: Ha et al. 2017; Gidaris & Komodakis 2018;
LGM-Net, Li et al. 2019): a generator embeds the support images and masks and writes an update of the UNet's
head; adaptation is that forward pass, optionally followed by SGD steps (docs/learners.md)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from monai.networks.nets import UNet
from torch import nn
from torch.func import functional_call

from fedmeta.common import protocol
from fedmeta.common.algorithms.base import Learner
from fedmeta.common.inner_loop import Params
from fedmeta.common.unet import head_parameter_names

GENERATOR_PREFIX = "generator."  # the generator's parameters


class FastWeightUNet(UNet):
    """The UNet plus a generator of head updates from the support set (images and one-hot masks)."""

    learner = protocol.FAST_WEIGHTS

    def __init__(self, *, num_classes: int, generator_width: int, **unet) -> None:
        super().__init__(**unet)
        self.head_names = head_parameter_names(self)
        head = dict(self.named_parameters())
        outputs = sum(head[n].numel() for n in self.head_names)
        conv = nn.Conv2d if self.dimensions == 2 else nn.Conv3d
        width = generator_width
        last = nn.Linear(width, outputs)
        # Zero: the generator starts by changing nothing, so training starts from the plain UNet.
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.generator = nn.Sequential(
            conv(self.in_channels + num_classes, width, 3, stride=2, padding=1), nn.ReLU(),
            conv(width, width, 3, stride=2, padding=1), nn.ReLU(),
            _SetMean(), nn.Linear(width, width), nn.ReLU(), last,
        )

    @staticmethod
    def is_own_parameter(name: str) -> bool:
        return name.startswith(GENERATOR_PREFIX)

    @classmethod
    def from_model_config(cls, config, **unet) -> "FastWeightUNet":
        """Built from a ``fedmeta.common.model.ModelConfig`` (``unet``: the UNet's keyword arguments)."""
        return cls(num_classes=config.out_channels, generator_width=config.generator_width, **unet)


class _SetMean(nn.Module):
    """Mean over the support set and every spatial position: one embedding for the whole set, ``[1, C]``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(0, *range(2, x.dim()))).unsqueeze(0)


def generate(model: FastWeightUNet, params: Mapping[str, torch.Tensor], support_x: torch.Tensor,
             support_y: torch.Tensor) -> Params:
    """``params`` with the head replaced by head + g_φ(support images, support masks)."""
    generator = {n[len(GENERATOR_PREFIX):]: p for n, p in params.items() if n.startswith(GENERATOR_PREFIX)}
    inputs = torch.cat([support_x, support_y.to(support_x.dtype)], dim=1)
    delta = functional_call(model.generator, generator, (inputs,)).reshape(-1)
    out, offset = dict(params), 0
    for name in model.head_names:
        size = params[name].numel()
        out[name] = params[name] + delta[offset:offset + size].view_as(params[name])
        offset += size
    return out


class FastWeights(Learner):
    network = FastWeightUNet
    description = "fast weights: a generator writes the head from the support set"
    own_keys = ("generator_width",)

    def prepare(self, model, params, support_x, support_y, *, create_graph, inner_steps):
        return generate(model, params, support_x, support_y)

    def describe_adaptation(self, step: str, steps: int) -> str:
        return "head generated from the support images and masks" + (f", then {step}" if steps else "")

    def released_model_note(self, path) -> str | None:
        return (f"note: {path} is used as it is, its head not generated for your site (`fedmeta adapt --steps 0` "
                "generates it from your labelled slices).")


__all__ = ["FastWeightUNet", "FastWeights", "GENERATOR_PREFIX", "generate"]
