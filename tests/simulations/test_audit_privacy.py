"""The attack bench: the attacker's model of a site's reply is the site's reply, and a run writes its
table, strict JSON and pictures (the attack's strength is measured in docs/privacy.md, not here)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from fedmeta.common.config import RunConfig
from fedmeta.common.data import SiteDataset, sample_episodes
from fedmeta.common.losses import DiceCELoss, one_hot
from fedmeta.common.meta import meta_gradient
from fedmeta.common.model import initial_params, seeded_model
from fedmeta.common.synth import load_manifest
from fedmeta.simulations.experiments.audit_privacy import audit, reply_of


@pytest.mark.parametrize("algorithm", ["fomaml", "maml"])
def test_the_attackers_model_of_a_reply_is_exactly_what_the_site_sends(smoke_federation, algorithm):
    config = RunConfig(algorithm=algorithm, image_size=32, model_base_channels=8, model_levels=3, inner_lr=0.1,
                       spacing_mm=2.0)
    site = SiteDataset.load(load_manifest(smoke_federation).train_sites[0].path, config.data_config())
    sx, sy, qx, qy = sample_episodes(site, 1, 2, 1, seed=0)[0]
    model = seeded_model(config.model_config(), 0)
    theta, n = initial_params(model), config.num_classes
    sent, _ = meta_gradient(model, theta, [(sx, one_hot(sy, n), qx, one_hot(qy, n))], algorithm=algorithm,
                            inner_steps=1, inner_lr=config.inner_lr, loss_fn=DiceCELoss(n))
    modelled = reply_of(model, theta, config, sx, one_hot(sy, n), qx, one_hot(qy, n))
    assert sent.keys() == modelled.keys()
    for key in sent:
        assert torch.allclose(sent[key], modelled[key], atol=1e-6), key


def test_an_audit_writes_its_table_json_and_pictures(smoke_federation, tmp_path):
    results = audit(out=tmp_path, iterations=3, ks=[1], algorithms=["fomaml"], defences=["none", "dp", "secagg"],
                    labels=["known"], federation=smoke_federation, quiet=True)
    parsed = json.loads((tmp_path / "results.json").read_text())
    assert [r["defence"] for r in parsed["attacks"]] == ["none", "dp", "secagg"]
    for row in results["attacks"]:
        for key in ("psnr", "ssim", "correlation", "baseline_psnr", "baseline_ssim", "baseline_correlation"):
            assert math.isfinite(row[key]), key
        assert -1 <= row["correlation"] <= 1 and (tmp_path / row["png"]).stat().st_size > 1000
    report = (tmp_path / "report.md").read_text()
    assert report.count("| fomaml | fomaml | 1 |") == 3 and "floor" in report
    (maml,) = audit(out=tmp_path / "maml", iterations=2, ks=[1], algorithms=["maml"], defences=["none"],
                    labels=["unknown"], federation=smoke_federation, quiet=True)["attacks"]
    assert maml["attacker_model"] == "fomaml (surrogate)" and math.isfinite(maml["psnr"])
    with pytest.raises(ValueError, match="must be >= 1"):
        audit(out=tmp_path, iterations=0, federation=smoke_federation, quiet=True)
