"""Prototype segmentation (PANet, Wang et al. 2019; ADNet, Hansen et al. 2022): the UNet embeds every pixel,
the support masks pool one prototype per class, and a pixel's logits are scaled cosine similarities to them.
No gradient step is needed at a new site; fine-tuning the encoder on the support set's own segmentation is
optional (docs/learners.md)."""

from __future__ import annotations

import functools

import math
from collections.abc import Mapping

import torch
from monai.networks.nets import UNet
from torch import nn
from torch.func import functional_call

from fedmeta.common import protocol
from fedmeta.common.algorithms.base import Learner
from fedmeta.common.inner_loop import Params

PROTOTYPES = "prototypes"  # the site's class prototypes [C, E] (computed, never meta-learned)
PROTOTYPE_LOG_SCALE = "log_scale"  # log of the cosine similarities' learned scale (temperature)
PROTOTYPE_INITIAL_SCALE = 20.0  # PANet's alpha


class PrototypeUNet(UNet):
    """The UNet as a pixel embedding (``embedding_dim`` channels) matched to class prototypes by cosine."""

    learner = protocol.PROTOTYPES

    def __init__(self, *, num_classes: int, embedding_dim: int, **unet) -> None:
        super().__init__(**{**unet, "out_channels": embedding_dim})
        # Every adaptation replaces these with its support set's prototypes: θ's own are never used (they
        # start at zero, and their meta-gradient is zero).
        self.prototypes = nn.Parameter(torch.zeros(num_classes, embedding_dim))
        self.log_scale = nn.Parameter(torch.tensor(math.log(PROTOTYPE_INITIAL_SCALE)))

    @staticmethod
    def is_own_parameter(name: str) -> bool:
        return name in (PROTOTYPES, PROTOTYPE_LOG_SCALE)

    @classmethod
    def from_model_config(cls, config, **unet) -> "PrototypeUNet":
        return cls(num_classes=config.out_channels, embedding_dim=config.embedding_dim, **unet)

    def forward(self, x: torch.Tensor, embed_only: bool = False) -> torch.Tensor:
        """Class logits ``[B, C, *spatial]``; with ``embed_only`` the embedding ``[B, E, *spatial]``."""
        features = super().forward(x)
        return features if embed_only else prototype_logits(features, self.prototypes, self.log_scale)


def masked_average_pooling(features: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Class prototypes ``[C, E]``: the mean embedding under each class's mask; zero for a class with no pixel."""
    masks = masks.to(features.dtype)
    totals = torch.einsum("be...,bc...->ce", features, masks)
    counts = masks.sum(dim=(0, *range(2, masks.dim())))
    return torch.where(counts[:, None] > 0, totals / counts.clamp_min(1e-12)[:, None], torch.zeros_like(totals))


def prototype_logits(features: torch.Tensor, prototypes: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """Logits ``[B, C, *spatial]``: scale · cos(embedding, prototype); a class without a prototype scores
    −2·scale, below every cosine, so it is never predicted."""
    cosine = torch.einsum("be...,ce->bc...", nn.functional.normalize(features, dim=1, eps=1e-8),
                          nn.functional.normalize(prototypes, dim=1, eps=1e-8))
    scale = log_scale.exp()
    present = (prototypes.detach() != 0).any(dim=1).view(1, -1, *([1] * (features.dim() - 2)))
    return torch.where(present, scale * cosine, -2 * scale)


def with_prototypes(model: PrototypeUNet, params: Mapping[str, torch.Tensor], support_x: torch.Tensor,
                    support_y: torch.Tensor) -> Params:
    """``params`` with the prototypes of the support set under the current embedding."""
    features = functional_call(model, dict(params), (support_x,), {"embed_only": True})
    return {**params, PROTOTYPES: masked_average_pooling(features, support_y)}


def in_support_label_space(model: torch.nn.Module, adapted: Mapping[str, torch.Tensor],
                            target: torch.Tensor) -> torch.Tensor:
    """A prototypes query target with every class the support showed no pixel of moved to background.

    The support set is the label protocol a prototype learner segments in: a class without a prototype
    can never be predicted, and a query pixel of it would only push the learned scale down and every
    embedding away from every prototype. For the other learners ``target`` is returned as it is.
    """
    if getattr(model, "learner", None) != PrototypeUNet.learner:
        return target
    absent = (adapted[PROTOTYPES].detach() == 0).all(dim=1)  # [C]
    if not bool(absent[1:].any()):
        return target
    shape = (1, -1, *([1] * (target.dim() - 2)))
    moved = (target * absent.view(shape).to(target.dtype)).sum(dim=1)
    kept = target * (~absent).view(shape).to(target.dtype)
    return torch.cat([kept[:, :1] + moved.unsqueeze(1), kept[:, 1:]], dim=1)


def prototype_support_loss(model: PrototypeUNet, params: Mapping[str, torch.Tensor], x: torch.Tensor,
                           y: torch.Tensor, loss_fn) -> torch.Tensor:
    """The fine-tuning objective: the support set segmented by its own prototypes (PANet's support loss)."""
    features = functional_call(model, dict(params), (x,), {"embed_only": True})
    return loss_fn(prototype_logits(features, masked_average_pooling(features, y), params[PROTOTYPE_LOG_SCALE]), y)


class Prototypes(Learner):
    description = "prototypes: pixels matched by cosine to the support set's class prototypes"
    network = PrototypeUNet
    own_keys = ("prototype_dim",)

    def prepare(self, model, params, support_x, support_y, *, create_graph, inner_steps):
        if create_graph and inner_steps:
            # Step 0's prototypes serve only the statistics in training: the first step's support loss pools its
            # own, so they are computed without a graph (and are not a local gradient step).
            with torch.no_grad():
                prototypes = with_prototypes(model, params, support_x, support_y)[PROTOTYPES]
            return {**params, PROTOTYPES: prototypes}
        return with_prototypes(model, params, support_x, support_y)

    def support_objective(self, model, loss_fn):
        # Fine-tuning segments the support set with its own prototypes.
        return functools.partial(prototype_support_loss, model, loss_fn=loss_fn)

    def after_step(self, model, params, support_x, support_y, *, create_graph, step, inner_steps):
        if create_graph and step != inner_steps - 1:
            return params  # in training only the last step's prototypes score the query
        with torch.set_grad_enabled(create_graph):
            return with_prototypes(model, params, support_x, support_y)

    def query_target(self, model, adapted, query_y):
        return in_support_label_space(model, adapted, query_y)

    def local_steps(self, inner_steps: int, episodes: int) -> int:
        return (inner_steps + 2) * episodes  # + the UNet's pass over the support set that pools the prototypes

    def describe_adaptation(self, step: str, steps: int) -> str:
        return ("class prototypes from the support masks (cosine matching)"
                + (f", after fine-tuning the encoder: {step}" if steps else ""))

    def released_model_note(self, path) -> str | None:
        raise ValueError(f"--model {path}: a prototypes checkpoint holds an embedding, not a segmenter: its class "
                         "prototypes come from your labelled slices. Make a site model first: `fedmeta adapt "
                         "--checkpoint ... --data YOUR_SITE --steps 0 --out MODEL`, then predict with --model MODEL.")


__all__ = ["PROTOTYPES", "PROTOTYPE_LOG_SCALE", "PrototypeUNet", "Prototypes", "in_support_label_space",
           "masked_average_pooling", "prototype_logits", "prototype_support_loss", "with_prototypes"]
