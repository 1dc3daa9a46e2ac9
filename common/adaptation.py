"""A new site adapts an initialisation: k-shot fine-tuning from θ, scored by Dice on its other patients.

One path for every caller: the ClientApp's evaluate handler, ``fedmeta evaluate`` at a hospital, and
the researcher's comparisons (``fedmeta simulate``'s report, ``fedmeta benchmark``) all adapt with
:func:`adaptation_curve`, whose inner step is training's own (:func:`fedmeta.common.meta.adapt`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.func import functional_call

from fedmeta.common.checkpoint import load_checkpoint
from fedmeta.common.config import RunConfig
from fedmeta.common.data import SiteDataset, adaptation_split, evaluation_subset
from fedmeta.common.losses import DiceCELoss, dice_per_class, mean_dice, one_hot
from fedmeta.common.meta import StepSize, adapt
from fedmeta.common.model import head_parameter_names, initial_params, seeded_model


@dataclass
class Initialisation:
    """A θ to adapt, with the adaptation rule its training implies (Meta-SGD: learned step sizes)."""

    label: str
    params: dict[str, torch.Tensor]
    inner_lr: float | dict[str, torch.Tensor]
    head_only: bool = False  # ANIL adapts only the head


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

    ``support_y``/``eval_y`` are integer label maps. Adaptation is :func:`fedmeta.common.meta.adapt`, the
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


def load_initialisation(checkpoint_path: Path | str, label: str | None = None) -> tuple[Initialisation, RunConfig]:
    """(Initialisation, RunConfig) from a ServerApp checkpoint; its run config says how θ adapts."""
    path = Path(checkpoint_path)
    if not path.is_file():
        raise FileNotFoundError(f"--checkpoint {path}: no such file; pass the checkpoint.pt of a fedmeta run.")
    checkpoint = load_checkpoint(path)
    try:
        config = RunConfig.from_run_config(checkpoint.run_config)
    except ValueError as err:
        raise ValueError(f"{path}: its run config is not valid for this fedmeta version ({err}).") from None
    inner_lr: Any = config.inner_lr
    if config.algorithm == "metasgd":
        if not checkpoint.step_sizes:
            raise ValueError(f"{path}: a metasgd checkpoint without step sizes; it cannot adapt as it was trained.")
        inner_lr = checkpoint.step_sizes
    init = Initialisation(label or f"{config.algorithm} (round {checkpoint.round})", checkpoint.params, inner_lr,
                          head_only=config.algorithm == "anil")
    return init, config


def random_initialisation(config: RunConfig) -> Initialisation:
    """The scratch baseline: the same seeded θ the federation started from, never trained."""
    return Initialisation("random init", initial_params(seeded_model(config.model_config(), config.seed)), config.inner_lr)


def score_site(
    model: torch.nn.Module,
    init: Initialisation,
    site: SiteDataset,
    *,
    shots: Sequence[int],
    steps: Sequence[int],
    seed: int,
    num_classes: int,
    max_images: int,
    batch_size: int = 32,
    splits: dict | None = None,
) -> dict[int, dict[int, dict[str, Any]]]:
    """``{k: {steps: {"dice", "dice_per_class", "eval_images"}}}`` for one initialisation on one site.

    For one seed the evaluation patients are the same for every k and the support sets are nested.
    ``splits`` caches the split per (site, k, seed) across initialisations, so every initialisation
    adapts on the very same slices.
    """
    splits = {} if splits is None else splits
    out: dict[int, dict[int, dict[str, Any]]] = {}
    for k in shots:
        key = (str(site.root), k, seed)
        if key not in splits:
            support_x, support_y, eval_x, eval_y = adaptation_split(site, k, seed=seed)
            splits[key] = (support_x, support_y, *evaluation_subset(eval_x, eval_y, max_images, seed=seed))
        support_x, support_y, eval_x, eval_y = splits[key]
        curve = adaptation_curve(
            model, init.params, support_x, support_y, eval_x, eval_y, steps=list(steps), inner_lr=init.inner_lr,
            loss_fn=DiceCELoss(num_classes), num_classes=num_classes,
            inner_params=head_parameter_names(model) if init.head_only else None, batch_size=batch_size,
        )
        out[k] = {s: {"dice": float(curve[s]["dice"]), "dice_per_class": curve[s]["dice_per_class"],
                      "eval_images": int(len(eval_x))} for s in steps}
    return out


__all__ = ["Initialisation", "adaptation_curve", "load_initialisation", "predict", "random_initialisation",
           "score_site"]
