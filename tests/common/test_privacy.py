"""Site-level differential privacy: clipping, the noise's scale, the accountant, and the budget in a run."""

from __future__ import annotations

import math

import pytest
import torch

from fedmeta.client.privacy import local_dp
from fedmeta.common.checkpoint import CHECKPOINT_NAME, load_checkpoint
from fedmeta.common.config import RunConfig
from fedmeta.common.privacy import (
    PrivacyAccountant, RoundEvent, add_gaussian_noise, clip_update, local_noise_split, noise_generator, noise_multiplier_for, update_norm,
)
from fedmeta.server.aggregation import aggregate
from fedmeta.server.metrics import METRICS_NAME, read_metrics
from tests.simulations.test_inprocess import federate, tiny_config


def _reply(scale: float, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"a.weight": torch.randn(8, 3, generator=g) * scale, "b.bias": torch.randn(5, generator=g) * scale,
            "lr.a.weight": torch.randn(8, 3, generator=g) * scale}


@pytest.mark.parametrize("scale", [1e-3, 0.1, 1.0, 1e3, 1e6])
def test_clipping_bounds_every_reply_with_every_array_together(scale):
    reply = _reply(scale, seed=1)
    clipped, norm = clip_update(reply, 1.5)
    assert norm == pytest.approx(update_norm(reply))
    assert update_norm(clipped) <= 1.5 * (1 + 1e-6)
    if norm <= 1.5:  # small replies pass unchanged
        assert all(torch.equal(clipped[k], reply[k]) for k in reply)
    else:  # one factor for every array, lr.* included: the direction is kept
        factors = {k: float((clipped[k] / reply[k]).mean()) for k in reply}
        assert max(factors.values()) == pytest.approx(min(factors.values()), rel=1e-5)


def test_central_dp_clips_every_reply_before_the_mean():
    config = RunConfig(dp="central", dp_clip_norm=1.0, dp_noise_multiplier=1e-9, dp_seeded_noise=True)
    replies = [_reply(s, seed=i) for i, s in enumerate([1e-3, 5.0, 1e6])]
    combined = aggregate(config, replies, [1.0] * 3, noise_seed=0)
    assert combined.clipped == 2
    assert update_norm(combined.update) <= 1.0 + 1e-6  # a mean of vectors of norm <= C


def test_local_dp_clips_the_site_reply_and_splits_the_noise_over_the_rounds_quorum():
    config = RunConfig(dp="local", secure_aggregation="secagg+", dp_clip_norm=2.0, dp_noise_multiplier=1e-9,
                       secagg_clip_range=16.0, dp_seeded_noise=True)
    assert update_norm(local_dp(_reply(1e4, 0), config, split=4, seed=3)) <= 2.0 * (1 + 1e-6)
    # The noise of 16 sites' replies sums to sigma * C: each carries sigma * C / 4.
    config = config.replace(dp_noise_multiplier=1.0)
    zeros = {"w": torch.zeros(20_000)}
    total = sum(local_dp(zeros, config, split=16, seed=s)["w"].double() for s in range(16))
    assert float(total.std()) == pytest.approx(2.0, rel=0.03)
    with pytest.raises(ValueError, match="split over 0 sites"):
        local_dp(zeros, config, split=0, seed=0)
    # The split is the round's quorum: any sum the server may unmask carries at least sigma * C.
    assert local_noise_split(config.replace(round_quorum=0.5, min_sites=1), 10) == 5
    assert local_noise_split(config.replace(round_quorum=0.5, min_sites=7), 10) == 7
    assert local_noise_split(config.replace(round_quorum=1.0), 10) == 10


def test_noise_has_the_stated_scale():
    """A fixed seed; 10^5 draws: the sample std is within 1 % (about 4.5 standard errors) of the target."""
    noisy = add_gaussian_noise({"w": torch.zeros(100_000)}, 0.25, noise_generator(7))["w"].double()
    assert float(noisy.std()) == pytest.approx(0.25, rel=0.01)
    assert abs(float(noisy.mean())) < 4.5 * 0.25 / math.sqrt(100_000)
    # Central DP: sigma * C on the sum of n replies, so sigma * C / n on their mean.
    config = RunConfig(dp="central", dp_clip_norm=3.0, dp_noise_multiplier=0.8, dp_seeded_noise=True)
    combined = aggregate(config, [{"w": torch.zeros(100_000)}] * 4, [1.0] * 4, noise_seed=1)
    assert combined.noise_std == pytest.approx(0.8 * 3.0 / 4)
    assert float(combined.update["w"].double().std()) == pytest.approx(0.6, rel=0.01)
    # Seeded noise is reproducible; unseeded noise (a deployment) is not.
    assert torch.equal(aggregate(config, [{"w": torch.zeros(10)}], [1.0], noise_seed=5).update["w"],
                       aggregate(config, [{"w": torch.zeros(10)}], [1.0], noise_seed=5).update["w"])
    unseeded = config.replace(dp_seeded_noise=False)
    assert not torch.equal(aggregate(unseeded, [{"w": torch.zeros(10)}], [1.0], noise_seed=5).update["w"],
                           aggregate(unseeded, [{"w": torch.zeros(10)}], [1.0], noise_seed=5).update["w"])


def test_epsilon_is_the_accountants_own_for_known_q_sigma_and_rounds():
    import dp_accounting
    from dp_accounting import dp_event

    event = RoundEvent(population=8, sampled=4, noise_multiplier=1.2)
    accountant = PrivacyAccountant(1e-5, [event] * 48)  # as a resumed run rebuilds it, then two live rounds
    accountant.spend(event)
    accountant.spend(event)
    reference = dp_accounting.rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    # Replace-one sensitivity of a sum of C-clipped replies is 2C: noise sigma*C is multiplier sigma/2.
    reference.compose(dp_event.SampledWithoutReplacementDpEvent(8, 4, dp_event.GaussianDpEvent(0.6)), 50)
    assert accountant.epsilon == pytest.approx(reference.get_epsilon(1e-5), rel=1e-9)
    # Every site every round (q = 1): the plain Gaussian mechanism, composed.
    full = PrivacyAccountant(1e-5, [RoundEvent(5, 5, 2.0)] * 10)
    plain = dp_accounting.rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    plain.compose(dp_event.GaussianDpEvent(1.0), 10)
    assert full.epsilon == pytest.approx(plain.get_epsilon(1e-5), rel=1e-9)
    # More rounds, less noise or a larger sample cost more; the state round-trips.
    assert full.epsilon_after(RoundEvent(5, 5, 2.0)) > full.epsilon
    assert PrivacyAccountant.from_state_dict(accountant.state_dict()).epsilon == pytest.approx(accountant.epsilon,
                                                                                                 rel=1e-12)
    with pytest.raises(ValueError, match="dp-delta"):
        PrivacyAccountant(0.0)


def test_a_dp_run_reports_epsilon_every_round_and_resume_keeps_the_budget(smoke_federation, tmp_path):
    dp = dict(dp="central", dp_noise_multiplier=1.5, dp_clip_norm=0.5, dp_seeded_noise=True, sites_per_round=2)
    whole = tiny_config(smoke_federation, tmp_path / "whole", num_rounds=3, **dp)
    federate(whole, smoke_federation)
    parted = tiny_config(smoke_federation, tmp_path / "parted", num_rounds=2, **dp)
    federate(parted, smoke_federation)
    federate(parted.replace(num_rounds=3, resume=True), smoke_federation)

    records = read_metrics(tmp_path / "whole" / METRICS_NAME)
    epsilons = [r["privacy"]["epsilon"] for r in records]
    assert len(epsilons) == 3 and all(math.isfinite(e) and e > 0 for e in epsilons)
    assert epsilons == sorted(epsilons) and epsilons[0] < epsilons[-1]
    assert all(r["privacy"]["sampled"] == 2 and r["privacy"]["population"] == 3 for r in records)
    assert all(r["aggregation"]["noise_std"] == pytest.approx(1.5 * 0.5 / 2) for r in records)
    assert all("clipped" not in r["aggregation"] for r in records)  # a count released without noise
    assert all(r["privacy"]["seeded_noise"] and r["privacy"]["guarantee"].startswith("none") for r in records)
    assert all(r["privacy"]["sampling_amplification"] for r in records)
    resumed = read_metrics(tmp_path / "parted" / METRICS_NAME)
    assert [r["privacy"]["epsilon"] for r in resumed] == pytest.approx(epsilons, rel=1e-12)
    a, b = (load_checkpoint(tmp_path / run / CHECKPOINT_NAME) for run in ("whole", "parted"))
    assert a.privacy == b.privacy and len(a.privacy["history"]) == 3
    assert all(torch.equal(a.params[k], b.params[k]) for k in a.params)  # seeded noise: the same θ


def test_the_run_stops_before_a_round_would_exceed_the_budget(smoke_federation, tmp_path):
    one_round = PrivacyAccountant(1e-5, [RoundEvent(3, 3, 2.0)]).epsilon
    config = tiny_config(smoke_federation, tmp_path, num_rounds=5, dp="central", dp_noise_multiplier=2.0,
                         dp_max_epsilon=one_round * 1.2)
    federate(config, smoke_federation)
    records = read_metrics(tmp_path / METRICS_NAME)
    assert [r.get("round") for r in records] == [1, None]
    stop = records[-1]
    assert stop["after_round"] == 1 and "dp-max-epsilon" in stop["stopped"]
    assert stop["privacy"]["epsilon"] == pytest.approx(one_round)
    assert load_checkpoint(tmp_path / CHECKPOINT_NAME).round == 1


@pytest.mark.parametrize("changes, words", [
    (dict(dp="global"), "dp='global'"),
    (dict(dp="central", aggregation="median"), "use aggregation='mean' with dp"),
    (dict(dp="local", secure_aggregation="secagg+", site_weighting="data"), "site-weighting='per-site'"),
    (dict(dp="local"), "the server must see only the sum"),
    (dict(dp_clip_norm=0.0), "dp-clip-norm=0.0"),
    (dict(dp_delta=1.0), "dp-delta=1.0"),
    (dict(dp_noise_multiplier=float("nan")), "dp-noise-multiplier=nan"),
])
def test_bad_dp_settings_are_refused_with_the_key(changes, words):
    with pytest.raises(ValueError, match=words.replace("(", r"\(")):
        RunConfig(**changes)


def test_dp_weighs_every_site_the_same():
    assert RunConfig(algorithm="fedavg").weighting == "data"
    assert RunConfig(algorithm="fedavg", dp="central").weighting == "per-site"


def test_the_noise_for_a_budget_is_the_smallest_that_keeps_it():
    sigma = noise_multiplier_for(8.0, 1e-5, population=5, sampled=5, rounds=10)
    assert PrivacyAccountant(1e-5, [RoundEvent(5, 5, sigma)] * 10).epsilon <= 8.0
    assert PrivacyAccountant(1e-5, [RoundEvent(5, 5, sigma / 1.02)] * 10).epsilon > 8.0
    assert noise_multiplier_for(1.0, 1e-5, 5, 5, 10) > sigma  # a smaller budget needs more noise
    generous = noise_multiplier_for(1000.0, 1e-5, 5, 5, 1)  # below the old search's 0.05 floor
    assert generous < 0.05
    assert PrivacyAccountant(1e-5, [RoundEvent(5, 5, generous)]).epsilon <= 1000.0
    assert PrivacyAccountant(1e-5, [RoundEvent(5, 5, generous / 1.02)]).epsilon > 1000.0
    with pytest.raises(ValueError, match="sampled=6 of 5"):
        noise_multiplier_for(1.0, 1e-5, 5, 6, 10)


def test_local_dp_is_accounted_without_amplification_by_sampling(smoke_federation, tmp_path):
    config = tiny_config(smoke_federation, tmp_path, num_rounds=1, dp="local", secure_aggregation="secagg+",
                         secagg_clip_range=16.0,
                         dp_noise_multiplier=2.0, sites_per_round=2)
    federate(config, smoke_federation)
    (record,) = read_metrics(tmp_path / METRICS_NAME)
    privacy = record["privacy"]
    assert privacy["sampled"] == 2 and privacy["population"] == 3 and not privacy["sampling_amplification"]
    assert "seeded_noise" not in privacy
    # Each site split its noise over the quorum (1 of 2 at round-quorum 0.5), so the sum of both carries
    # sigma * sqrt(2 / 1); the server that samples is the adversary: q = 1, the accountant sees 2 of 2.
    sigma = 2.0 * math.sqrt(2)
    assert privacy["noise_multiplier"] == pytest.approx(sigma)
    assert privacy["epsilon"] == pytest.approx(PrivacyAccountant(1e-5, [RoundEvent(2, 2, sigma)]).epsilon)
    assert privacy["epsilon"] > PrivacyAccountant(1e-5, [RoundEvent(3, 2, sigma)]).epsilon


def test_dp_budget_gives_local_dp_more_noise_for_the_same_budget(capsys):
    from fedmeta.simulations.cli import main

    for mode in ("central", "local"):
        assert main(["dp-budget", "--epsilon", "4", "--sites", "8", "--sites-per-round", "2", "--rounds", "10",
                     "--dp", mode]) == 0
    central, local = (float(line.rsplit("=", 1)[1]) for line in capsys.readouterr().out.splitlines())
    assert local > central
