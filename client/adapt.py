"""``fedmeta adapt``: a new hospital adapts the consortium's initialisation θ to its own site.

θ is adapted on k labelled slices of the site's support patients with the rule the checkpoint's algorithm
implies (the run's inner step size, Meta-SGD's learned step sizes, ANIL's head only:
``fedmeta.common.adaptation.load_initialisation``), through the inner loop training uses
(``fedmeta.common.meta.adaptation_trajectory``). The initialisation and the adapted model are scored on
the site's other, held-out patients: Dice per patient over the whole scan **in the scan's own grid**,
computed from the very masks ``fedmeta predict`` writes (:func:`fedmeta.client.predict.segment_loaded`),
so what the model card reports is what the site will get. The site model and its card:
``fedmeta.client.model_card``.
"""

from __future__ import annotations

import datetime as dt
import time
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
from fedmeta.common.meta import adaptation_trajectory
from fedmeta.common.metrics import foreground_classes, patient_dice, summarise_patients
from fedmeta.common.model import build_model, head_parameter_names
from fedmeta.common.outputs import Outputs, file_sha256
from fedmeta.common.read_limits import ReadLimits
from fedmeta.common.validate import check_case, discover_site


def adapt_site(checkpoint: Path, data: Path, out: Path, *, shots: int, steps: int, seed: int = 0,
               image_glob: str | None = None, label_glob: str | None = None, release: dict | None = None,
               device: str = "auto", overwrite: bool = False, limits: ReadLimits = ReadLimits(),
               progress=print) -> dict[str, Any]:
    """Adapts ``checkpoint`` to the site at ``data``; writes the site model folder ``out`` (an earlier site model
    there only with ``overwrite``; never a file adapt did not write); returns its card. ``limits``: what the
    site's files may hold (the command reads them from the environment)."""
    if isinstance(shots, bool) or not isinstance(shots, int) or shots < 1:
        raise ValueError(f"--shots {shots!r}: the labelled slices to adapt on, an integer >= 1, e.g. 5.")
    if isinstance(steps, bool) or not isinstance(steps, int) or not 0 <= steps <= MAX_STEPS:
        raise ValueError(f"--steps {steps!r}: gradient steps, an integer from 0 (the initialisation as it is) to "
                         f"{MAX_STEPS:,}; a few-shot adaptation takes 5-50.")
    if not Path(data).is_dir():
        raise FileNotFoundError(f"--data {data}: not a folder; pass the site folder (dataset.json, imagesTr/, labelsTr/).")
    Outputs(out, "adapt").check(SITE_MODEL_FILES, overwrite=overwrite)  # before minutes of adaptation, not after
    began = time.perf_counter()
    dev = command_device(device)
    init, config = load_initialisation(checkpoint)
    data_config = config.data_config(image_glob=image_glob, label_glob=label_glob, limits=limits)
    raw = _RawStats()  # the data's fingerprint, gathered as the site is read (not by reading it again)
    site = SiteDataset.load(data, data_config, on_case=raw.add)
    model = build_model(config.model_config()).to(dev)
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
    progress(f"adapting on {shots} labelled slice(s) of {len(support_patients)} support patient(s), {steps} step(s) "
             f"({init.label}) on {dev}")
    params = {n: p.to(dev) for n, p in init.params.items()}
    inner_lr = ({n: a.to(dev) for n, a in init.inner_lr.items()} if isinstance(init.inner_lr, dict) else init.inner_lr)
    support = (support_x.to(dev), one_hot(support_y.to(dev), config.num_classes, torch.float32))

    # "Before" is the learner at 0 steps: θ itself, or θ as the other families prepare it for this support
    # set (a generated head, the support prototypes), which is all a 0-step site model holds.
    prepared = adapted = None
    for done, adapted in enumerate(adaptation_trajectory(
            model, params, *support, inner_steps=steps, inner_lr=inner_lr, loss_fn=DiceCELoss(config.num_classes),
            inner_params=head_parameter_names(model) if init.head_only else None)):
        try:  # a broken model is neither scored (a Dice of 0) nor saved for predict
            check_adapted(adapted, step=done, inner_steps=steps)
        except AdaptationDiverged as err:
            raise ValueError(f"{checkpoint} on {data}: {err} ({_rule(config.algorithm, init, steps)}). Fix: adapt with "
                             f"{f'--steps {done - 1} or fewer' if done > 1 else '--steps 0'}, or more --shots; if it "
                             "diverges at every step count, report it to the consortium.") from None
        prepared = adapted if prepared is None else prepared
    prepared, adapted = ({n: p.detach().cpu() for n, p in d.items()} for d in (prepared, adapted))
    adapt_seconds = time.perf_counter() - began

    dice: dict[str, Any] = {"held_out_patients": len(heldout)}
    if heldout:
        cases = {case.case_id: case for case in discover_site(data, image_glob, label_glob, limits=limits).cases}
        scored = [cases[site.patient_ids[p]] for p in sorted(heldout)]
        score = dict(config=config, cases=scored, classes=classes, device=dev, progress=progress, limits=limits)
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
            "shots": shots, "steps": steps, "seed": seed,
            "rule": _rule(config.algorithm, init, steps),
            "support_patients": len(support_patients),
            "seconds": round(adapt_seconds, 3),
        },
        "data": raw.fingerprint(site),
        "dice": dice,
        "metric": "Dice per held-out patient over the whole scan in the scan's own grid (the masks fedmeta predict "
                  "writes), per foreground class the site labels, mean over classes then patients",
        "model": {"spatial_dims": data_config.spatial_dims, "image_size": list(data_config.image_size),
                  "spacing_mm": list(data_config.spacing), "num_classes": config.num_classes,
                  "label_names": {str(k): v for k, v in (site.label_names or {}).items()}},
    }
    save_site_model(out, adapted, config.to_run_config(), card, overwrite=overwrite)
    return card


def _score_native(model, params, *, config, cases, classes, device, progress, limits, what: str) -> dict[str, Any]:
    """Per-patient Dice of ``params``' masks in each scan's own grid, against the scan's label file."""
    per_patient = {}
    for i, case in enumerate(cases, 1):
        problems, loaded = check_case(case, None, config.num_classes, limits=limits)
        if problems:  # SiteDataset.load read it a moment ago; a file changed under us is still a named error
            raise ValueError("; ".join(problems))
        mask = segment_loaded(model, params, config, loaded.image_data, loaded.image.affine, device, limits=limits)
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


def _rule(algorithm: str, init, steps: int) -> str:
    """How the site model was adapted, in words for the model card."""
    step = ("Meta-SGD's learned per-parameter step sizes" if isinstance(init.inner_lr, dict)
            else f"SGD, step size {init.inner_lr:g} (the run's inner-lr)") + ("; head only (ANIL)" if init.head_only else "")
    return ALGORITHMS[algorithm].describe_adaptation(step, steps)


__all__ = ["adapt_site"]
