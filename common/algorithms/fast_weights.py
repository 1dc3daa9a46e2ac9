"""Fast weights (task-conditioned weight generation, a hypernetwork: Ha et al. 2017; Gidaris & Komodakis 2018;
LGM-Net, Li et al. 2019): a generator embeds the support images and masks and writes an update of the UNet's
head; adaptation is that forward pass, optionally followed by SGD steps (:mod:`fedmeta.common.learners`)."""

from __future__ import annotations

from fedmeta.common import learners
from fedmeta.common.algorithms.base import Learner


class FastWeights(Learner):
    name = "fast-weights"
    description = "fast weights: a generator writes the head from the support set"
    learner = learners.FastWeightUNet.learner
    own_keys = ("generator_width",)
    min_inner_steps = 0

    def prepare(self, model, params, support_x, support_y, *, create_graph, inner_steps):
        return learners.generate(model, params, support_x, support_y)

    def describe_adaptation(self, step: str, steps: int) -> str:
        return "head generated from the support images and masks" + (f", then {step}" if steps else "")

    def released_model_note(self, path) -> str | None:
        return (f"note: {path} is used as it is, its head not generated for your site (`fedmeta adapt --steps 0` "
                "generates it from your labelled slices).")


__all__ = ["FastWeights"]
