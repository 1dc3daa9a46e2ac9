"""Ensemble: the mean of the softmax of the unadapted (step-0, as the learner prepares it) and the adapted model.
Whatever fine-tuning loses, half the vote stays with θ; at 0 steps it is θ itself."""

from __future__ import annotations

import torch
from torch.func import functional_call

from fedmeta.common.adaptation_variants.base import Variant


class Ensemble(Variant):
    name = "ensemble"
    description = "ensemble: mean of the 0-step and the adapted model's softmax"

    def logits(self, model, prepared, adapted, x):
        """The log of the mean probability (its argmax is the ensemble's prediction)."""
        probability = (torch.softmax(functional_call(model, dict(prepared), (x,)), dim=1)
                       + torch.softmax(functional_call(model, dict(adapted), (x,)), dim=1)) / 2
        return probability.clamp_min(torch.finfo(probability.dtype).tiny).log()


__all__ = ["Ensemble"]
