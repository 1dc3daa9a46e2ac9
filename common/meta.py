"""The MAML family as pure functions over parameter dicts (torch.func).

One computation matters: the update a site sends after adapting the shared initialisation θ to its
own episodes. Every algorithm here is a few lines over one shared inner step, :func:`_inner_step`,
which evaluation (:func:`adapt`) uses too, so training and testing adapt identically.

The model is only ever called as ``functional_call(model, params, (x,))``: its own parameters are
never read or written, so one module instance serves any θ.

References: MAML and its first-order variant (Finn et al., 2017), Reptile (Nichol et al., 2018),
Meta-SGD (Li et al., 2017), ANIL (Raghu et al., 2020), FedAvg (McMahan et al., 2017), FedProx
(Li et al., 2020). ``../shared/FIELD.md`` §1 states what each one sends.

The other families (``fast-weights``, ``prototypes``, ``lstm-optimizer``; :mod:`fedmeta.common.learners`)
go through the same inner step, as one adaptation trajectory (:func:`adaptation_trajectory`) that a
new site follows without a graph and training follows with one: their meta-gradient is the query
loss differentiated through it.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
from torch.func import functional_call

from fedmeta.common import learners
from fedmeta.common.model import head_parameter_names
from fedmeta.common.protocol import ALGORITHMS, LEARNER_ALGORITHMS, STEP_SIZE_PREFIX

# Algorithms whose θ-gradient is taken through the inner loop (second order).
SECOND_ORDER = ("maml", "metasgd", "anil")

Params = dict[str, torch.Tensor]
Episode = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
StepSize = float | Mapping[str, torch.Tensor]


# --------------------------------------------------------------------------------------------------
# The one inner step


def _loss(model: torch.nn.Module, params: Params, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn):
    return loss_fn(functional_call(model, params, (x,)), y)


def _inner_step(
    model: torch.nn.Module,
    params: Params,
    names: Sequence[str],
    x: torch.Tensor,
    y: torch.Tensor,
    step_size: StepSize,
    loss_fn: LossFn,
    *,
    first_order: bool,
    proximal: tuple[float, Params] | None = None,
    step: int = 0,
    loss_of: Callable[[Params, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> tuple[Params, torch.Tensor]:
    """One SGD step (the ``step``-th of the inner loop) on the parameters ``names``; the others pass through.

    Returns the stepped parameters and the (detached) loss before the step. With
    ``first_order=False`` the step stays in the autograd graph, so a gradient of a later loss
    flows back through it to θ (MAML); ``first_order`` cuts it (FOMAML, Reptile, FedAvg,
    evaluation). ``step_size`` is α, or Meta-SGD's learned tensors: shaped like each parameter, or
    (MAML++'s LSLR) one scalar per layer and inner step, ``[steps, 1, ...]``, of which step ``step``
    is taken (the last one for steps beyond those trained). ``proximal=(μ, θ₀)`` adds FedProx's
    μ/2‖θ − θ₀‖². ``loss_of(params, x, y)`` replaces the model's loss on ``(x, y)`` (the prototype
    learner's support self-segmentation).

    torch.autograd.grad rather than a nested torch.func.grad: on this UNet it measured ~15 % faster
    per step on CPU (``fedmeta perf meta``), and both give the same gradients.
    """
    if first_order:
        params = {n: p.detach().requires_grad_(n in names) for n, p in params.items()}
    loss = loss_of(params, x, y) if loss_of is not None else _loss(model, params, x, y, loss_fn)
    if proximal is not None:
        mu, anchor = proximal
        loss = loss + 0.5 * mu * sum(((params[n] - anchor[n]) ** 2).sum() for n in names)
    grads = torch.autograd.grad(loss, [params[n] for n in names], create_graph=not first_order, materialize_grads=True)
    stepped = dict(params)
    with torch.set_grad_enabled(not first_order):
        for n, g in zip(names, grads):
            alpha = _alpha_at(step_size[n], params[n], step) if isinstance(step_size, Mapping) else step_size
            stepped[n] = params[n] - alpha * g
    if first_order:
        stepped = {n: p.detach() for n, p in stepped.items()}
    return stepped, loss.detach()


def _alpha_at(alpha: torch.Tensor, param: torch.Tensor, step: int) -> torch.Tensor:
    """A learned step size for inner step ``step``: per-layer-per-step tensors carry the steps first."""
    if alpha.dim() == param.dim() + 1:
        return alpha[min(step, alpha.shape[0] - 1)]
    return alpha


def _adapt_first_order(model, params, names, x, y, steps, step_size, loss_fn) -> tuple[Params, float | None]:
    """``steps`` detached inner steps on one batch; returns θ′ and the loss at θ (None if no step)."""
    adapted, loss_before = params, None
    for step in range(steps):
        adapted, loss = _inner_step(model, adapted, names, x, y, step_size, loss_fn, first_order=True, step=step)
        if step == 0:
            loss_before = float(loss)
    return adapted, loss_before


@torch.enable_grad()  # callers often evaluate under no_grad; adaptation needs gradients
def adapt(
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
) -> Params:
    """k-shot adaptation of ``params`` on one support set, as a new site would run it.

    The same inner step as training (:func:`_inner_step`), with no graph kept: returns detached
    adapted parameters. ``support_y`` is whatever ``loss_fn`` takes as its target. ``first_step``:
    where in the inner loop this call starts (per-step learned step sizes), for adaptation in parts.
    """
    *_, adapted = adaptation_trajectory(model, params, support_x, support_y, inner_steps=inner_steps,
                                        inner_lr=inner_lr, loss_fn=loss_fn, inner_params=inner_params,
                                        first_step=first_step)
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
    """Yields the adapted (detached) parameters after 0, 1, …, ``inner_steps`` steps of :func:`adapt`.

    Step 0 is θ as the learner prepares it for this support set: θ itself for the initialisation family,
    θ with a generated head (fast-weights) or with the support set's prototypes (prototypes).
    ``first_step`` (initialisation family only): where in the inner loop the steps start.
    """
    params = {n: p.detach() for n, p in params.items()}
    names = _check_inner_params(params, inner_params, model)
    _check_steps(inner_steps)
    _check_step_size(inner_lr, names, params, algorithm=None)
    if learners.learner_of(model) is None:
        adapted = params
        yield adapted
        for step in range(first_step, first_step + inner_steps):
            adapted, _ = _inner_step(model, adapted, names, support_x, support_y, inner_lr, loss_fn, first_order=True,
                                     step=step)
            yield adapted
        return
    if first_step:
        raise ValueError(f"first_step={first_step}: a {learners.learner_of(model)} learner adapts in one go "
                         "(its preparation and state start at step 0); use adaptation_trajectory to score on the way.")
    for adapted in _trajectory(model, params, names, support_x, support_y, inner_steps, inner_lr, loss_fn,
                               create_graph=False):
        yield {n: p.detach() for n, p in adapted.items()}


def _trajectory(model, params, names, support_x, support_y, inner_steps, inner_lr, loss_fn, *, create_graph,
                truncation: int = 0) -> Iterator[Params]:
    """A learner's adaptation: its preparation (step 0), then ``inner_steps`` steps of its rule on ``names``.

    ``create_graph`` keeps every step in the autograd graph (training differentiates the query loss
    through it); ``truncation`` T > 0 differentiates only the last T steps (truncated backpropagation
    through the inner loop): the earlier ones pass θ's gradient straight through, as first-order MAML does.
    """
    kind = learners.learner_of(model)
    if kind == "prototypes" and create_graph and inner_steps:
        # Step 0's prototypes serve only the statistics in training: the first step's support loss pools
        # its own, so they are computed without a graph (and are not a local gradient step).
        with torch.no_grad():
            prototypes = learners.with_prototypes(model, params, support_x, support_y)[learners.PROTOTYPES]
        adapted = {**params, learners.PROTOTYPES: prototypes}
    else:
        adapted = _prepare(model, kind, params, support_x, support_y)
    yield adapted
    state = None
    graph_from = inner_steps - truncation if truncation else 0
    # Prototype fine-tuning segments the support set with its own prototypes.
    support_loss = functools.partial(learners.prototype_support_loss, model, loss_fn=loss_fn) if kind == "prototypes" else None
    for step in range(inner_steps):
        graph = create_graph and step >= graph_from
        if kind == "lstm-optimizer":
            adapted, state = _learned_optimizer_step(model, adapted, names, support_x, support_y, inner_lr, loss_fn,
                                                     state, create_graph=graph)
        else:
            adapted, _ = _inner_step(model, adapted, names, support_x, support_y, inner_lr, loss_fn,
                                     first_order=not graph, step=step, loss_of=support_loss)
            if kind == "prototypes" and (not create_graph or step == inner_steps - 1):
                # The stepped encoder's prototypes: at every step a new site scores, after the last in training
                # (the next step's support loss pools its own).
                with torch.set_grad_enabled(create_graph):
                    adapted = learners.with_prototypes(model, adapted, support_x, support_y)
        if create_graph and not graph:  # a truncated step: θ's gradient passes straight through it
            adapted = {n: params[n] + (p - params[n]).detach() for n, p in adapted.items()}
            state = tuple(t.detach() for t in state) if state is not None else None
        yield adapted


def _prepare(model, kind, params, support_x, support_y) -> Params:
    if kind == "fast-weights":
        return learners.generate(model, params, support_x, support_y)
    if kind == "prototypes":
        return learners.with_prototypes(model, params, support_x, support_y)
    return dict(params)


def _learned_optimizer_step(model, params, names, x, y, inner_lr, loss_fn, state, *, create_graph):
    """One step of the learned optimiser: θ ← θ − α (g + w·h), h the coordinate-wise LSTM's output."""
    if not create_graph:
        params = {n: p.detach().requires_grad_(n in names) for n, p in params.items()}
    loss = _loss(model, params, x, y, loss_fn)
    grads = torch.autograd.grad(loss, [params[n] for n in names], create_graph=create_graph, materialize_grads=True)
    with torch.set_grad_enabled(create_graph):
        directions, state = learners.lstm_directions(params, grads, loss, state)
        stepped = dict(params)
        for n, direction in zip(names, directions):
            stepped[n] = params[n] - inner_lr * direction
    if not create_graph:
        stepped = {n: p.detach() for n, p in stepped.items()}
        state = tuple(t.detach() for t in state)
    return stepped, state


def init_step_sizes(
    params: Mapping[str, torch.Tensor], inner_lr: float, inner_params: Sequence[str] | None = None,
    *, per_layer_steps: int = 0,
) -> Params:
    """Meta-SGD's learned step sizes, all equal to α: one tensor shaped like each adapted parameter, or
    with ``per_layer_steps=S`` one scalar per parameter tensor and inner step, shaped ``[S, 1, ...]``
    (MAML++'s per-layer per-step learning rates, LSLR).

    Keys are parameter names (without the ``lr.`` prefix the wire and ``grads`` use).
    """
    names = _check_inner_params(dict(params), inner_params)
    _check_step_size(inner_lr, names, params, algorithm=None)
    if per_layer_steps:
        return {n: torch.full((per_layer_steps,) + (1,) * params[n].dim(), float(inner_lr), dtype=params[n].dtype,
                              device=params[n].device) for n in names}
    return {n: torch.full_like(params[n], float(inner_lr)) for n in names}


# --------------------------------------------------------------------------------------------------
# The meta-gradient a site sends


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

    ``grads`` has exactly the keys, shapes and dtypes of ``params``, averaged over ``episodes``
    (``fedavg``/``fedprox``: one continuous local run over all of them), plus ``"lr.<name>"`` for
    each Meta-SGD step size. The server applies it as a gradient: θ ← θ − η·grads.

    - ``maml``: ∇θ L_Q(θ′), θ′ from ``inner_steps`` steps on S, differentiated through the loop.
    - ``fomaml``: ∇L_Q at θ′ with the inner gradients detached.
    - ``reptile``: θ − θ′ after ``inner_steps`` SGD steps on S.
    - ``metasgd``: MAML with α a tensor per parameter (``inner_lr`` a dict, or a float to start all
      step sizes at); ``lr.<name>`` holds ∂L_Q/∂α.
    - ``anil``: MAML adapting only ``inner_params`` (default: the model's head); the meta-gradient
      still covers every parameter.
    - ``fedavg``/``fedprox``: ``inner_steps`` local epochs of SGD from θ, each through every
      episode's support then query batch in order (FedProx adds μ/2‖θ_local − θ‖²); sends
      θ − θ_local, so server SGD with lr 1 is FedAvg.

    Two MAML++ options (Antoniou et al., 2019) for the second-order algorithms:
    ``step_weights`` (one per inner step, see :func:`multi_step_loss_weights`) makes the meta-loss the
    weighted sum of the query loss after every inner step (multi-step loss) instead of after the last;
    ``first_order=True`` takes ``maml`` / ``anil`` through the FOMAML computation (derivative-order
    annealing: first order early in training, second order later).

    The other families (``model`` built with their learner, :mod:`fedmeta.common.learners`): ∇ of the
    query loss at the end of :func:`adaptation_trajectory`, taken through it, w.r.t. every parameter,
    the learner's own among them — ``fast-weights``: the generated head then ``inner_steps`` SGD steps;
    ``prototypes``: the query segmented by the support prototypes (after ``inner_steps`` of encoder
    fine-tuning); ``lstm-optimizer``: ``inner_steps`` learned-optimiser steps, the last ``truncation``
    of them differentiated (0: all). Step 0 (``*_before``) is the prepared θ.

    ``stats``: ``support_loss_before/after`` and ``query_loss_before/after`` (means over episodes, at
    θ and at the adapted parameters; after: the last inner step) and ``num_examples`` (support plus
    query images).

    ``batch_episodes``: FOMAML's episodes all at once (``torch.func.vmap``, :func:`_fomaml_batched`)
    rather than one after the other; the same numbers up to rounding (float64: equal to ~1e-15).
    ``None`` (default) does so where it measured faster (``fedmeta perf episodes``, 2D default model on
    a 2-core CPU): FOMAML with ``BATCH_FROM`` (4) or more episodes of one shape — a whole bare-loop
    run of 10 sites took 0.77–0.91× the loop's time with 4 episodes per site, but 1.03–1.05× with 3
    and 0.95–1.07× with the default 2, within the machine's noise (the micro-benchmark alone: 0.69–0.71×
    at 4, 0.87–1.00× at 2). MAML, second order, measured 0.83–1.14× and stays a loop. ``False`` keeps
    the loop; ``True`` asks for the batched path (FOMAML only).
    """
    params = _check_params(model, params)
    _check_algorithm(algorithm)
    _check_learner(model, algorithm)
    _check_steps(inner_steps)
    if not callable(loss_fn):
        raise ValueError(f"loss_fn must be callable(logits, target) -> scalar tensor; got {type(loss_fn).__name__}.")
    if algorithm == "anil" and inner_params is None:
        inner_params = head_parameter_names(model)
    names = _check_inner_params(params, inner_params, model)
    step_size = _check_step_size(inner_lr, names, params, algorithm=algorithm)
    episodes = _check_episodes(episodes)
    mu = _check_proximal_mu(proximal_mu, algorithm)
    weights = _check_step_weights(step_weights, inner_steps, algorithm, first_order)
    truncation = _check_truncation(truncation, inner_steps, algorithm)
    if first_order:
        algorithm = "fomaml"  # the same adapted parameters (ANIL: only the head), gradient taken at θ′

    if algorithm in LEARNER_ALGORITHMS:
        return _learner_meta_gradient(model, params, names, episodes, inner_steps, step_size, loss_fn, truncation)
    if algorithm in ("fedavg", "fedprox"):
        return _local_sgd(model, params, names, episodes, inner_steps, step_size, loss_fn, mu)
    if batch_episodes is True and algorithm != "fomaml":
        raise ValueError(f"batch_episodes=True batches FOMAML's episodes; algorithm={algorithm!r} runs them in a "
                         "loop (batching measured no faster for second-order algorithms). Leave it None.")
    if algorithm == "fomaml" and (batch_episodes or (batch_episodes is None and len(episodes) >= BATCH_FROM)):
        obstacle = _why_not_batched(model, episodes)
        if obstacle is None:
            return _fomaml_batched(model, params, names, episodes, inner_steps, step_size, loss_fn)
        if batch_episodes:
            raise ValueError(f"batch_episodes=True: {obstacle}. Leave it None to run the episodes in a loop.")

    totals = {n: torch.zeros_like(p) for n, p in params.items()}
    if algorithm == "metasgd":
        totals.update({STEP_SIZE_PREFIX + n: torch.zeros_like(a) for n, a in step_size.items()})
    losses, num_examples = _zero_stats(), 0

    for support_x, support_y, query_x, query_y in episodes:
        num_examples += int(support_x.shape[0]) + int(query_x.shape[0])
        if algorithm in SECOND_ORDER:
            grads, adapted, query_after, support_before = _second_order_episode(
                model, params, names, step_size, episodes_item=(support_x, support_y, query_x, query_y),
                inner_steps=inner_steps, loss_fn=loss_fn, learn_step_size=algorithm == "metasgd",
                step_weights=weights,
            )
        else:
            adapted, support_before = _adapt_first_order(
                model, params, names, support_x, support_y, inner_steps, step_size, loss_fn
            )
            # New tensors: with 0 inner steps `adapted` is the caller's θ, which must not be marked below.
            adapted = {n: p.detach() for n, p in adapted.items()}
            if algorithm == "reptile":
                grads = {n: params[n] - adapted[n] for n in params}
                query_after = _no_grad_loss(model, adapted, query_x, query_y, loss_fn)
            else:  # fomaml: the query gradient at the detached adapted parameters
                leaves = {n: p.requires_grad_(True) for n, p in adapted.items()}
                query_loss = _loss(model, leaves, query_x, query_y, loss_fn)
                grads = dict(zip(leaves, torch.autograd.grad(query_loss, list(leaves.values()), materialize_grads=True)))
                adapted = {n: p.detach() for n, p in leaves.items()}
                query_after = float(query_loss.detach())
        for key, value in grads.items():
            totals[key] += value.detach()
        losses["query_loss_after"] += query_after
        losses["query_loss_before"] += (
            query_after if inner_steps == 0 else _no_grad_loss(model, params, query_x, query_y, loss_fn)
        )
        losses["support_loss_before"] += (
            support_before if support_before is not None else _no_grad_loss(model, params, support_x, support_y, loss_fn)
        )
        losses["support_loss_after"] += _no_grad_loss(model, adapted, support_x, support_y, loss_fn)

    count = len(episodes)
    meta_grads = {key: (total / count).to(_dtype_of(key, params, step_size)) for key, total in totals.items()}
    return meta_grads, _mean_stats(losses, count, num_examples)


# At most this many episodes in one vmapped call: activations grow with it. Eight FOMAML episodes (2D
# default model, 2-core CPU) took 1.1x the loop's time in chunks of 2, 0.8x in chunks of 4, 0.7x in one
# chunk of 8; 4 keeps most of the gain with half the memory of 8.
EPISODE_CHUNK = 4
# FOMAML batches its episodes by default from this many on (fewer measured slower batched; meta_gradient).
BATCH_FROM = 4


def _why_not_batched(model: torch.nn.Module, episodes: Sequence[Episode]) -> str | None:
    """Why these episodes cannot be vmapped with the loop's numbers, or None."""
    if any(isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0 and m.training for m in model.modules()):
        return "the model's dropout is active, and vmap would draw its random masks differently from the loop"
    if len({tuple(tuple(t.shape) for t in episode) for episode in episodes}) > 1:
        return "the episodes differ in shape (k, q or image size); vmap needs one shape"
    return None


def _fomaml_batched(model, params, names, episodes, inner_steps, step_size, loss_fn) -> tuple[Params, dict[str, float]]:
    """FOMAML as the loop above computes it, for same-shaped episodes at once (torch.func.vmap).

    Each episode's inner steps and its query gradient at θ′ are one function of its four tensors,
    vmapped over the episodes (θ shared, unbatched); the statistics are the loop's, from the same
    forward passes. Sums over episodes then divide by their count, as the loop does.
    """
    from torch.func import grad_and_value, vmap

    theta = {n: p.detach() for n, p in params.items()}

    def episode(support_x, support_y, query_x, query_y):
        adapted, support_before = dict(theta), None
        for step in range(inner_steps):
            def support_loss(sub, adapted=adapted):
                return _loss(model, {**adapted, **sub}, support_x, support_y, loss_fn)

            grads, loss = grad_and_value(support_loss)({n: adapted[n] for n in names})
            if step == 0:
                support_before = loss
            adapted = dict(adapted)
            for n in names:
                alpha = _alpha_at(step_size[n], adapted[n], step) if isinstance(step_size, Mapping) else step_size
                adapted[n] = adapted[n] - alpha * grads[n]
        query_grads, query_after = grad_and_value(lambda leaves: _loss(model, leaves, query_x, query_y, loss_fn))(adapted)
        with torch.no_grad():
            query_before = query_after if inner_steps == 0 else _loss(model, theta, query_x, query_y, loss_fn)
            if support_before is None:
                support_before = _loss(model, theta, support_x, support_y, loss_fn)
            support_after = _loss(model, adapted, support_x, support_y, loss_fn)
        return query_grads, torch.stack([support_before, support_after, query_before, query_after])

    stacked = [torch.stack([e[i] for e in episodes]) for i in range(4)]
    grads, losses = vmap(episode, chunk_size=EPISODE_CHUNK)(*stacked)
    count = len(episodes)
    meta_grads = {n: (grads[n].sum(0) / count).to(params[n].dtype) for n in params}
    keys = ("support_loss_before", "support_loss_after", "query_loss_before", "query_loss_after")
    sums = {key: sum(float(v) for v in losses[:, i]) for i, key in enumerate(keys)}  # as the loop adds them
    num_examples = sum(int(e[0].shape[0]) + int(e[2].shape[0]) for e in episodes)
    return meta_grads, _mean_stats(sums, count, num_examples)


def _second_order_episode(model, params, names, step_size, *, episodes_item, inner_steps, loss_fn, learn_step_size,
                          step_weights=None):
    """∇ of the query loss through the inner loop, w.r.t. θ (and Meta-SGD's α when learned).

    With ``step_weights`` the differentiated loss is Σ_j w_j L_Q(θ_j) over the inner steps j (MAML++'s
    multi-step loss); the reported query loss is the last step's either way.
    """
    support_x, support_y, query_x, query_y = episodes_item
    theta = {n: p.detach().requires_grad_(True) for n, p in params.items()}
    alpha = {n: a.detach().requires_grad_(True) for n, a in step_size.items()} if learn_step_size else step_size
    adapted, support_before = theta, None
    earlier_steps = 0.0
    for step in range(inner_steps):
        adapted, loss = _inner_step(model, adapted, names, support_x, support_y, alpha, loss_fn, first_order=False,
                                    step=step)
        if step == 0:
            support_before = float(loss)
        if step_weights is not None and step < inner_steps - 1 and step_weights[step] > 0:
            earlier_steps = earlier_steps + step_weights[step] * _loss(model, adapted, query_x, query_y, loss_fn)
    query_loss = _loss(model, adapted, query_x, query_y, loss_fn)
    meta_loss = query_loss if step_weights is None else step_weights[-1] * query_loss + earlier_steps
    inputs = dict(theta)
    if learn_step_size:
        inputs.update({STEP_SIZE_PREFIX + n: a for n, a in alpha.items()})
    grads = torch.autograd.grad(meta_loss, list(inputs.values()), materialize_grads=True)
    adapted = {n: p.detach() for n, p in adapted.items()}
    return dict(zip(inputs, grads)), adapted, float(query_loss.detach()), support_before


def _learner_meta_gradient(model, params, names, episodes, inner_steps, step_size, loss_fn, truncation):
    """The other families' meta-gradient: the query loss differentiated through the adaptation trajectory."""
    totals = {n: torch.zeros_like(p) for n, p in params.items()}
    losses, num_examples = _zero_stats(), 0
    for support_x, support_y, query_x, query_y in episodes:
        num_examples += int(support_x.shape[0]) + int(query_x.shape[0])
        theta = {n: p.detach().requires_grad_(True) for n, p in params.items()}
        prepared = adapted = None
        for adapted in _trajectory(model, theta, names, support_x, support_y, inner_steps, step_size, loss_fn,
                                   create_graph=True, truncation=truncation):
            prepared = adapted if prepared is None else prepared
        query_y = learners.in_support_label_space(model, adapted, query_y)
        query_loss = _loss(model, adapted, query_x, query_y, loss_fn)
        grads = torch.autograd.grad(query_loss, list(theta.values()), materialize_grads=True)
        for key, value in zip(theta, grads):
            totals[key] += value.detach()
        prepared = {n: p.detach() for n, p in prepared.items()}
        adapted = {n: p.detach() for n, p in adapted.items()}
        losses["query_loss_after"] += float(query_loss.detach())
        losses["query_loss_before"] += _no_grad_loss(model, prepared, query_x, query_y, loss_fn)
        losses["support_loss_before"] += _no_grad_loss(model, prepared, support_x, support_y, loss_fn)
        losses["support_loss_after"] += _no_grad_loss(model, adapted, support_x, support_y, loss_fn)
    count = len(episodes)
    return {key: (total / count).to(params[key].dtype) for key, total in totals.items()}, \
        _mean_stats(losses, count, num_examples)


def multi_step_loss_weights(inner_steps: int, server_round: int, anneal_rounds: int) -> list[float] | None:
    """MAML++'s per-step importance of the query loss in round ``server_round`` (1-based).

    Uniform over the inner steps in round 1, the earlier steps' weights then fall linearly to zero by
    round ``anneal_rounds`` and the last step takes the rest; afterwards (or with ``anneal_rounds`` 0,
    or one inner step) None: the plain last-step meta-loss.
    """
    if anneal_rounds <= 0 or inner_steps <= 1 or server_round > anneal_rounds:
        return None
    earlier = (1.0 / inner_steps) * (1.0 - (max(server_round, 1) - 1) / anneal_rounds)
    return [earlier] * (inner_steps - 1) + [1.0 - earlier * (inner_steps - 1)]


def _local_sgd(model, params, names, episodes, epochs, step_size, loss_fn, mu):
    """FedAvg/FedProx local training: one continuous SGD run, sends θ − θ_local."""
    anchor = {n: p.detach() for n, p in params.items()}
    local = dict(anchor)
    proximal = (mu, anchor) if mu > 0 else None  # μ = 0 is FedAvg exactly, not FedAvg plus a zero term
    for _ in range(epochs):
        for support_x, support_y, query_x, query_y in episodes:
            for x, y in ((support_x, support_y), (query_x, query_y)):
                local, _ = _inner_step(model, local, names, x, y, step_size, loss_fn, first_order=True, proximal=proximal)
    stats, num_examples = _zero_stats(), 0
    for support_x, support_y, query_x, query_y in episodes:
        num_examples += int(support_x.shape[0]) + int(query_x.shape[0])
        stats["support_loss_before"] += _no_grad_loss(model, anchor, support_x, support_y, loss_fn)
        stats["support_loss_after"] += _no_grad_loss(model, local, support_x, support_y, loss_fn)
        stats["query_loss_before"] += _no_grad_loss(model, anchor, query_x, query_y, loss_fn)
        stats["query_loss_after"] += _no_grad_loss(model, local, query_x, query_y, loss_fn)
    return {n: anchor[n] - local[n] for n in anchor}, _mean_stats(stats, len(episodes), num_examples)


def _zero_stats() -> dict[str, float]:
    return {"support_loss_before": 0.0, "support_loss_after": 0.0, "query_loss_before": 0.0, "query_loss_after": 0.0}


def _mean_stats(sums: dict[str, float], episodes: int, num_examples: int) -> dict[str, float]:
    """Per-episode means of the summed losses, plus the example count the server weights by."""
    return {**{key: value / episodes for key, value in sums.items()}, "num_examples": float(num_examples)}


def _no_grad_loss(model, params, x, y, loss_fn) -> float:
    with torch.no_grad():
        return float(_loss(model, params, x, y, loss_fn))


def _dtype_of(key: str, params: Params, step_size: StepSize) -> torch.dtype:
    if key.startswith(STEP_SIZE_PREFIX) and key not in params:
        return step_size[key[len(STEP_SIZE_PREFIX):]].dtype
    return params[key].dtype


# --------------------------------------------------------------------------------------------------
# Argument checks: each names the problem and the valid choices.


def _check_algorithm(algorithm: str) -> None:
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {algorithm!r}; valid choices: {', '.join(ALGORITHMS)}.")


def _check_steps(inner_steps) -> None:
    if isinstance(inner_steps, bool) or not isinstance(inner_steps, int):
        raise ValueError(f"inner_steps must be an int >= 0; got {inner_steps!r} ({type(inner_steps).__name__}).")
    if inner_steps < 0:
        raise ValueError(f"inner_steps={inner_steps} is negative; use 0 (no adaptation) or more.")


def _check_params(model: torch.nn.Module, params) -> Params:
    if not isinstance(params, Mapping) or not params:
        raise ValueError("params must be a non-empty dict[str, Tensor] of the model's parameters (θ).")
    expected = dict(model.named_parameters())
    missing = sorted(set(expected) - set(params))
    unexpected = sorted(set(params) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"params do not match {type(model).__name__}: missing {missing[:5]}{' …' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{' …' if len(unexpected) > 5 else ''}; pass exactly "
            "dict(model.named_parameters()) (θ and nothing else; Meta-SGD step sizes go in inner_lr)."
        )
    for name, value in params.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"params[{name!r}] is a {type(value).__name__}, not a torch.Tensor.")
        if value.shape != expected[name].shape:
            raise ValueError(
                f"params[{name!r}] has shape {tuple(value.shape)} but the model expects "
                f"{tuple(expected[name].shape)}; was θ built for another model configuration?"
            )
        if not value.is_floating_point():
            raise ValueError(f"params[{name!r}] has dtype {value.dtype}; parameters must be floating point.")
        if not torch.isfinite(value).all():
            raise ValueError(f"params[{name!r}] holds NaN or Inf values; θ must be finite.")
    return dict(params)


def _check_learner(model: torch.nn.Module, algorithm: str) -> None:
    kind = learners.learner_of(model)
    wanted = algorithm if algorithm in LEARNER_ALGORITHMS else None
    if kind != wanted:
        raise ValueError(
            f"algorithm={algorithm!r} needs " + (f"the {wanted} learner's model" if wanted else "a plain UNet")
            + f", and the model is {'a plain UNet' if kind is None else f'the {kind} learner'}; build it with "
            "fedmeta.common.model.build_model(run_config.model_config()), which picks the model for the algorithm."
        )


def _check_truncation(truncation, inner_steps: int, algorithm: str) -> int:
    if isinstance(truncation, bool) or not isinstance(truncation, int) or truncation < 0:
        raise ValueError(f"truncation={truncation!r} must be an int >= 0 (0: backpropagate through every inner step).")
    if truncation and algorithm != "lstm-optimizer":
        raise ValueError(f"truncation={truncation} truncates the learned optimiser's unrolled inner loop; "
                         f"algorithm={algorithm!r} has none. Set it to 0.")
    if truncation > inner_steps:
        raise ValueError(f"truncation={truncation} exceeds inner_steps={inner_steps}; use at most {inner_steps} "
                         "(or 0 for every step).")
    return truncation


def _check_inner_params(params: Params, inner_params, model: torch.nn.Module | None = None) -> list[str]:
    own = set(learners.meta_only_names(model, list(params))) if model is not None else set()
    if inner_params is None:
        return [n for n in params if n not in own]
    if isinstance(inner_params, str):
        raise ValueError(f"inner_params must be a list of parameter names, not the string {inner_params!r}.")
    names = list(inner_params)
    unknown = [n for n in names if n not in params]
    if unknown:
        raise ValueError(
            f"inner_params names {unknown[:5]} are not parameters of the model; valid names are the keys "
            "of params (e.g. from fedmeta.common.model.head_parameter_names(model))."
        )
    if not names:
        raise ValueError("inner_params is empty: name at least one parameter to adapt, or pass None for all.")
    stepped = [n for n in names if n in own]
    if stepped:
        raise ValueError(f"inner_params names {stepped[:5]}, the {learners.learner_of(model)} learner's own parameters: "
                         "they are meta-learned across sites, never stepped by the inner loop.")
    return names


def _check_step_size(inner_lr, names: list[str], params: Mapping[str, torch.Tensor], *, algorithm) -> StepSize:
    if isinstance(inner_lr, Mapping):
        if algorithm not in (None, "metasgd"):
            raise ValueError(
                f"inner_lr is a dict of per-parameter step sizes, which only algorithm='metasgd' learns; "
                f"pass a float for {algorithm!r}."
            )
        missing = [n for n in names if n not in inner_lr]
        extra = [n for n in inner_lr if n not in names]
        if missing or extra:
            raise ValueError(
                f"Meta-SGD inner_lr must hold one step size per adapted parameter: missing {missing[:5]}, "
                f"not adapted {extra[:5]}; build it with fedmeta.common.meta.init_step_sizes(params, alpha, inner_params)."
            )
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
                torch.broadcast_shapes(alpha.shape, params[name].shape)
            except RuntimeError:
                raise ValueError(
                    f"inner_lr[{name!r}] has shape {tuple(alpha.shape)}, not broadcastable to the parameter's "
                    f"{tuple(params[name].shape)}."
                ) from None
            if torch.broadcast_shapes(alpha.shape, params[name].shape) != params[name].shape:
                raise ValueError(
                    f"inner_lr[{name!r}] of shape {tuple(alpha.shape)} would enlarge the parameter's shape "
                    f"{tuple(params[name].shape)}; use a scalar or the parameter's shape."
                )
            if not torch.isfinite(inner_lr[name]).all():
                raise ValueError(f"inner_lr[{name!r}] holds NaN or Inf values.")
        return {n: inner_lr[n] for n in names}
    if isinstance(inner_lr, bool) or not isinstance(inner_lr, (int, float)):
        raise ValueError(f"inner_lr must be a float (or, for metasgd, a dict of tensors); got {inner_lr!r}.")
    if not math.isfinite(inner_lr) or inner_lr < 0:
        raise ValueError(f"inner_lr={inner_lr!r} must be finite and >= 0 (a step size such as 0.01).")
    if algorithm == "metasgd":
        # A float starts every learned step size at α, each shaped like its parameter (Meta-SGD).
        return init_step_sizes(params, float(inner_lr), names)
    return float(inner_lr)


def _check_episodes(episodes) -> list[Episode]:
    if isinstance(episodes, (torch.Tensor, str)) or not isinstance(episodes, Sequence) or not episodes:
        raise ValueError(
            "episodes must be a non-empty list of (support_x, support_y, query_x, query_y) tuples from one site."
        )
    checked = []
    fields = ("support_x", "support_y", "query_x", "query_y")
    for index, episode in enumerate(episodes):
        if not isinstance(episode, (tuple, list)) or len(episode) != 4:
            raise ValueError(
                f"episode {index} must be a 4-tuple (support_x, support_y, query_x, query_y); got "
                f"{type(episode).__name__} of length {len(episode) if hasattr(episode, '__len__') else '?'}."
            )
        for field, tensor in zip(fields, episode):
            if not isinstance(tensor, torch.Tensor):
                raise ValueError(f"episode {index} {field} is a {type(tensor).__name__}, not a torch.Tensor.")
            if tensor.numel() == 0:
                raise ValueError(f"episode {index} {field} is empty; each set needs at least one image.")
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                raise ValueError(
                    f"episode {index} {field} holds NaN or Inf values; check the site's images "
                    "(`fedmeta check-data`)."
                )
        support_x, support_y, query_x, query_y = episode
        if support_x.shape[0] != support_y.shape[0] or query_x.shape[0] != query_y.shape[0]:
            raise ValueError(
                f"episode {index}: images and targets disagree in count (support {support_x.shape[0]} vs "
                f"{support_y.shape[0]}, query {query_x.shape[0]} vs {query_y.shape[0]})."
            )
        checked.append(tuple(episode))
    return checked


def _check_step_weights(step_weights, inner_steps: int, algorithm: str, first_order: bool) -> list[float] | None:
    if first_order and algorithm not in ("maml", "anil"):
        raise ValueError(f"first_order=True anneals maml or anil's derivative order; algorithm={algorithm!r} "
                         "is first order already or learns step sizes that need the second-order path.")
    if step_weights is None:
        return None
    if algorithm not in SECOND_ORDER:
        raise ValueError(f"step_weights (the multi-step loss) apply to {', '.join(SECOND_ORDER)}; "
                         f"algorithm={algorithm!r} has no query loss inside its inner loop.")
    weights = [float(w) for w in step_weights]
    if len(weights) != inner_steps or any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"step_weights={list(step_weights)} must be {inner_steps} finite weights >= 0 "
                         "(one per inner step) with a positive sum.")
    return None if first_order else weights


def _check_proximal_mu(proximal_mu, algorithm: str) -> float:
    if isinstance(proximal_mu, bool) or not isinstance(proximal_mu, (int, float)) or not math.isfinite(proximal_mu):
        raise ValueError(f"proximal_mu must be a finite float >= 0; got {proximal_mu!r}.")
    if proximal_mu < 0:
        raise ValueError(f"proximal_mu={proximal_mu} is negative; FedProx's μ must be >= 0.")
    if proximal_mu > 0 and algorithm != "fedprox":
        raise ValueError(
            f"proximal_mu={proximal_mu} applies only to algorithm='fedprox'; got algorithm={algorithm!r}. "
            "Set proximal_mu=0 or use fedprox."
        )
    return float(proximal_mu)


__all__ = ["ALGORITHMS", "LEARNER_ALGORITHMS", "SECOND_ORDER", "STEP_SIZE_PREFIX", "adapt", "adaptation_trajectory",
           "init_step_sizes", "meta_gradient",
           "multi_step_loss_weights"]
