"""The other families end to end on the smoke federation: trained through the real apps (in-process), scored
by `fedmeta evaluate` and the held-out sites' ClientApp, adapted by `fedmeta adapt`, applied by `fedmeta predict`."""

from __future__ import annotations

import json
import math

import pytest

from fedmeta.client.model_card import CARD_JSON
from fedmeta.common.algorithms import NETWORKS as LEARNERS
from fedmeta.common.algorithms.prototypes import PrototypeUNet
from fedmeta.common.synth import load_manifest
from fedmeta.simulations.cli import main
from tests.conftest import train_smoke_run


@pytest.mark.parametrize("algorithm", sorted(LEARNERS))
def test_a_learner_trains_evaluates_adapts_and_predicts(smoke_federation, tmp_path, algorithm, capsys):
    checkpoint = train_smoke_run(smoke_federation, tmp_path / "run", algorithm=algorithm, num_rounds=2,
                                 inner_steps=1, inner_lr=0.1, meta_lr=0.01)
    site = smoke_federation / load_manifest(smoke_federation).heldout_sites[0].path
    out = tmp_path / "evaluate.json"
    assert main(["evaluate", "--checkpoint", str(checkpoint), "--allow-unsigned", "--data", str(site), "--shots", "2",
                 "--steps", "0,2", "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    assert results["algorithm"] == algorithm
    dice = results["sites"][site.name]["dice"]["2"]
    assert all(math.isfinite(dice[s]["dice"]) and 0 <= dice[s]["dice"] <= 1 for s in ("0", "2"))

    assert main(["adapt", "--checkpoint", str(checkpoint), "--allow-unsigned", "--data", str(site), "--shots", "3",
                 "--steps", "2", "--out", str(tmp_path / "model"), "--device", "cpu"]) == 0
    card = json.loads((tmp_path / "model" / CARD_JSON).read_text())
    assert card["initialisation"]["algorithm"] == algorithm
    assert 0 <= card["dice"]["before"]["dice"] <= 1 and 0 <= card["dice"]["after"]["dice"] <= 1
    assert main(["predict", "--model", str(tmp_path / "model"), "--input", str(site / "imagesTr"),
                 "--out", str(tmp_path / "masks"), "--device", "cpu"]) == 0
    assert len(list((tmp_path / "masks").glob("*.nii.gz"))) == len(list((site / "imagesTr").glob("*.nii.gz")))

    capsys.readouterr()
    code = main(["predict", "--model", str(checkpoint), "--allow-unsigned", "--input", str(site / "imagesTr"),
                 "--out", str(tmp_path / "raw"), "--device", "cpu"])
    if issubclass(LEARNERS[algorithm], PrototypeUNet):  # an embedding without prototypes segments nothing: refused
        assert code != 0 and "fedmeta adapt" in capsys.readouterr().err
    else:
        assert code == 0


def test_a_prototypes_site_model_at_zero_steps_holds_the_support_prototypes(smoke_federation, tmp_path):
    checkpoint = train_smoke_run(smoke_federation, tmp_path / "run", algorithm="prototypes", num_rounds=1,
                                 inner_steps=0)
    site = smoke_federation / load_manifest(smoke_federation).heldout_sites[0].path
    assert main(["adapt", "--checkpoint", str(checkpoint), "--allow-unsigned", "--data", str(site), "--shots", "3",
                 "--steps", "0", "--out", str(tmp_path / "model"), "--device", "cpu"]) == 0
    from fedmeta.client.model_card import load_site_model

    prototypes = load_site_model(tmp_path / "model").params["prototypes"]
    assert bool((prototypes[0] != 0).any())  # background has a prototype now; θ's were all zero
    card = json.loads((tmp_path / "model" / CARD_JSON).read_text())
    assert card["dice"]["before"] == card["dice"]["after"] and card["dice"]["after"]["dice"] > 0


def test_the_run_configs_adapt_variant_is_how_its_sites_adapt_and_evaluate(smoke_federation, tmp_path):
    """A consortium that trains the prototype learner with adapt-variant = "frozen-prototypes" has every new site
    adapt that way: `fedmeta adapt` and `fedmeta evaluate` by default (each takes --variant to choose another), and
    the held-out sites' evaluation rounds."""
    from fedmeta.common.adaptation import load_initialisation
    from fedmeta.common.data import SiteDataset
    from fedmeta.common.federated_round import site_evaluation
    from fedmeta.common.model import build_model

    checkpoint = train_smoke_run(smoke_federation, tmp_path / "run", algorithm="prototypes", num_rounds=1,
                                 inner_steps=0, adapt_variant="frozen-prototypes")
    site = smoke_federation / load_manifest(smoke_federation).heldout_sites[0].path
    cards = {}
    for name, extra in (("default", []), ("fine-tune", ["--variant", "fine-tune"])):
        assert main(["adapt", "--checkpoint", str(checkpoint), "--allow-unsigned", "--data", str(site), "--shots", "3",
                     "--steps", "2", "--out", str(tmp_path / name), "--device", "cpu", *extra]) == 0
        cards[name] = json.loads((tmp_path / name / CARD_JSON).read_text())
    assert cards["default"]["adaptation"]["variant"] == "frozen-prototypes"
    assert cards["fine-tune"]["adaptation"]["variant"] == "fine-tune"
    assert cards["default"]["dice"]["before"] == cards["fine-tune"]["dice"]["before"]  # step 0 is one model

    scored = {}
    for name, extra in (("default", []), ("fine-tune", ["--variant", "fine-tune"])):
        out = tmp_path / f"{name}.json"
        assert main(["evaluate", "--checkpoint", str(checkpoint), "--allow-unsigned", "--data", str(site),
                     "--shots", "2", "--steps", "0,2", "--json", str(out), *extra]) == 0
        scored[name] = json.loads(out.read_text())
    assert scored["default"]["adaptation"]["variant"] == "frozen-prototypes"
    assert scored["fine-tune"]["adaptation"]["variant"] == "fine-tune"
    dice = {name: results["sites"][site.name]["dice"]["2"] for name, results in scored.items()}
    assert dice["default"]["0"] == dice["fine-tune"]["0"] and dice["default"]["2"] != dice["fine-tune"]["2"]

    init, config = load_initialisation(checkpoint)
    data = SiteDataset.load(site, config.data_config())
    model = build_model(config.model_config())
    frozen, _ = site_evaluation(model, init.params, None, data, config.replace(eval_steps="2"), seed=0)
    fine, _ = site_evaluation(model, init.params, None, data, config.replace(eval_steps="2", adapt_variant="fine-tune"),
                              seed=0)
    assert frozen[2]["dice"] != fine[2]["dice"]
