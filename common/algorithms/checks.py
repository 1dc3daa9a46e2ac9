"""Argument checks every local update and adaptation makes: each names the problem and the valid choices."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from fedmeta.common.inner_loop import Episode, Params


def check_steps(inner_steps) -> None:
    if isinstance(inner_steps, bool) or not isinstance(inner_steps, int):
        raise ValueError(f"inner_steps must be an int >= 0; got {inner_steps!r} ({type(inner_steps).__name__}).")
    if inner_steps < 0:
        raise ValueError(f"inner_steps={inner_steps} is negative; use 0 (no adaptation) or more.")


def check_params(model: torch.nn.Module, params) -> Params:
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


def check_inner_params(params: Params, inner_params, model: torch.nn.Module | None = None) -> list[str]:
    own = set(meta_only_names(model, list(params))) if model is not None else set()
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
        raise ValueError(f"inner_params names {stepped[:5]}, the {getattr(model, 'learner', None)} learner's own parameters: "
                         "they are meta-learned across sites, never stepped by the inner loop.")
    return names


def check_episodes(episodes) -> list[Episode]:
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


def check_loss_fn(loss_fn) -> None:
    if not callable(loss_fn):
        raise ValueError(f"loss_fn must be callable(logits, target) -> scalar tensor; got {type(loss_fn).__name__}.")


def meta_only_names(model: torch.nn.Module, names: Sequence[str]) -> list[str]:
    """The names that are a learner's own machinery, not the UNet's: never stepped by the inner loop."""
    own = getattr(model, "is_own_parameter", None)
    return [n for n in names if own(n)] if own is not None else []


__all__ = ["check_episodes", "check_inner_params", "check_loss_fn", "check_params", "check_steps"]
