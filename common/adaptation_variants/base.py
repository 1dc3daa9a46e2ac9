"""What a test-time adaptation variant is: which parameters a new site steps, how, and how it predicts.

A :class:`Variant` is one small object, like an algorithm (:mod:`fedmeta.common.algorithms`): the
initialisation's training fixes θ and its adaptation rule (Meta-SGD's step sizes, a learner's
preparation); a variant changes only what the new site does with them — fine-tune everything (today's
behaviour), a subset of the parameters, a pull back towards θ, a frozen classifier, an ensemble with the
unadapted model. Every variant adapts with the one inner loop (:func:`fedmeta.common.inner_loop.trajectory`);
those that change its rule wrap the learner's rule (:func:`trajectory_with`), so they never copy it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import ClassVar

import torch
from torch.func import functional_call

from fedmeta.common import inner_loop
from fedmeta.common.algorithms import Algorithm, algorithm_named, algorithm_of
from fedmeta.common.algorithms.base import check_scalar_step_size
from fedmeta.common.algorithms.checks import check_inner_params, check_steps
from fedmeta.common.algorithms.maml import check_learned_step_sizes
from fedmeta.common.inner_loop import AdaptationRule, LossFn, Params, StepSize
from fedmeta.common.meta import adaptation_trajectory

Target = str | torch.nn.Module  # an algorithm's registry name, or the network a checkpoint builds


class Variant:
    """Fine-tuning as the initialisation's training implies it (:func:`fedmeta.common.meta.adaptation_trajectory`),
    scored with the adapted model's own logits. Subclasses override what they change."""

    name: ClassVar[str]
    description: ClassVar[str]  # one line for reports and --help

    def why_not(self, target: Target) -> str | None:
        """Why this variant cannot adapt ``target`` (an algorithm name or a network), or None when it can. A name
        alone says only what the algorithm decides; the network can say more (does it have norm parameters?)."""
        return None

    def applies_to(self, target: Target) -> bool:
        return self.why_not(target) is None

    def trajectory(self, model: torch.nn.Module, params: Params, support_x: torch.Tensor,
                   support_y_onehot: torch.Tensor, *, inner_steps: int, inner_lr: StepSize, loss_fn: LossFn,
                   inner_params: Sequence[str] | None = None) -> Iterator[Params]:
        """The adapted (detached) parameters after 0, 1, …, ``inner_steps`` steps; step 0 is θ as the learner
        prepares it. ``inner_params``: what the initialisation adapts (None: all but a learner's own parts)."""
        return adaptation_trajectory(model, params, support_x, support_y_onehot, inner_steps=inner_steps,
                                     inner_lr=inner_lr, loss_fn=loss_fn, inner_params=inner_params)

    def logits(self, model: torch.nn.Module, prepared: Params, adapted: Params, x: torch.Tensor) -> torch.Tensor:
        """Scores ``[N, C, *spatial]`` whose argmax is the prediction for images ``[N, 1, *spatial]``; ``prepared``
        is step 0 of the trajectory, ``adapted`` the step being scored."""
        return functional_call(model, dict(adapted), (x,))


class SubsetVariant(Variant):
    """Fine-tuning restricted to some parameters (:meth:`names`), within those the initialisation adapts."""

    def names(self, model: torch.nn.Module) -> list[str]:
        raise NotImplementedError

    def why_not(self, target: Target) -> str | None:
        if isinstance(target, torch.nn.Module) and not self.names(target):
            return f"the {type(target).__name__} has no parameter that {self.name} would step"
        return None

    def trajectory(self, model, params, support_x, support_y_onehot, *, inner_steps, inner_lr, loss_fn,
                   inner_params=None):
        own = set(check_inner_params(dict(params), inner_params, model))
        names = [n for n in self.names(model) if n in own]
        if not names:
            raise ValueError(f"variant {self.name!r}: none of its parameters is among those the initialisation "
                             f"adapts ({len(own)} names, e.g. {sorted(own)[:2]}); it does not apply here.")
        return super().trajectory(model, params, support_x, support_y_onehot, inner_steps=inner_steps,
                                  inner_lr=step_sizes_of(inner_lr, names), loss_fn=loss_fn, inner_params=names)


def step_sizes_of(inner_lr: StepSize, names: Sequence[str]) -> StepSize:
    """``inner_lr`` for ``names`` only: Meta-SGD's learned step sizes are one per adapted parameter."""
    return {n: inner_lr[n] for n in names} if isinstance(inner_lr, Mapping) else inner_lr


def algorithm_for(target: Target) -> Algorithm | None:
    """The algorithm a name is, or the learner a network is (None: a plain UNet, any initialisation)."""
    return algorithm_named(target) if isinstance(target, str) else algorithm_of(target)


class WrappedRule(AdaptationRule):
    """A learner's adaptation rule (or the plain one) with some hooks replaced: a variant overrides what it changes
    and delegates the rest, so the step itself stays the one inner loop's."""

    def __init__(self, base: AdaptationRule) -> None:
        self.base = base

    def prepare(self, model, params, support_x, support_y, *, create_graph, inner_steps):
        return self.base.prepare(model, params, support_x, support_y, create_graph=create_graph,
                                 inner_steps=inner_steps)

    def support_objective(self, model, loss_fn):
        return self.base.support_objective(model, loss_fn)

    def direction(self, model):
        return self.base.direction(model)

    def after_step(self, model, params, support_x, support_y, *, create_graph, step, inner_steps):
        return self.base.after_step(model, params, support_x, support_y, create_graph=create_graph, step=step,
                                    inner_steps=inner_steps)


@torch.enable_grad()  # scoring runs under no_grad; the steps need gradients
def trajectory_with(model: torch.nn.Module, params: Params, support_x: torch.Tensor, support_y: torch.Tensor, *,
                    inner_steps: int, inner_lr: StepSize, loss_fn: LossFn, inner_params: Sequence[str] | None,
                    rule_for: Callable[[AdaptationRule, list[str], StepSize], AdaptationRule]) -> Iterator[Params]:
    """:func:`fedmeta.common.meta.adaptation_trajectory` (same checks, same steps) with the learner's rule replaced by
    ``rule_for(learner rule, adapted names, step size)``."""
    params = {n: p.detach() for n, p in params.items()}
    names = check_inner_params(params, inner_params, model)
    check_steps(inner_steps)
    step_size = check_learned_step_sizes(inner_lr, names, params) if isinstance(inner_lr, Mapping) \
        else check_scalar_step_size(inner_lr)
    rule = rule_for(algorithm_of(model) or inner_loop.PLAIN, names, step_size)
    for adapted, _ in inner_loop.trajectory(model, params, names, support_x, support_y, inner_steps, step_size, loss_fn,
                                            rule=rule):
        yield {n: p.detach() for n, p in adapted.items()}


__all__ = ["SubsetVariant", "Target", "Variant", "WrappedRule", "algorithm_for", "step_sizes_of", "trajectory_with"]
