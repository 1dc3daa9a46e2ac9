"""The MAML family: MAML, its first-order variant, ANIL and Meta-SGD (with MAML++'s LSLR and schedules).

- MAML (Finn et al., 2017): ∇θ L_Q(θ′), θ′ from the inner steps on S, differentiated through the loop.
- FOMAML: ∇L_Q at θ′ with the inner gradients detached (``first_order`` is the only difference).
- ANIL (Raghu et al., 2020): MAML adapting only the head; the meta-gradient still covers every parameter.
- Meta-SGD (Li et al., 2017): MAML with a learned step size per parameter, sent as ``lr.<name>`` = ∂L_Q/∂α;
  MAML++'s LSLR (Antoniou et al., 2019) learns one per layer and inner step instead.
- MAML++'s multi-step loss (the weighted query loss after every inner step) and derivative-order annealing
  (first order early in training) for the second-order members.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.func import grad_and_value, vmap

from fedmeta.common import inner_loop, protocol
from fedmeta.common.algorithms.base import Algorithm, LoopSettings, check_scalar_step_size
from fedmeta.common.algorithms.checks import check_inner_params
from fedmeta.common.inner_loop import Episode, Params, StepSize
from fedmeta.common.protocol import STEP_SIZE_PREFIX
from fedmeta.common.unet import head_parameter_names

# At most this many episodes in one vmapped call: activations grow with it. Eight FOMAML episodes (2D default
# model, 2-core CPU) took 1.1x the loop's time in chunks of 2, 0.8x in chunks of 4, 0.7x in one chunk of 8;
# 4 keeps most of the gain with half the memory of 8.
EPISODE_CHUNK = 4
# FOMAML batches its episodes by default from this many on: fewer measured no faster (``fedmeta perf episodes``;
# docs/performance.md).
BATCH_FROM = 4


def multi_step_loss_weights(inner_steps: int, server_round: int, anneal_rounds: int) -> list[float] | None:
    """MAML++'s per-step importance of the query loss in round ``server_round`` (1-based).

    Uniform over the inner steps in round 1, the earlier steps' weights then fall linearly to zero by round
    ``anneal_rounds`` and the last step takes the rest; afterwards (or with ``anneal_rounds`` 0, or one inner
    step) None: the plain last-step meta-loss.
    """
    if anneal_rounds <= 0 or inner_steps <= 1 or server_round > anneal_rounds:
        return None
    earlier = (1.0 / inner_steps) * (1.0 - (max(server_round, 1) - 1) / anneal_rounds)
    return [earlier] * (inner_steps - 1) + [1.0 - earlier * (inner_steps - 1)]


class FOMAML(Algorithm):
    name = protocol.FOMAML
    description = "first-order MAML: the query gradient at the adapted weights"

    def local_update(self, model, params, episodes, loop):
        batched = loop.batch_episodes or (loop.batch_episodes is None and len(episodes) >= BATCH_FROM)
        if batched:
            obstacle = why_not_batched(model, episodes)
            if obstacle is None:
                return _batched(model, params, episodes, loop)
            if loop.batch_episodes:
                raise ValueError(f"batch_episodes=True: {obstacle}. Leave it None to run the episodes in a loop.")
        return super().local_update(model, params, episodes, loop)

    def episode_update(self, model, params, episode, loop):
        support_x, support_y, query_x, query_y = episode
        adapted, support_before = _adapt_first_order(model, params, episode, loop)
        leaves = {n: p.requires_grad_(True) for n, p in adapted.items()}
        query_loss = inner_loop.loss(model, leaves, query_x, query_y, loop.loss_fn)
        grads = dict(zip(leaves, torch.autograd.grad(query_loss, list(leaves.values()), materialize_grads=True)))
        query_after = float(query_loss.detach())
        return grads, {n: p.detach() for n, p in leaves.items()}, {
            "support_loss_before": support_before, "query_loss_after": query_after,
            "query_loss_before": query_after if loop.inner_steps == 0 else None}

    def episodes_at_once(self, episodes: int) -> int:
        return episodes if episodes >= BATCH_FROM else 1


class MAML(Algorithm):
    name = protocol.MAML
    description = "second-order MAML: the query gradient through the inner loop"
    second_order = True
    order_annealing = True

    def local_update(self, model, params, episodes, loop):
        if loop.first_order:  # derivative-order annealing: the same adapted names, gradient taken at θ′
            return FOMAML().local_update(model, params, episodes, loop)
        refuse_batching(self.name, loop)
        return super().local_update(model, params, episodes, loop)

    def episode_update(self, model, params, episode, loop):
        """∇ of the query loss through the inner loop, w.r.t. θ (and the learned α). With step weights the
        differentiated loss is Σ_j w_j L_Q(θ_j) (MAML++'s multi-step loss); the reported query loss is the last
        step's either way."""
        support_x, support_y, query_x, query_y = episode
        theta = {n: p.detach().requires_grad_(True) for n, p in params.items()}
        alpha = loop.step_size
        if self.learns_step_sizes:
            alpha = {n: a.detach().requires_grad_(True) for n, a in loop.step_size.items()}
        weights, earlier, support_before, adapted = loop.step_weights, 0.0, None, theta
        steps = inner_loop.trajectory(model, theta, loop.names, support_x, support_y, loop.inner_steps, alpha,
                                      loop.loss_fn, rule=self, create_graph=True)
        for step, (adapted, loss) in enumerate(steps):
            if step == 1:
                support_before = float(loss)
            if weights is not None and 1 <= step < loop.inner_steps and weights[step - 1] > 0:
                earlier = earlier + weights[step - 1] * inner_loop.loss(model, adapted, query_x, query_y, loop.loss_fn)
        query_loss = inner_loop.loss(model, adapted, query_x, query_y, loop.loss_fn)
        meta_loss = query_loss if weights is None else weights[-1] * query_loss + earlier
        inputs = dict(theta)
        if self.learns_step_sizes:
            inputs.update({STEP_SIZE_PREFIX + n: a for n, a in alpha.items()})
        grads = torch.autograd.grad(meta_loss, list(inputs.values()), materialize_grads=True)
        query_after = float(query_loss.detach())
        return dict(zip(inputs, grads)), {n: p.detach() for n, p in adapted.items()}, {
            "support_loss_before": support_before, "query_loss_after": query_after,
            "query_loss_before": query_after if loop.inner_steps == 0 else None}


class ANIL(MAML):
    name = protocol.ANIL
    description = "ANIL: MAML adapting only the network's head"
    head_only = True

    def adapted_names(self, model):
        return head_parameter_names(model)


class MetaSGD(MAML):
    name = protocol.METASGD
    description = "Meta-SGD: MAML with learned step sizes (per element, or MAML++'s per layer and step)"
    order_annealing = False  # its step sizes are learned through the second-order path
    learns_step_sizes = True

    def step_size(self, inner_lr, step_sizes):
        return dict(step_sizes)

    def initial_step_sizes(self, params, config):
        return init_step_sizes(params, config.inner_lr, per_layer_steps=config.per_layer_steps)

    def check_step_size(self, inner_lr, names, params):
        if isinstance(inner_lr, Mapping):
            return check_learned_step_sizes(inner_lr, names, params)
        # A float starts every learned step size at α, each shaped like its parameter (Meta-SGD).
        return init_step_sizes(params, check_scalar_step_size(inner_lr), names)


def init_step_sizes(params: Mapping[str, torch.Tensor], inner_lr: float, inner_params: Sequence[str] | None = None,
                    *, per_layer_steps: int = 0) -> Params:
    """Meta-SGD's learned step sizes, all equal to α: one tensor shaped like each adapted parameter, or with
    ``per_layer_steps=S`` one scalar per parameter tensor and inner step, shaped ``[S, 1, ...]`` (MAML++'s
    per-layer per-step learning rates, LSLR). Keys are parameter names (without the ``lr.`` prefix)."""
    names = check_inner_params(dict(params), inner_params)
    check_scalar_step_size(inner_lr)
    if per_layer_steps:
        return {n: torch.full((per_layer_steps,) + (1,) * params[n].dim(), float(inner_lr), dtype=params[n].dtype,
                              device=params[n].device) for n in names}
    return {n: torch.full_like(params[n], float(inner_lr)) for n in names}


def check_learned_step_sizes(inner_lr: Mapping[str, Any], names: list[str], params: Mapping[str, torch.Tensor]) -> StepSize:
    missing = [n for n in names if n not in inner_lr]
    extra = [n for n in inner_lr if n not in names]
    if missing or extra:
        raise ValueError(f"Meta-SGD inner_lr must hold one step size per adapted parameter: missing {missing[:5]}, "
                         f"not adapted {extra[:5]}; build it with fedmeta.common.meta.init_step_sizes(params, alpha, "
                         "inner_params).")
    for name in names:
        alpha = inner_lr[name]
        if not isinstance(alpha, torch.Tensor):
            raise ValueError(f"inner_lr[{name!r}] is a {type(alpha).__name__}, not a torch.Tensor.")
        if alpha.dim() == params[name].dim() + 1:  # per inner step: [steps, 1, ...], one scalar per step
            if alpha.shape[0] < 1 or any(d != 1 for d in alpha.shape[1:]):
                raise ValueError(f"inner_lr[{name!r}] of shape {tuple(alpha.shape)}: per-step step sizes are "
                                 f"[steps{', 1' * params[name].dim()}] (one scalar per layer and step).")
            alpha = alpha[0]
        try:
            shape = torch.broadcast_shapes(alpha.shape, params[name].shape)
        except RuntimeError:
            raise ValueError(f"inner_lr[{name!r}] has shape {tuple(alpha.shape)}, not broadcastable to the parameter's "
                             f"{tuple(params[name].shape)}.") from None
        if shape != params[name].shape:
            raise ValueError(f"inner_lr[{name!r}] of shape {tuple(alpha.shape)} would enlarge the parameter's shape "
                             f"{tuple(params[name].shape)}; use a scalar or the parameter's shape.")
        if not torch.isfinite(inner_lr[name]).all():
            raise ValueError(f"inner_lr[{name!r}] holds NaN or Inf values.")
    return {n: inner_lr[n] for n in names}


def _adapt_first_order(model, params, episode: Episode, loop: LoopSettings) -> tuple[Params, float | None]:
    """The inner steps without a graph; returns θ′ (new tensors) and the support loss at θ (None: no step)."""
    support_x, support_y, _, _ = episode
    adapted, support_before = params, None
    for step, (adapted, loss) in enumerate(inner_loop.trajectory(model, params, loop.names, support_x, support_y,
                                                                  loop.inner_steps, loop.step_size, loop.loss_fn)):
        if step == 1:
            support_before = float(loss)
    # New tensors: with 0 inner steps `adapted` holds the caller's θ, which must not be marked by the caller.
    return {n: p.detach() for n, p in adapted.items()}, support_before


def refuse_batching(name: str, loop: LoopSettings) -> None:
    if loop.batch_episodes is True:
        raise ValueError(f"batch_episodes=True batches FOMAML's episodes; algorithm={name!r} runs them in a loop "
                         "(batching measured no faster for second-order algorithms). Leave it None.")


def why_not_batched(model: torch.nn.Module, episodes: Sequence[Episode]) -> str | None:
    """Why these episodes cannot be vmapped with the loop's numbers, or None."""
    if any(isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0 and m.training for m in model.modules()):
        return "the model's dropout is active, and vmap would draw its random masks differently from the loop"
    if len({tuple(tuple(t.shape) for t in episode) for episode in episodes}) > 1:
        return "the episodes differ in shape (k, q or image size); vmap needs one shape"
    return None


def _batched(model, params, episodes, loop: LoopSettings) -> tuple[Params, dict[str, float]]:
    """FOMAML as the loop computes it, for same-shaped episodes at once (torch.func.vmap, θ shared): each episode's
    inner steps (the loop's update rule, :func:`fedmeta.common.inner_loop.apply_step`) and its query gradient at θ′
    are one function of its four tensors; the statistics come from the same forward passes."""
    theta = {n: p.detach() for n, p in params.items()}
    names, loss_fn = loop.names, loop.loss_fn

    def episode(support_x, support_y, query_x, query_y):
        adapted, support_before = dict(theta), None
        for step in range(loop.inner_steps):
            def support_loss(sub, adapted=adapted):
                return inner_loop.loss(model, {**adapted, **sub}, support_x, support_y, loss_fn)

            grads, loss = grad_and_value(support_loss)({n: adapted[n] for n in names})
            if step == 0:
                support_before = loss
            adapted = inner_loop.apply_step(adapted, names, [grads[n] for n in names], loop.step_size, step)
        query_grads, query_after = grad_and_value(lambda leaves: inner_loop.loss(model, leaves, query_x, query_y,
                                                                                 loss_fn))(adapted)
        with torch.no_grad():
            query_before = query_after if loop.inner_steps == 0 else inner_loop.loss(model, theta, query_x, query_y, loss_fn)
            if support_before is None:
                support_before = inner_loop.loss(model, theta, support_x, support_y, loss_fn)
            support_after = inner_loop.loss(model, adapted, support_x, support_y, loss_fn)
        return query_grads, torch.stack([support_before, support_after, query_before, query_after])

    stacked = [torch.stack([e[i] for e in episodes]) for i in range(4)]
    grads, losses = vmap(episode, chunk_size=EPISODE_CHUNK)(*stacked)
    count = len(episodes)
    per_episode = [dict(zip(inner_loop.STATISTICS, (float(v) for v in row))) for row in losses]
    return ({n: (grads[n].sum(0) / count).to(params[n].dtype) for n in params},
            inner_loop.mean_statistics(per_episode, episodes))


__all__ = ["ANIL", "BATCH_FROM", "EPISODE_CHUNK", "FOMAML", "MAML", "MetaSGD", "init_step_sizes",
           "multi_step_loss_weights", "refuse_batching", "why_not_batched"]
