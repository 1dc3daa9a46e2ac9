"""The update a site sends and a new site's adaptation: the registry's algorithm, after the checks.

:func:`meta_gradient` checks its arguments and calls ``ALGORITHMS[algorithm].local_update``; :func:`adapt` and
:func:`adaptation_trajectory` run the one inner loop (:func:`fedmeta.common.inner_loop.trajectory`) without a
graph, with the adaptation rule of the learner ``model`` is (none for a plain UNet). So training and a new
site adapt with the same step. What each algorithm sends is its module's docstring (:mod:`fedmeta.common.algorithms`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch

from fedmeta.common import inner_loop
from fedmeta.common.algorithms import ALGORITHMS, LoopSettings, algorithm_named, algorithm_of
from fedmeta.common.algorithms.base import check_scalar_step_size
from fedmeta.common.algorithms.checks import (
    check_episodes, check_inner_params, check_loss_fn, check_params, check_steps,
)
from fedmeta.common.algorithms.maml import (
    BATCH_FROM, EPISODE_CHUNK, check_learned_step_sizes, init_step_sizes, multi_step_loss_weights,
)
from fedmeta.common.inner_loop import Episode, LossFn, Params, StepSize
from fedmeta.common.protocol import STEP_SIZE_PREFIX

@torch.enable_grad()  # a caller under no_grad (evaluation code) still gets gradients
def meta_gradient(
    model: torch.nn.Module,
    params: Mapping[str, torch.Tensor],
    episodes: Sequence[Episode],
    *,
    algorithm: str,
    inner_steps: int,
    inner_lr: StepSize,
    loss_fn: LossFn,
    inner_params: Sequence[str] | None = None,
    proximal_mu: float = 0.0,
    step_weights: Sequence[float] | None = None,
    first_order: bool = False,
    truncation: int = 0,
    batch_episodes: bool | None = None,
) -> tuple[Params, dict[str, float]]:
    """The update one site sends for the shared initialisation θ, and plain-float statistics.

    ``grads`` has exactly the keys, shapes and dtypes of ``params``, averaged over ``episodes``, plus
    ``"lr.<name>"`` for each Meta-SGD step size; the server applies it as a gradient: θ ← θ − η·grads. What
    each algorithm sends is its class's (:mod:`fedmeta.common.algorithms`). ``inner_lr``: α, or Meta-SGD's
    step sizes (a float starts them all at α). ``inner_params``: the adapted names (default: the algorithm's,
    ANIL's head). MAML++ (Antoniou et al., 2019): ``step_weights`` (one per inner step,
    :func:`multi_step_loss_weights`) makes the meta-loss the weighted query loss after every inner step;
    ``first_order=True`` takes maml / anil through FOMAML's computation. ``truncation``: the learned
    optimiser's unroll, the last T steps differentiated (0: all). ``batch_episodes``: FOMAML's episodes at once
    (``torch.func.vmap``); None does so from ``BATCH_FROM`` episodes of one shape, where it measured faster.

    ``stats``: ``support_loss_before/after`` and ``query_loss_before/after`` (means over episodes, at θ — or θ
    as a learner prepares it — and at the adapted parameters) and ``num_examples`` (support plus query images).
    """
    params = check_params(model, params)
    chosen = algorithm_named(algorithm)
    chosen.check_model(model)
    check_steps(inner_steps)
    check_loss_fn(loss_fn)
    names = check_inner_params(params, chosen.adapted_names(model) if inner_params is None else inner_params, model)
    step_size = chosen.check_step_size(inner_lr, names, params)
    episodes = check_episodes(episodes)
    mu, weights, truncation = chosen.check_options(inner_steps=inner_steps, proximal_mu=proximal_mu,
                                                   step_weights=step_weights, first_order=first_order,
                                                   truncation=truncation)
    loop = LoopSettings(names, step_size, inner_steps, loss_fn, mu, weights, first_order, truncation, batch_episodes)
    return chosen.local_update(model, params, episodes, loop)


@torch.enable_grad()  # callers often evaluate under no_grad; adaptation needs gradients
def adapt(model: torch.nn.Module, params: Mapping[str, torch.Tensor], support_x: torch.Tensor,
          support_y: torch.Tensor, **settings) -> Params:
    """k-shot adaptation of ``params`` on one support set, as a new site runs it: the last parameters of
    :func:`adaptation_trajectory` (same keyword arguments), detached."""
    *_, adapted = adaptation_trajectory(model, params, support_x, support_y, **settings)
    return adapted


@torch.enable_grad()
def adaptation_trajectory(
    model: torch.nn.Module,
    params: Mapping[str, torch.Tensor],
    support_x: torch.Tensor,
    support_y: torch.Tensor,
    *,
    inner_steps: int,
    inner_lr: StepSize,
    loss_fn: LossFn,
    inner_params: Sequence[str] | None = None,
    first_step: int = 0,
) -> Iterator[Params]:
    """Yields the adapted (detached) parameters after 0, 1, …, ``inner_steps`` steps.

    Step 0 is θ as the learner prepares it for this support set: θ itself for the initialisation family, θ
    with a generated head (fast-weights) or with the support set's prototypes (prototypes). ``support_y`` is
    whatever ``loss_fn`` takes as its target. ``first_step`` (initialisation family only): where in the inner
    loop the steps start (per-step learned step sizes), for adaptation in parts.
    """
    params = {n: p.detach() for n, p in params.items()}
    names = check_inner_params(params, inner_params, model)
    check_steps(inner_steps)
    step_size = check_learned_step_sizes(inner_lr, names, params) if isinstance(inner_lr, Mapping) \
        else check_scalar_step_size(inner_lr)
    learner = algorithm_of(model)
    if first_step and learner is not None:
        raise ValueError(f"first_step={first_step}: a {learner.name} learner adapts in one go (its preparation and "
                         "state start at step 0); use adaptation_trajectory to score on the way.")
    for adapted, _ in inner_loop.trajectory(model, params, names, support_x, support_y, inner_steps, step_size, loss_fn,
                                            rule=learner or inner_loop.PLAIN, first_step=first_step):
        yield {n: p.detach() for n, p in adapted.items()}


__all__ = ["ALGORITHMS", "BATCH_FROM", "EPISODE_CHUNK", "STEP_SIZE_PREFIX", "adapt",
           "adaptation_trajectory", "init_step_sizes", "meta_gradient", "multi_step_loss_weights"]
