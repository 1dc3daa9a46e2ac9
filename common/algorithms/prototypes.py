"""Prototype segmentation (PANet, Wang et al. 2019; ADNet, Hansen et al. 2022): the UNet embeds every pixel,
the support masks pool one prototype per class, and a pixel's logits are scaled cosine similarities to them.
No gradient step is needed at a new site; fine-tuning the encoder on the support set's own segmentation is
optional (:mod:`fedmeta.common.learners`)."""

from __future__ import annotations

import functools

import torch

from fedmeta.common import learners
from fedmeta.common.algorithms.base import Learner


class Prototypes(Learner):
    name = "prototypes"
    description = "prototypes: pixels matched by cosine to the support set's class prototypes"
    learner = learners.PrototypeUNet.learner
    own_keys = ("prototype_dim",)
    min_inner_steps = 0

    def prepare(self, model, params, support_x, support_y, *, create_graph, inner_steps):
        if create_graph and inner_steps:
            # Step 0's prototypes serve only the statistics in training: the first step's support loss pools its
            # own, so they are computed without a graph (and are not a local gradient step).
            with torch.no_grad():
                prototypes = learners.with_prototypes(model, params, support_x, support_y)[learners.PROTOTYPES]
            return {**params, learners.PROTOTYPES: prototypes}
        return learners.with_prototypes(model, params, support_x, support_y)

    def support_objective(self, model, loss_fn):
        # Fine-tuning segments the support set with its own prototypes.
        return functools.partial(learners.prototype_support_loss, model, loss_fn=loss_fn)

    def after_step(self, model, params, support_x, support_y, *, create_graph, step, inner_steps):
        if create_graph and step != inner_steps - 1:
            return params  # in training only the last step's prototypes score the query
        with torch.set_grad_enabled(create_graph):
            return learners.with_prototypes(model, params, support_x, support_y)

    def query_target(self, model, adapted, query_y):
        return learners.in_support_label_space(model, adapted, query_y)

    def local_steps(self, inner_steps: int, episodes: int) -> int:
        return (inner_steps + 2) * episodes  # + the UNet's pass over the support set that pools the prototypes

    def describe_adaptation(self, step: str, steps: int) -> str:
        return ("class prototypes from the support masks (cosine matching)"
                + (f", after fine-tuning the encoder: {step}" if steps else ""))

    def released_model_note(self, path) -> str | None:
        raise ValueError(f"--model {path}: a prototypes checkpoint holds an embedding, not a segmenter: its class "
                         "prototypes come from your labelled slices. Make a site model first: `fedmeta adapt "
                         "--checkpoint ... --data YOUR_SITE --steps 0 --out MODEL`, then predict with --model MODEL.")


__all__ = ["Prototypes"]
