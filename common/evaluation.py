"""How a new site's adaptation is scored: k-shot fine-tuning from θ, Dice on its other patients."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch.func import functional_call

from common.losses import dice_per_class, mean_dice, one_hot
from common.meta import StepSize, adapt


@torch.no_grad()
def predict(model: torch.nn.Module, params: Mapping[str, torch.Tensor], x: torch.Tensor, batch_size: int = 32):
    """Logits ``[N, C, *spatial]`` for images ``[N, 1, *spatial]``, in batches to bound memory."""
    return torch.cat([functional_call(model, dict(params), (x[i : i + batch_size],)) for i in range(0, len(x), batch_size)])


def adaptation_curve(
    model: torch.nn.Module,
    params: Mapping[str, torch.Tensor],
    support_x: torch.Tensor,
    support_y: torch.Tensor,
    eval_x: torch.Tensor,
    eval_y: torch.Tensor,
    *,
    steps: Sequence[int],
    inner_lr: StepSize,
    loss_fn,
    num_classes: int,
    inner_params: Sequence[str] | None = None,
    batch_size: int = 32,
) -> dict[int, dict]:
    """Dice on the evaluation set after each number of adaptation steps in ``steps``.

    ``support_y``/``eval_y`` are integer label maps. Adaptation is :func:`common.meta.adapt`, the
    training inner step; the steps run once, in order, scoring on the way (0 steps scores θ itself).
    Returns ``{steps: {"dice": mean foreground Dice, "dice_per_class": [...]}}``.
    """
    if not steps or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in steps):
        raise ValueError(f"steps={list(steps)} must be a non-empty list of ints >= 0, e.g. [0, 5, 10].")
    dtype = next(iter(params.values())).dtype
    support_target = one_hot(support_y, num_classes, dtype)
    adapted = {n: p.detach() for n, p in params.items()}
    done, curve = 0, {}
    for target_steps in sorted(set(steps)):
        adapted = adapt(
            model, adapted, support_x, support_target,
            inner_steps=target_steps - done, inner_lr=inner_lr, loss_fn=loss_fn, inner_params=inner_params,
        )
        done = target_steps
        per_class = dice_per_class(predict(model, adapted, eval_x, batch_size), eval_y, num_classes)
        curve[target_steps] = {"dice": mean_dice(per_class), "dice_per_class": [float(v) for v in per_class]}
    return curve
