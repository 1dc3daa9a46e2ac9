"""A new site adapts an initialisation: k-shot fine-tuning from θ, scored by Dice on its other patients.

One path for every caller: the ClientApp's evaluate handler, ``fedmeta evaluate`` at a hospital, and
the researcher's comparisons (``fedmeta simulate``'s report, ``fedmeta benchmark``) all adapt with
:func:`adaptation_curve`, whose inner step is training's own (:func:`fedmeta.common.meta.adapt`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.func import functional_call

from fedmeta.common.adaptation_variants import DEFAULT as DEFAULT_VARIANT, Variant, check_applies, variant_named
from fedmeta.common.algorithms import ALGORITHMS
from fedmeta.common.checkpoint import PLAUSIBLE_WEIGHT, load_checkpoint
from fedmeta.common.config import RunConfig, stored_run_config
from fedmeta.common.data import SiteDataset, adaptation_support, evaluation_patients
from fedmeta.common.losses import DiceCELoss, one_hot
from fedmeta.common.meta import StepSize
from fedmeta.common.metrics import foreground_classes, patient_dice, summarise_patients
from fedmeta.common.model import ModelConfig, build_model, head_parameter_names, initial_params, seeded_model
from fedmeta.common.step_selection import AUTO, candidate_steps, choose_steps


@dataclass
class Initialisation:
    """A θ to adapt, with the adaptation rule its training implies (Meta-SGD: learned step sizes; the other
    families: the learner its ``model_config`` builds)."""

    label: str
    params: dict[str, torch.Tensor]
    inner_lr: float | dict[str, torch.Tensor]
    head_only: bool = False  # ANIL adapts only the head
    round: int = -1  # the federation round θ comes from (-1: not from a checkpoint)
    model_config: ModelConfig | None = None  # the network θ belongs to (None: the caller's)
    variant: str = DEFAULT_VARIANT  # how a new site adapts it: its run config's adapt-variant


class AdaptationDiverged(ValueError):
    """Adapted weights that are no longer a model (NaN, Inf, or beyond any trained weight): the step size is too
    large for this support set. ``step``: the first adaptation step after which they were."""

    def __init__(self, message: str, step: int) -> None:
        super().__init__(message)
        self.step = step


@torch.no_grad()
def check_adapted(adapted: Mapping[str, torch.Tensor], *, step: int, inner_steps: int) -> None:
    """Raises :class:`AdaptationDiverged` when ``adapted`` (the weights after ``step`` of ``inner_steps`` steps)
    hold NaN or Inf or a value beyond :data:`fedmeta.common.checkpoint.PLAUSIBLE_WEIGHT`: scored, such weights give a
    Dice of 0 that reads as a result; saved, a model that segments nothing."""
    for name, tensor in adapted.items():
        finite = bool(torch.isfinite(tensor).all())
        largest = float(tensor.abs().max()) if finite and tensor.numel() else 0.0
        if finite and largest <= PLAUSIBLE_WEIGHT:
            continue
        what = "hold NaN or Inf" if not finite else f"reach magnitude {largest:.3g}, beyond any trained weight"
        raise AdaptationDiverged(
            f"adaptation diverged: after step {step} of {inner_steps} the adapted weights {what} (e.g. {name!r}), so "
            "the adapted model is broken and any Dice of it would be 0; the adaptation step size is too large for "
            "this support set", step)


@torch.no_grad()
def predict(model: torch.nn.Module, params: Mapping[str, torch.Tensor], x: torch.Tensor, batch_size: int = 32):
    """Logits ``[N, C, *spatial]`` for images ``[N, 1, *spatial]``, in batches to bound memory."""
    return torch.cat([functional_call(model, dict(params), (x[i : i + batch_size],)) for i in range(0, len(x), batch_size)])


@torch.no_grad()
def predict_with(variant: Variant, model: torch.nn.Module, prepared: Mapping[str, torch.Tensor],
                 adapted: Mapping[str, torch.Tensor], x: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """:func:`predict` as ``variant`` predicts (``prepared``: step 0 of its trajectory); fine-tune's is :func:`predict`'s."""
    return torch.cat([variant.logits(model, dict(prepared), dict(adapted), x[i : i + batch_size])
                      for i in range(0, len(x), batch_size)])


def adaptation_curve(
    model: torch.nn.Module,
    params: Mapping[str, torch.Tensor],
    support_x: torch.Tensor,
    support_y: torch.Tensor,
    patients: Sequence[tuple[str, torch.Tensor, torch.Tensor]],
    *,
    steps: Sequence[int],
    inner_lr: StepSize,
    loss_fn,
    num_classes: int,
    classes: Sequence[int] | None = None,
    inner_params: Sequence[str] | None = None,
    batch_size: int = 32,
    refuse_diverged: bool = False,
    variant: str | Variant = DEFAULT_VARIANT,
) -> dict[int, dict]:
    """Per-patient Dice of the evaluation patients after each number of adaptation steps in ``steps``.

    ``support_y`` is an integer label map ``[k, H, W]``; ``patients`` holds ``(patient id, volume
    [N, 1, H, W], labels [N, H, W])`` per evaluation patient, every slice of the volume. Adaptation
    is :func:`fedmeta.common.meta.adaptation_trajectory`, the training inner step; the steps run once, in
    order, scoring on the way (0 steps scores θ itself, or θ as a learner prepares it for the support set:
    a generated head, the support prototypes). ``classes`` are the site's declared foreground
    classes (default: all). Returns ``{steps: summary}`` with the keys of
    :func:`fedmeta.common.metrics.summarise_patients`. With ``refuse_diverged`` it raises
    :class:`AdaptationDiverged` when a step leaves the weights non-finite or implausibly large
    (:func:`check_adapted`) rather than scoring a broken model: a hospital's ``evaluate`` asks for that. A
    benchmark or a held-out evaluation during training scores it (a Dice of 0 there is the result: that
    method's adaptation diverged at that step count). ``variant``: how the site adapts and predicts
    (:mod:`fedmeta.common.adaptation_variants`; ``fine-tune``, the default, steps every parameter
    ``inner_params`` names), refused where it does not apply to ``model``.
    """
    chosen = variant_named(variant)
    check_applies(chosen, model)
    if not steps or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in steps):
        raise ValueError(f"steps={list(steps)} must be a non-empty list of ints >= 0, e.g. [0, 5, 10].")
    if not patients:
        raise ValueError("no evaluation patient: a site needs at least one patient besides its support pool.")
    classes = list(range(1, num_classes)) if classes is None else list(classes)
    dtype = next(iter(params.values())).dtype
    support_target = one_hot(support_y, num_classes, dtype)
    wanted, curve = set(steps), {}
    trajectory = chosen.trajectory(model, dict(params), support_x, support_target, inner_steps=max(wanted),
                                   inner_lr=inner_lr, loss_fn=loss_fn, inner_params=inner_params)
    prepared = None
    for done, adapted in enumerate(trajectory):
        prepared = adapted if prepared is None else prepared  # step 0: θ as the learner prepares it
        if refuse_diverged:
            check_adapted(adapted, step=done, inner_steps=max(wanted))
        if done in wanted:
            per_patient = {
                pid: patient_dice(predict_with(chosen, model, prepared, adapted, x, batch_size).argmax(dim=1).cpu(),
                                  y.cpu(), classes)
                for pid, x, y in patients
            }
            curve[done] = summarise_patients(per_patient)
    return curve


def load_initialisation(checkpoint_path: Path | str, label: str | None = None) -> tuple[Initialisation, RunConfig]:
    """(Initialisation, RunConfig) from a ServerApp checkpoint; its run config says how θ adapts."""
    path = Path(checkpoint_path)
    if not path.is_file():
        raise FileNotFoundError(f"--checkpoint {path}: no such file; pass the checkpoint.pt of a fedmeta run.")
    checkpoint = load_checkpoint(path)
    config = stored_run_config(checkpoint.run_config, str(path),  # before the network is built below
                               "the file is damaged, tampered with or from another fedmeta version. Use the "
                               "consortium's release as published.")
    # The weights must be the model the run config builds: a mismatch would fail deep inside
    # load_state_dict (or, worse, silently for a strict=False loader) instead of naming the file.
    model_config = config.model_config()
    expected = {name: tuple(t.shape) for name, t in initial_params(seeded_model(model_config, 0)).items()}
    found = {name: tuple(t.shape) for name, t in checkpoint.params.items()}
    if expected != found:
        differ = sorted(n for n in set(expected) | set(found) if expected.get(n) != found.get(n))
        raise ValueError(
            f"{path}: its weights do not match the model its run config describes ({len(differ)} tensor(s) differ, "
            f"e.g. {differ[0]!r}: config {expected.get(differ[0])}, weights {found.get(differ[0])}); the file was "
            "damaged or assembled from two runs. Use the checkpoint.pt a fedmeta run wrote."
        )
    algorithm = ALGORITHMS[config.algorithm]
    if algorithm.learns_step_sizes and not checkpoint.step_sizes:
        raise ValueError(f"{path}: a {config.algorithm} checkpoint without step sizes; it cannot adapt as it was trained.")
    inner_lr = algorithm.step_size(config.inner_lr, checkpoint.step_sizes)
    init = Initialisation(label or f"{config.algorithm} (round {checkpoint.round})", checkpoint.params, inner_lr,
                          head_only=algorithm.head_only, round=int(checkpoint.round), model_config=model_config,
                          variant=config.adapt_variant)
    return init, config


def random_initialisation(config: RunConfig) -> Initialisation:
    """The scratch baseline: the same seeded θ the federation started from, never trained."""
    return Initialisation("random init", initial_params(seeded_model(config.model_config(), config.seed)), config.inner_lr,
                          model_config=config.model_config())


def site_patients(site: SiteDataset, seed: int, max_slices: int = 0, device: torch.device | str = "cpu"):
    """``(patient id, volume, labels)`` of every evaluation patient of ``site`` (see ``evaluation_patients``)."""
    return [(site.patient_ids[p], site.images[p].to(device), site.labels[p].long().to(device))
            for p in evaluation_patients(site, seed, max_slices)]


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
    refuse_diverged: bool = False,
    auto_max_steps: int | None = None,
    progress: Callable[[str], None] | None = None,
    variant: str | Variant | None = None,
    one_standard_error: bool = False,
) -> dict[int, dict[int | str, dict[str, Any]]]:
    """``{k: {steps: summary}}`` for one initialisation on one site (summary: ``adaptation_curve``'s;
    ``refuse_diverged`` as there).

    ``steps`` may hold :data:`fedmeta.common.step_selection.AUTO`: the count chosen from the k support slices
    alone (:func:`fedmeta.common.step_selection.choose_steps`, candidates up to ``auto_max_steps``, default
    20); its summary adds ``chosen_steps`` and the ``step_choice`` record.

    For one seed the evaluation patients are the same for every k and the support sets are nested.
    ``max_images`` bounds the evaluation slices, whole patients only (0: every evaluation patient).
    ``splits`` caches support sets and patients per (site, k, seed) across initialisations, so every
    initialisation adapts on the very same slices and is scored on the very same patients. An
    initialisation that names its network (``model_config``: the other families' learners) is adapted
    with that network rather than ``model``.

    ``variant`` (:mod:`fedmeta.common.adaptation_variants`; None: the initialisation's own, its run config's
    ``adapt-variant``) is how the site adapts and predicts, for the fixed counts and for choosing ``auto``'s count
    alike. ``one_standard_error``: the ``auto`` cell also scores the count the one-standard-error rule would have
    chosen (a validation split's question; it costs one more scored count per cell).
    """
    chosen = variant_named(init.variant if variant is None else variant)
    if init.model_config is not None:
        model = _network(init.model_config)
    expected = {n: tuple(p.shape) for n, p in model.named_parameters()}
    if {n: tuple(p.shape) for n, p in init.params.items()} != expected:
        raise ValueError(f"{init.label}: its parameters are not those of the network it is scored with "
                         f"({type(model).__name__}); give the Initialisation its model_config.")
    check_applies(chosen, model)
    splits = {} if splits is None else splits
    classes = foreground_classes(site.label_names, num_classes, site.labelled_classes)
    fixed = [s for s in steps if s != AUTO]
    inner_params = head_parameter_names(model) if init.head_only else None
    out: dict[int, dict[int | str, dict[str, Any]]] = {}
    for k in shots:
        key = (str(site.root), k, seed, max_images)
        if key not in splits:
            splits[key] = (*adaptation_support(site, k, seed=seed), site_patients(site, seed, max_images))
        support_x, support_y, patients = splits[key]
        choice = None
        if AUTO in steps:  # chosen from the support slices alone, before any evaluation patient is looked at
            choice = choose_steps(model, init.params, support_x, support_y, inner_lr=init.inner_lr,
                                  loss_fn=DiceCELoss(num_classes), num_classes=num_classes, classes=classes,
                                  inner_params=inner_params, candidates=candidate_steps(auto_max_steps),
                                  variant=chosen, progress=progress)
        if progress is not None:
            progress(f"k = {k}: adapting {init.label} and scoring {len(patients)} patient(s)"
                     + (f" (auto chose {choice.steps} step(s))" if choice else ""))
        curve = adaptation_curve(
            model, init.params, support_x, support_y, patients,
            # On request, the count the one-standard-error rule would choose is scored too, so the rule itself can
            # be judged again on a validation split (it is never what "auto" reports).
            steps=sorted(set(fixed) | ({choice.steps} if choice else set())
                         | ({choice.one_se} if choice and one_standard_error else set())), inner_lr=init.inner_lr,
            loss_fn=DiceCELoss(num_classes), num_classes=num_classes, classes=classes,
            inner_params=inner_params, batch_size=batch_size, refuse_diverged=refuse_diverged, variant=chosen,
        )
        eval_slices = sum(len(x) for _, x, _ in patients)
        out[k] = {s: {**curve[s], "eval_slices": eval_slices} for s in fixed}
        if choice is not None:
            out[k][AUTO] = {**curve[choice.steps], "eval_slices": eval_slices, "chosen_steps": choice.steps,
                            "step_choice": choice.record()}
            if one_standard_error:
                out[k][AUTO]["one_standard_error_rule"] = {"steps": choice.one_se, "dice": curve[choice.one_se]["dice"]}
    return out


@functools.lru_cache(maxsize=8)
def _network(config: ModelConfig) -> torch.nn.Module:
    # Safe to share: the module's own weights are never read (every call passes its parameters).
    return build_model(config)


__all__ = ["AdaptationDiverged", "Initialisation", "adaptation_curve", "check_adapted", "load_initialisation", "predict",
           "predict_with", "random_initialisation",
           "score_site", "site_patients"]
