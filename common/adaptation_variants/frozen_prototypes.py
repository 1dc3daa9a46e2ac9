"""Frozen prototypes: the support prototypes pooled once, at step 0 under θ's embedding, and kept as a fixed
classifier while the encoder is fine-tuned to segment the support set with them.

The prototype learner's own fine-tuning (:class:`fedmeta.common.algorithms.prototypes.Prototypes`) segments the
support set with prototypes re-pooled from the moving embedding, and re-pools after every step: the embedding
and its classifier drift together, and nothing ties them to what θ's prototypes meant. Here the classifier is
θ's and only the embedding moves towards it (as a linear-probe-then-fine-tune keeps its head, Kumar et al.
2022). Applies to the prototype learners only."""

from __future__ import annotations

import torch

from fedmeta.common.adaptation_variants.base import Variant, WrappedRule, algorithm_for, trajectory_with
from fedmeta.common.algorithms.prototypes import PrototypeUNet


class FrozenPrototypeRule(WrappedRule):
    def support_objective(self, model, loss_fn):
        return None  # the network's own logits: cosine to the prototypes step 0 put into the parameters

    def after_step(self, model, params, support_x, support_y, *, create_graph, step, inner_steps):
        return params  # no re-pooling: the prototypes stay step 0's


class FrozenPrototypes(Variant):
    name = "frozen-prototypes"
    description = "frozen prototypes: step-0 prototypes kept as the classifier while the encoder is fine-tuned"

    def why_not(self, target):
        algorithm = algorithm_for(target)
        network = getattr(algorithm, "network", None) if not isinstance(target, torch.nn.Module) else type(target)
        if network is None or not issubclass(network, PrototypeUNet):
            return "it freezes a prototype classifier, and this network has none (prototype learners only)"
        return None

    def trajectory(self, model, params, support_x, support_y_onehot, *, inner_steps, inner_lr, loss_fn,
                   inner_params=None):
        reason = self.why_not(model)
        if reason is not None:
            raise ValueError(f"variant {self.name!r} does not apply: {reason}.")
        return trajectory_with(model, params, support_x, support_y_onehot, inner_steps=inner_steps,
                               inner_lr=inner_lr, loss_fn=loss_fn, inner_params=inner_params,
                               rule_for=lambda rule, names, step_size: FrozenPrototypeRule(rule))


__all__ = ["FrozenPrototypeRule", "FrozenPrototypes"]
