"""The centralised loop: the federation's rounds without Flower, and the pooled upper bound."""

from __future__ import annotations

import pytest
import torch

from fedmeta.common.config import RunConfig
from fedmeta.common.model import initial_params, seeded_model
from fedmeta.common.synth import load_manifest
from fedmeta.common.checkpoint import CHECKPOINT_NAME, load_checkpoint
from fedmeta.simulations.experiments.centralised import (
    load_training_sites, pool_sites, run_centralised, train_centralised, training_node_configs,
)
from fedmeta.simulations.engines.inprocess import run_inprocess


def _config(federation, out_dir, **changes) -> RunConfig:
    # The smoke preset's model and images, every training site every round unless a test says otherwise.
    base = RunConfig(
        num_rounds=2, sites_per_round=0, episodes_per_site=1, k_shot=2, q_query=2, image_size=32,
        model_base_channels=8, model_levels=3, inner_lr=0.1, meta_lr=0.01, eval_every=0,
        federation_dir=str(federation), out_dir=str(out_dir), device="cpu",
    )
    return base.replace(**changes)


@pytest.mark.parametrize(("algorithm", "sites_per_round"), [("fomaml", 0), ("metasgd", 0), ("fedprox", 0), ("fomaml", 2),
                                                       ("fast-weights", 0), ("prototypes", 0), ("lstm-optimizer", 0)])
def test_unpooled_loop_reproduces_the_inprocess_federation(smoke_federation, tmp_path, algorithm, sites_per_round):
    """Same site sampling, episode seeds, aggregation order and meta-optimiser: the same θ."""
    config = _config(smoke_federation, tmp_path / "fed", algorithm=algorithm, sites_per_round=sites_per_round,
                     num_rounds=3 if sites_per_round else 2, proximal_mu=0.1 if algorithm == "fedprox" else 0.0)
    train_nodes = training_node_configs(load_manifest(smoke_federation).train_sites)
    run_inprocess(config.to_run_config(), train_nodes, seed=config.seed)
    federated = load_checkpoint(tmp_path / "fed" / CHECKPOINT_NAME)

    bare = run_centralised(config, smoke_federation, pooled=False)

    start = initial_params(seeded_model(config.model_config(), config.seed))
    assert any(not torch.equal(bare.params[n], start[n]) for n in start), "θ never moved"
    assert sorted(bare.params) == sorted(federated.params)
    for name, value in federated.params.items():
        torch.testing.assert_close(bare.params[name], value, rtol=1e-5, atol=1e-6, msg=name)
    if algorithm == "metasgd":
        for name, alpha in federated.step_sizes.items():
            torch.testing.assert_close(bare.step_sizes[name], alpha, rtol=1e-5, atol=1e-6, msg=name)
    else:
        assert bare.step_sizes is None


def test_pooled_loop_trains_on_the_union_and_is_seeded(smoke_federation, tmp_path):
    config = _config(smoke_federation, tmp_path, num_rounds=2)
    first = train_centralised(config, smoke_federation, pooled=True)
    again = train_centralised(config, smoke_federation, pooled=True)
    unpooled = train_centralised(config, smoke_federation, pooled=False)
    other_seed = train_centralised(config.replace(seed=1), smoke_federation, pooled=True)
    for name in first:
        assert torch.equal(first[name], again[name]), name
    assert any(not torch.equal(first[n], unpooled[n]) for n in first), "pooled drew the same episodes as per-site"
    assert any(not torch.allclose(first[n], other_seed[n]) for n in first)


def test_pooling_keeps_every_patient_of_every_site(smoke_federation):
    config = _config(smoke_federation, "/tmp/unused")
    sites = load_training_sites(smoke_federation, config)
    pooled = pool_sites(sites)
    assert pooled.num_patients == sum(s.num_patients for s in sites)
    assert pooled.num_slices == sum(s.num_slices for s in sites)
    assert pooled.patient_ids[0] == f"{sites[0].name}/{sites[0].patient_ids[0]}"


def test_round_statistics_count_the_rounds_and_examples(smoke_federation, tmp_path):
    config = _config(smoke_federation, tmp_path, num_rounds=3)
    seen = []
    run = run_centralised(config, smoke_federation, pooled=True, on_round=lambda r, s: seen.append(r))
    assert seen == [1, 2, 3]
    num_train = len(load_manifest(smoke_federation).train_sites)
    # per round: every site's episodes, each k support + q query images
    assert [r["num_examples"] for r in run.rounds] == [num_train * (2 + 2)] * 3
    assert all(torch.isfinite(torch.tensor(r["query_loss_after"])) for r in run.rounds)


def test_unknown_training_site_is_named(smoke_federation, tmp_path):
    with pytest.raises(ValueError, match=r"\['hospital-x'\] are not training sites"):
        train_centralised(_config(smoke_federation, tmp_path), smoke_federation, pooled=False,
                          train_sites=["hospital-x"])
