"""``fedmeta adapt``: a new hospital adapts the consortium's initialisation θ to its own site.

θ is adapted on k labelled slices of the site's support patients with the rule the checkpoint's algorithm
implies (the run's inner step size, Meta-SGD's learned step sizes, ANIL's head only:
``fedmeta.common.adaptation.load_initialisation``), through the inner loop training uses
(``fedmeta.common.meta.adaptation_trajectory``). How many steps: ``auto`` (the default) chooses the count from
the k support slices alone (``fedmeta.common.step_selection.choose_steps``: cross-validation over them, the
highest mean check Dice, 0 steps a candidate), with the same inner rule, on the same device; then θ is adapted
on all k slices for that count, exactly as a fixed ``--steps`` of that count would. The initialisation and the adapted model are scored on
the site's other, held-out patients: Dice per patient over the whole scan **in the scan's own grid**,
computed from the very masks ``fedmeta predict`` writes (:func:`fedmeta.client.predict.segment_loaded`),
so what the model card reports is what the site will get. The site model and its card:
``fedmeta.client.model_card``.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedmeta.client.model_card import SITE_MODEL_FILES, SITE_MODEL_FORMAT, SITE_MODEL_VERSION, save_site_model
from fedmeta.client.predict import command_device, segment_loaded
from fedmeta.common.adaptation import AdaptationDiverged, check_adapted, load_initialisation
from fedmeta.common.algorithms import ALGORITHMS
from fedmeta.common.config import MAX_STEPS
from fedmeta.common.data import SiteDataset, adaptation_patients, adaptation_support
from fedmeta.common.losses import DiceCELoss, one_hot
from fedmeta.common.adaptation_variants import (
    DEFAULT as DEFAULT_VARIANT, VARIANTS, Variant, check_applies, variant_named,
)
from fedmeta.common.metrics import foreground_classes, patient_dice, summarise_patients
from fedmeta.common.model import build_model, head_parameter_names
from fedmeta.common.outputs import Outputs, file_sha256
from fedmeta.common.progress import paced
from fedmeta.common.read_limits import ReadLimits
from fedmeta.common.site_layout import channel_order
from fedmeta.common.step_selection import AUTO, candidate_steps, choose_steps
from fedmeta.common.validate import check_case, discover_site

DEFAULT_MAX_STEPS = 20  # the largest count --steps auto may choose (candidate_steps: 0, 1, 2, 3, 5, 7, 10, 15, 20)


def adapt_site(checkpoint: Path, data: Path, out: Path, *, shots: int, steps: int | str = AUTO,
               max_steps: int | None = None, seed: int = 0, image_glob: str | None = None,
               label_glob: str | None = None, release: dict | None = None, device: str = "auto",
               overwrite: bool = False, limits: ReadLimits = ReadLimits(), variant: str | None = None,
               progress=print) -> dict[str, Any]:
    """Adapts ``checkpoint`` to the site at ``data``; writes the site model folder ``out`` (an earlier site model
    there only with ``overwrite``; never a file adapt did not write); returns its card. ``steps``: a count, or
    ``"auto"`` to choose it from the support slices among the candidates up to ``max_steps`` (default
    :data:`DEFAULT_MAX_STEPS`). ``limits``: what the site's files may hold (the command reads them from the
    environment). ``variant``: how the site adapts (:mod:`fedmeta.common.adaptation_variants`; None: the one the
    checkpoint's run config names, ``adapt-variant``, ``fine-tune`` unless the consortium chose another); only variants
    whose adapted weights segment alone, as predict runs them."""
    if isinstance(shots, bool) or not isinstance(shots, int) or shots < 1:
        raise ValueError(f"--shots {shots!r}: the labelled slices to adapt on, an integer >= 1, e.g. 5.")
    check_steps_option(steps, max_steps)
    requested = steps
    if not Path(data).is_dir():
        raise FileNotFoundError(f"--data {data}: not a folder; pass the site folder (dataset.json, imagesTr/, labelsTr/).")
    Outputs(out, "adapt").check(SITE_MODEL_FILES, overwrite=overwrite)  # before minutes of adaptation, not after
    began = time.perf_counter()
    dev = command_device(device)
    init, config = load_initialisation(checkpoint)
    model = build_model(config.model_config()).to(dev)
    chosen = site_variant(init.variant if variant is None else variant, model)  # refused before the site is read
    data_config = config.data_config(image_glob=image_glob, label_glob=label_glob, limits=limits)
    raw = _RawStats()  # the data's fingerprint, gathered as the site is read (not by reading it again)
    progress(f"loading site {data}")
    site = SiteDataset.load(data, data_config, on_case=reading_progress(progress, then=raw.add))
    progress(f"loaded site {site.name}: {site.num_patients} usable patient(s)"
             + (f", {len(site.skipped)} skipped" if site.skipped else ""))
    classes = foreground_classes(site.label_names, config.num_classes, site.labelled_classes)

    if site.num_patients >= 2:
        support_patients, heldout = adaptation_patients(site, seed)
        support_x, support_y = adaptation_support(site, shots, seed)
    else:  # one patient: adapt on it, nothing left to score on
        support_patients, heldout = [0], []
        picks = site.foreground_indices(0)[:shots]
        if len(picks) < shots:
            raise ValueError(f"site {site.name} has {len(picks)} labelled slices, fewer than --shots {shots}.")
        support_x, support_y = site.images[0][picks], site.labels[0][picks].long()
    params = {n: p.to(dev) for n, p in init.params.items()}
    inner_lr = ({n: a.to(dev) for n, a in init.inner_lr.items()} if isinstance(init.inner_lr, dict) else init.inner_lr)
    # One inner rule for choosing the count and for adapting: what the variant's trajectory is given below.
    rule = dict(inner_lr=inner_lr, loss_fn=DiceCELoss(config.num_classes),
                inner_params=head_parameter_names(model) if init.head_only else None)
    choice = None
    if steps == AUTO:  # from the support slices alone: no held-out patient is looked at before the model is fixed
        candidates = candidate_steps(DEFAULT_MAX_STEPS if max_steps is None else max_steps)
        progress(f"choosing steps from {list(candidates)} by cross-validation on the {shots} support slice(s) "
                 f"({init.label}) on {dev}")
        choice = choose_steps(model, params, support_x.to(dev), support_y.to(dev), num_classes=config.num_classes,
                              classes=classes, candidates=candidates, variant=chosen,
                              **{**rule, "loss_fn": _saying_alive(rule["loss_fn"], paced(progress), "choosing steps")})
        steps = choice.steps
        progress(f"choosing steps: {choice.reason()}")
    progress(f"adapting on {shots} labelled slice(s) of {len(support_patients)} support patient(s), {steps} step(s)"
             f"{' (auto)' if choice else ''} ({init.label}, {chosen.name}) on {dev}")
    support = (support_x.to(dev), one_hot(support_y.to(dev), config.num_classes, torch.float32))

    # "Before" is the learner at 0 steps: θ itself, or θ as the other families prepare it for this support
    # set (a generated head, the support prototypes), which is all a 0-step site model holds.
    prepared = adapted = None
    say = paced(progress)
    for done, adapted in enumerate(chosen.trajectory(model, params, *support, inner_steps=steps, **rule)):
        try:  # a broken model is neither scored (a Dice of 0) nor saved for predict
            check_adapted(adapted, step=done, inner_steps=steps)
        except AdaptationDiverged as err:
            rule_said = _rule(config.algorithm, init, steps, chosen)
            rule_said += f"; --steps auto chose {steps}" if choice else ""
            raise ValueError(f"{checkpoint} on {data}: {err} ({rule_said}). Fix: "
                             f"adapt with {f'--steps {done - 1} or fewer' if done > 1 else '--steps 0'}, or more "
                             "--shots; if it diverges at every step count, report it to the consortium.") from None
        prepared = adapted if prepared is None else prepared
        if done:
            say(f"  adapting: step {done}/{steps}")
    prepared, adapted = ({n: p.detach().cpu() for n, p in d.items()} for d in (prepared, adapted))
    adapt_seconds = time.perf_counter() - began

    dice: dict[str, Any] = {"held_out_patients": len(heldout)}
    if heldout:
        layout = discover_site(data, image_glob, label_glob, limits=limits)
        cases = {case.case_id: case for case in layout.cases}
        scored = [cases[site.patient_ids[p]] for p in sorted(heldout)]
        score = dict(config=config, cases=scored, classes=classes, device=dev, progress=progress, limits=limits,
                     declared=layout.channels, channel_names=site.channel_names)
        before = _score_native(model, prepared, what="initialisation", **score)
        after = before if steps == 0 else _score_native(model, adapted, what="adapted", **score)
        dice.update({"before": before, "after": after, "classes": classes})
    else:
        dice["note"] = "one usable patient: every slice went to adaptation, none is left to score the model on"

    card = {
        "format": SITE_MODEL_FORMAT,
        "version": SITE_MODEL_VERSION,
        "created": dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat(),
        "initialisation": {
            "sha256": file_sha256(Path(checkpoint)),
            "round": init.round,
            "algorithm": config.algorithm,
            "release_id": (release or {}).get("release_id"),
            "release_verified": bool(release),
            "signing_key_sha256": (release or {}).get("signing_key_sha256"),
        },
        "adaptation": {
            "shots": shots, "steps": steps, "steps_requested": requested, "seed": seed,
            "rule": _rule(config.algorithm, init, steps, chosen),
            "variant": chosen.name,
            "step_choice": choice.record() if choice else None,
            "support_patients": len(support_patients),
            "seconds": round(adapt_seconds, 3),
        },
        "data": raw.fingerprint(site),
        "dice": dice,
        "metric": "Dice per held-out patient over the whole scan in the scan's own grid (the masks fedmeta predict "
                  "writes), per foreground class the site labels, mean over classes then patients",
        "model": {"spatial_dims": data_config.spatial_dims, "image_size": list(data_config.image_size),
                  "spacing_mm": list(data_config.spacing), "num_classes": config.num_classes,
                  "channels": list(site.channel_names),
                  "label_names": {str(k): v for k, v in (site.label_names or {}).items()}},
    }
    # A federation of one-channel sites of different modalities trains with channels "" (each site reads its own
    # as CT or MR); the site model names this site's, so predict normalises its scans as adaptation saw them.
    site_config = config if config.channels or not all(site.channel_names) else config.replace(
        channels=",".join(site.channel_names))
    site_config = site_config.replace(adapt_variant=chosen.name)  # how this site model was adapted, as its card says
    progress(f"writing the site model to {out}")
    save_site_model(out, adapted, site_config.to_run_config(), card, overwrite=overwrite)
    return card


def check_steps_option(steps: int | str, max_steps: int | None) -> None:
    """``--steps`` (a count from 0 to MAX_STEPS, or ``auto``) and ``--max-steps`` (auto's largest candidate), or a
    ValueError that names the value and what to give instead."""
    if steps == AUTO:
        if max_steps is not None and (isinstance(max_steps, bool) or not isinstance(max_steps, int)
                                      or not 0 <= max_steps <= MAX_STEPS):
            raise ValueError(f"--max-steps {max_steps!r}: the most steps --steps auto may choose, an integer from 0 to "
                             f"{MAX_STEPS:,}; the default, {DEFAULT_MAX_STEPS}, suits a few-shot adaptation.")
        return
    if isinstance(steps, str):
        raise ValueError(f"--steps {steps!r}: give auto (the default: the count is chosen from the support slices) or "
                         f"a number of gradient steps from 0 to {MAX_STEPS:,}, e.g. --steps 10.")
    if isinstance(steps, bool) or not isinstance(steps, int) or not 0 <= steps <= MAX_STEPS:
        raise ValueError(f"--steps {steps!r}: gradient steps, an integer from 0 (the initialisation as it is) to "
                         f"{MAX_STEPS:,}; a few-shot adaptation takes 5-50.")
    if max_steps is not None:
        raise ValueError(f"--max-steps {max_steps}: bounds the count --steps auto chooses; with --steps {steps} the "
                         "count is given. Drop --max-steps, or pass --steps auto.")


def steps_summary(adaptation: dict[str, Any]) -> str:
    """"3 step(s) (auto: 3 of [0..20], highest-check-dice over 5 folds of the support slices)" from a card's
    ``adaptation`` section; a fixed count reads "10 step(s)"."""
    said = f"{adaptation['steps']} step(s)"
    choice = adaptation.get("step_choice")
    if not choice:
        return said
    candidates = choice["candidates"]
    over = ("the two halves of the support slice" if choice["split"] == "half-slice"
            else f"{choice['folds']} folds of the support slices")
    return (f"{said} (auto: {choice['chosen_steps']} of [{candidates[0]}..{candidates[-1]}], {choice['rule']} over "
            f"{over})")


def _saying_alive(loss_fn, say: Callable[[str], None], phase: str):
    """``loss_fn`` that also tells ``say`` (paced) how long ``phase`` has run: the inner loop evaluates it every
    step, so a long cross-validation is never silent. Until choose_steps reports its folds itself."""
    began = time.monotonic()

    def loss(*args, **kwargs):
        say(f"  {phase}: {time.monotonic() - began:.0f} s of cross-validation on the support slices so far")
        return loss_fn(*args, **kwargs)

    return loss


def site_variant(name: str, model) -> Variant:
    """The registered variant ``name`` if it can adapt ``model`` and its adapted weights are the site model predict
    runs; a ValueError naming the choices otherwise (an ensemble predicts from two sets of weights)."""
    chosen = variant_named(name)
    check_applies(chosen, model)
    if type(chosen).logits is not Variant.logits:
        usable = [n for n, v in VARIANTS.items() if type(v).logits is Variant.logits and v.applies_to(model)]
        raise ValueError(f"--variant {name}: it predicts from more than the adapted weights, which a site model "
                         f"cannot hold for fedmeta predict. Choose one of: {', '.join(usable)}.")
    return chosen


def reading_progress(progress: Callable[[str], None], then: Callable[[Any], None] | None = None):
    """An ``on_case`` for :meth:`SiteDataset.load` that says, paced, how many cases it has read (and passes each
    case on to ``then``)."""
    say, read = paced(progress), 0

    def on_case(loaded) -> None:
        nonlocal read
        read += 1
        if then is not None:
            then(loaded)
        say(f"  loading site: {read} case(s) read")

    return on_case


def _score_native(model, params, *, config, cases, classes, device, progress, limits, what: str,
                  declared: tuple[str, ...] = (), channel_names: tuple[str, ...] = ("",)) -> dict[str, Any]:
    """Per-patient Dice of ``params``' masks in each scan's own grid, against the scan's label file. ``declared``:
    the site's dataset.json channels; ``channel_names``: the model's, in its order (``SiteDataset.channel_names``)."""
    per_patient = {}
    # The reader's order (SiteDataset.load took it from the same declaration): stacked as the model takes them.
    order = channel_order("", declared, len(channel_names), channel_names)[0] if len(declared) > 1 else None
    for i, case in enumerate(cases, 1):
        problems, loaded = check_case(case, None, config.num_classes, limits=limits, channels=declared)
        if problems:  # SiteDataset.load read it a moment ago; a file changed under us is still a named error
            raise ValueError("; ".join(problems))
        image_data = loaded.image_data[..., order] if order is not None else loaded.image_data
        mask = segment_loaded(model, params, config, image_data, loaded.image.affine, device, limits=limits,
                              channels=channel_names)
        per_patient[f"patient-{i}"] = patient_dice(torch.from_numpy(mask.mask.astype(np.int64)),
                                                   torch.from_numpy(loaded.label_data), classes)
        progress(f"  scored {what} on held-out patient {i}/{len(cases)}: Dice "
                 f"{sum(per_patient[f'patient-{i}'].values()) / len(classes):.3f}")
    return summarise_patients(per_patient)


class _RawStats:
    """What the site's scans look like before preprocessing, case by case as :meth:`SiteDataset.load` reads
    them; :meth:`fingerprint` adds the counts. No file name and no patient identifier."""

    def __init__(self) -> None:
        self.spacings: list[np.ndarray] = []
        self.shapes: list[tuple[int, ...]] = []
        self.intensities: list[np.ndarray] = []

    def add(self, loaded) -> None:
        affine = np.asarray(loaded.image.affine, dtype=np.float64)
        self.spacings.append(np.sqrt((affine[:3, :3] ** 2).sum(axis=0)))
        self.shapes.append(loaded.image_data.shape)
        values = loaded.image_data[loaded.image_data > loaded.image_data.mean()]  # the head, as the reader sees it
        if values.size:
            self.intensities.append(np.percentile(values, [1, 50, 99]))

    def fingerprint(self, site) -> dict[str, Any]:
        def median(rows, digits=3):
            return [round(float(v), digits) for v in np.median(np.asarray(rows), axis=0)] if rows else None

        return {
            "patients": site.num_patients,
            "skipped_cases": len(site.skipped),
            "unlisted_files_ignored": len(site.ignored),
            "slices": int(sum(len(x) for x in site.images)),
            "labelled_slices": int(sum(len(site.foreground_indices(p)) for p in range(site.num_patients))),
            "median_voxel_mm": median(self.spacings),
            "median_shape": [int(v) for v in median(self.shapes, 0)] if self.shapes else None,
            "head_intensity_percentiles_1_50_99": median(self.intensities),
            "classes_labelled": sorted(int(c) for c in site.labelled_classes),
        }


def _rule(algorithm: str, init, steps: int, variant: Variant) -> str:
    """How the site model was adapted, in words for the model card."""
    step = ("Meta-SGD's learned per-parameter step sizes" if isinstance(init.inner_lr, dict)
            else f"SGD, step size {init.inner_lr:g} (the run's inner-lr)") + ("; head only (ANIL)" if init.head_only else "")
    if variant.name != DEFAULT_VARIANT and steps:  # the variant, not the learner's own fine-tuning, is what ran
        return f"{variant.description}; {step}"
    return ALGORITHMS[algorithm].describe_adaptation(step, steps)


__all__ = ["DEFAULT_MAX_STEPS", "adapt_site", "check_steps_option", "reading_progress", "steps_summary"]
