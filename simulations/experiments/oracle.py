"""The ceiling a k-shot adaptation is measured against: an oracle trained on the new site's own labels.

For a new (held-out) site, the oracle is a UNet trained from the federation's seeded initialisation
with full supervision on every labelled slice of the site's support patients — the patients the
k-shot adaptation draws its k slices from, never an evaluation patient. Scored like every other row
(per patient, whole volume, the site's labels), it says what fraction of the achievable a k-shot
adaptation of a shared initialisation reaches at that site.

A ceiling must be trained to convergence, not for a fixed number of steps (300 fixed steps once left
it below two adapted rows). So the support patients are split, seeded, into oracle-training patients
and oracle-validation patients (a quarter, at least one); Adam trains on the first and every
``eval_every`` steps the validation patients are scored as every row is scored (Dice per patient over
the whole volume, in the site's classes); training stops after ``patience`` evaluations without
improvement, or at the step cap, and keeps the weights that scored best. A site with a single support
patient has nothing to validate on: its oracle trains on that patient to the cap.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from fedmeta.common.adaptation import Initialisation, predict
from fedmeta.common.config import RunConfig
from fedmeta.common.data import SiteDataset, adaptation_patients
from fedmeta.common.losses import DiceCELoss, one_hot
from fedmeta.common.metrics import foreground_classes, patient_dice, summarise_patients
from fedmeta.common.model import initial_params, seeded_model, unet_of
from fedmeta.simulations.experiments.benchmark_preset import ORACLE_EVAL_EVERY, ORACLE_PATIENCE

# Adam at 1e-3 with batches of 16 slices is the usual supervised recipe for a small 2D UNet; the most
# steps it may take is the benchmark preset's `oracle-steps`.
ORACLE_LR = 1e-3
ORACLE_BATCH = 16
# ORACLE_EVAL_EVERY (Adam steps between two scorings of the validation patients) and ORACLE_PATIENCE
# (scorings without improvement before training stops) are the benchmark preset's defaults.
ORACLE_VALIDATION_FRACTION = 0.25  # of the support patients, at least one (when there are two or more)

STOPPED_EARLY = "early-stopped"
STOPPED_AT_CAP = "cap"  # validation still improving (or never scored) when the cap was reached
ONE_SUPPORT_PATIENT = "one support patient"  # nothing to validate on: trained to the cap


@dataclasses.dataclass(frozen=True)
class OracleFit:
    """A trained oracle and how its training ended (``record()``: strict JSON for results.json)."""

    init: Initialisation
    steps: int  # Adam steps taken
    best_step: int  # the step whose weights were kept
    max_steps: int
    stopped: str  # STOPPED_EARLY | STOPPED_AT_CAP | ONE_SUPPORT_PATIENT
    validation_dice: float | None  # the kept weights' mean validation Dice (None: no validation patient)
    train_patients: tuple[str, ...]
    validation_patients: tuple[str, ...]
    curve: tuple[tuple[int, float], ...] = ()  # (step, validation Dice) at each scoring

    def record(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "best_step": self.best_step,
            "max_steps": self.max_steps,
            "stopped": self.stopped,
            "validation_dice": self.validation_dice,
            "train_patients": list(self.train_patients),
            "validation_patients": list(self.validation_patients),
            "validation_curve": [[step, round(dice, 4)] for step, dice in self.curve],
        }


def oracle_patients(site: SiteDataset, seed: int) -> tuple[list[int], list[int]]:
    """(oracle-training, oracle-validation) patients: the support patients of ``seed``, split seeded.

    Never an evaluation patient. With one support patient the validation list is empty.
    """
    support, _ = adaptation_patients(site, seed)
    if len(support) < 2:
        return list(support), []
    order = [support[i] for i in np.random.default_rng([seed, 4]).permutation(len(support))]
    cut = max(1, round(len(support) * ORACLE_VALIDATION_FRACTION))
    return sorted(order[cut:]), sorted(order[:cut])


def fit_oracle(site: SiteDataset, config: RunConfig, *, seed: int, max_steps: int,
               eval_every: int = ORACLE_EVAL_EVERY, patience: int = ORACLE_PATIENCE, lr: float = ORACLE_LR,
               batch_size: int = ORACLE_BATCH, progress: Callable[[str], None] | None = None) -> OracleFit:
    """The oracle of ``site`` for evaluation seed ``seed``, early-stopped on its validation patients.

    ``progress`` (optional) receives a line at each validation scoring.
    """
    for name, value in (("max_steps", max_steps), ("eval_every", eval_every), ("patience", patience)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"oracle {name}={value!r}: must be an integer >= 1.")
    train, validation = oracle_patients(site, seed)
    pool = [(p, int(s)) for p in train for s in site.train_slices[p]]
    if not pool:
        raise ValueError(f"site {site.name}: its oracle-training patients hold no labelled slice to train on.")
    classes = foreground_classes(site.label_names, config.num_classes, site.labelled_classes)
    # The ceiling is a plain supervised UNet, whichever learner the run it is compared with trains.
    network = unet_of(config.model_config())
    model = seeded_model(network, seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = DiceCELoss(config.num_classes)
    rng = np.random.default_rng([seed, 3])
    best_params, best_dice, best_step, since_best = None, -1.0, 0, 0
    curve: list[tuple[int, float]] = []
    stopped = STOPPED_AT_CAP if validation else ONE_SUPPORT_PATIENT
    step = 0
    model.train()
    while step < max_steps:
        picks = [pool[i] for i in rng.choice(len(pool), size=min(batch_size, len(pool)), replace=False)]
        x = torch.stack([site.images[p][s] for p, s in picks])
        y = one_hot(torch.stack([site.labels[p][s] for p, s in picks]).long(), config.num_classes)
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        optimizer.step()
        step += 1
        if validation and (step % eval_every == 0 or step == max_steps):
            params = initial_params(model)
            dice = _validation_dice(model, params, site, validation, classes)
            curve.append((step, dice))
            if dice > best_dice:
                best_params, best_dice, best_step, since_best = params, dice, step, 0
            else:
                since_best += 1
            if progress is not None:
                progress(f"oracle {site.name}: step {step}/{max_steps}, validation Dice {dice:.3f} "
                         f"(best {best_dice:.3f} at step {best_step})")
            if since_best >= patience:
                stopped = STOPPED_EARLY
                break
    if best_params is None:  # no validation patient: the last weights
        best_params, best_step = initial_params(model), step
    init = Initialisation(f"oracle ({site.name})", best_params, config.inner_lr, model_config=network)
    return OracleFit(init=init, steps=step, best_step=best_step, max_steps=max_steps, stopped=stopped,
                     validation_dice=best_dice if validation else None,
                     train_patients=tuple(site.patient_ids[p] for p in train),
                     validation_patients=tuple(site.patient_ids[p] for p in validation), curve=tuple(curve))


def train_oracle(site: SiteDataset, config: RunConfig, *, seed: int, steps: int, lr: float = ORACLE_LR,
                 batch_size: int = ORACLE_BATCH) -> Initialisation:
    """The oracle's weights (:func:`fit_oracle` with ``steps`` as the cap), for callers that need no record."""
    return fit_oracle(site, config, seed=seed, max_steps=steps, lr=lr, batch_size=batch_size).init


@torch.no_grad()
def _validation_dice(model, params, site: SiteDataset, patients: list[int], classes: list[int]) -> float:
    """Mean over the validation patients of their whole-volume Dice in the site's classes (as rows are scored)."""
    per_patient = {
        site.patient_ids[p]: patient_dice(predict(model, params, site.images[p]).argmax(dim=1),
                                          site.labels[p].long(), classes)
        for p in patients
    }
    return float(summarise_patients(per_patient)["dice"])


__all__ = ["ORACLE_BATCH", "ORACLE_EVAL_EVERY", "ORACLE_LR", "ORACLE_PATIENCE", "OracleFit", "fit_oracle",
           "oracle_patients", "train_oracle"]
