"""The ceiling a k-shot adaptation is measured against: an oracle trained on the new site's own labels.

For a new (held-out) site, the oracle is a UNet trained from the federation's seeded initialisation
with full supervision on every labelled slice of the site's support patients — the patients the
k-shot adaptation draws its k slices from, never an evaluation patient. Scored like every other row
(per patient, whole volume, the site's labels), it says what fraction of the achievable a k-shot
adaptation of a shared initialisation reaches at that site.
"""

from __future__ import annotations


import numpy as np
import torch

from fedmeta.common.adaptation import Initialisation
from fedmeta.common.config import RunConfig
from fedmeta.common.data import SiteDataset, adaptation_patients
from fedmeta.common.losses import DiceCELoss, one_hot
from fedmeta.common.model import initial_params, seeded_model, unet_of

# Adam at 1e-3 with batches of 16 slices is the usual supervised recipe for a small 2D UNet; the
# number of steps is the benchmark preset's `oracle-steps`.
ORACLE_LR = 1e-3
ORACLE_BATCH = 16


def train_oracle(site: SiteDataset, config: RunConfig, *, seed: int, steps: int, lr: float = ORACLE_LR,
                 batch_size: int = ORACLE_BATCH) -> Initialisation:
    """The oracle of ``site`` for evaluation seed ``seed``: ``steps`` Adam steps on its support patients.

    Its patients are those :func:`fedmeta.common.data.adaptation_patients` puts in the support pool
    for ``seed``, so the oracle and every k-shot row are scored on the same evaluation patients.
    """
    if steps < 1:
        raise ValueError(f"oracle steps={steps}: the oracle needs at least one training step.")
    support_patients, _ = adaptation_patients(site, seed)
    pool = [(p, int(s)) for p in support_patients for s in site.train_slices[p]]
    # The ceiling is a plain supervised UNet, whichever learner the run it is compared with trains.
    network = unet_of(config.model_config())
    model = seeded_model(network, seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = DiceCELoss(config.num_classes)
    rng = np.random.default_rng([seed, 3])
    model.train()
    for _ in range(steps):
        picks = [pool[i] for i in rng.choice(len(pool), size=min(batch_size, len(pool)), replace=False)]
        x = torch.stack([site.images[p][s] for p, s in picks])
        y = one_hot(torch.stack([site.labels[p][s] for p, s in picks]).long(), config.num_classes)
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        optimizer.step()
    return Initialisation(f"oracle ({site.name})", initial_params(model), config.inner_lr, model_config=network)


__all__ = ["ORACLE_BATCH", "ORACLE_LR", "train_oracle"]
