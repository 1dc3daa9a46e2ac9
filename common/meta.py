"""The MAML family as pure functions over parameter dicts (torch.func).

One computation matters: the update a site sends after adapting the shared initialisation θ to its
own episodes. Every algorithm here is a few lines over one shared inner step, :func:`_inner_step`,
which evaluation (:func:`adapt`) uses too, so training and testing adapt identically.

The model is only ever called as ``functional_call(model, params, (x,))``: its own parameters are
never read or written, so one module instance serves any θ.

References: MAML and its first-order variant (Finn et al., 2017), Reptile (Nichol et al., 2018),
Meta-SGD (Li et al., 2017), ANIL (Raghu et al., 2020), FedAvg (McMahan et al., 2017), FedProx
(Li et al., 2020). ``../shared/FIELD.md`` §1 states what each one sends.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch
from torch.func import functional_call

from fedmeta.common.model import head_parameter_names
from fedmeta.common.protocol import ALGORITHMS, STEP_SIZE_PREFIX

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
) -> tuple[Params, torch.Tensor]:
    """One SGD step (the ``step``-th of the inner loop) on the parameters ``names``; the others pass through.

    Returns the stepped parameters and the (detached) loss before the step. With
    ``first_order=False`` the step stays in the autograd graph, so a gradient of a later loss
    flows back through it to θ (MAML); ``first_order`` cuts it (FOMAML, Reptile, FedAvg,
    evaluation). ``step_size`` is α, or Meta-SGD's learned tensors: shaped like each parameter, or
    (MAML++'s LSLR) one scalar per layer and inner step, ``[steps, 1, ...]``, of which step ``step``
    is taken (the last one for steps beyond those trained). ``proximal=(μ, θ₀)`` adds FedProx's
    μ/2‖θ − θ₀‖².

    torch.autograd.grad rather than a nested torch.func.grad: on this UNet it measured ~15 % faster
    per step on CPU (``fedmeta perf meta``), and both give the same gradients.
    """
    if first_order:
        params = {n: p.detach().requires_grad_(n in names) for n, p in params.items()}
    loss = _loss(model, params, x, y, loss_fn)
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
    params = {n: p.detach() for n, p in params.items()}
    names = _check_inner_params(params, inner_params)
    _check_steps(inner_steps)
    _check_step_size(inner_lr, names, params, algorithm=None)
    adapted = params
    for step in range(first_step, first_step + inner_steps):
        adapted, _ = _inner_step(model, adapted, names, support_x, support_y, inner_lr, loss_fn, first_order=True,
                                 step=step)
    return adapted


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

    ``stats``: ``support_loss_before/after`` and ``query_loss_before/after`` (means over episodes, at
    θ and at the adapted parameters; after: the last inner step) and ``num_examples`` (support plus
    query images).
    """
    params = _check_params(model, params)
    _check_algorithm(algorithm)
    _check_steps(inner_steps)
    if not callable(loss_fn):
        raise ValueError(f"loss_fn must be callable(logits, target) -> scalar tensor; got {type(loss_fn).__name__}.")
    if algorithm == "anil" and inner_params is None:
        inner_params = head_parameter_names(model)
    names = _check_inner_params(params, inner_params)
    step_size = _check_step_size(inner_lr, names, params, algorithm=algorithm)
    episodes = _check_episodes(episodes)
    mu = _check_proximal_mu(proximal_mu, algorithm)
    weights = _check_step_weights(step_weights, inner_steps, algorithm, first_order)
    if first_order:
        algorithm = "fomaml"  # the same adapted parameters (ANIL: only the head), gradient taken at θ′

    if algorithm in ("fedavg", "fedprox"):
        return _local_sgd(model, params, names, episodes, inner_steps, step_size, loss_fn, mu)

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


def _check_inner_params(params: Params, inner_params) -> list[str]:
    if inner_params is None:
        return list(params)
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


__all__ = ["ALGORITHMS", "SECOND_ORDER", "STEP_SIZE_PREFIX", "adapt", "init_step_sizes", "meta_gradient",
           "multi_step_loss_weights"]
