"""Byzantine-robust aggregation, the norm bound, runs that must fail loudly, and the simulated attackers."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from flwr.app import Context, Message

from fedmeta.common.checkpoint import CHECKPOINT_NAME, load_checkpoint
from fedmeta.common.config import RunConfig
from fedmeta.server.aggregation import aggregate, check_finite, trim_count
from fedmeta.server.app import RunFailed
from fedmeta.server.metrics import METRICS_NAME, read_metrics
from fedmeta.simulations.attacks import Attack, adversarial_client_app, parse_attack
from tests.simulations.test_inprocess import FaultySites, federate, partition_of, tiny_config


UNBOUNDED = RunConfig(median_norm_bound=0.0)  # the plain mean: what the rules are compared against


def _honest(n: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 4, generator=g)
    return [{"w": base + 0.01 * torch.randn(6, 4, generator=g), "b": torch.full((3,), 0.5)} for _ in range(n)]


@pytest.mark.parametrize("replies, cut", [(1, 0), (2, 0), (3, 1), (4, 1), (5, 1), (10, 2), (11, 2), (20, 4)])
def test_the_trimmed_mean_cuts_at_least_one_reply_per_side_from_three_on(replies, cut):
    # Flower's own cuts int(0.2 n): none of 3 or 4 replies, so one hostile site would pass untouched.
    assert trim_count(RunConfig(aggregation="trimmed-mean"), replies) == cut


@pytest.mark.parametrize("rule", ["trimmed-mean", "median", "krum"])
@pytest.mark.parametrize("attack", ["scale:1000", "signflip:1000", "noise:100"])
def test_robust_rules_keep_one_hostile_reply_from_moving_the_update(rule, attack):
    honest = _honest(5)  # Krum's guarantee needs n >= 2f + 3 = 5
    hostile = parse_attack(attack).apply(dict(honest[0]), seed=1)
    config = RunConfig(aggregation=rule, median_norm_bound=0.0)  # the rule alone, no norm bound
    combined = aggregate(config, [hostile, *honest[1:]], [1.0] * 5)
    plain = aggregate(UNBOUNDED, honest, [1.0] * 5).update
    for key in plain:
        assert torch.allclose(combined.update[key], plain[key], atol=0.05), (rule, attack, key)
    assert combined.rule == rule and not combined.note
    if rule == "krum":
        assert 0 not in combined.krum_selected and len(combined.krum_selected) == 4
    mean = aggregate(UNBOUNDED, [hostile, *honest[1:]], [1.0] * 5).update
    assert not torch.allclose(mean["w"], plain["w"], atol=0.05)  # the mean is moved: the attack is real


def test_multi_krum_keeps_what_flowers_krum_keeps():
    from flwr.server.strategy.aggregate import aggregate_krum

    replies = _honest(7)
    replies[2] = {k: v * 50 for k, v in replies[2].items()}
    combined = aggregate(RunConfig(aggregation="krum", krum_byzantine=2, median_norm_bound=0.0), replies, [1.0] * 7)
    arrays = [[r[k].double().numpy() for k in ("w", "b")] for r in replies]
    flower = aggregate_krum([(a, 1) for a in arrays], 2, 5)
    assert 2 not in combined.krum_selected and len(combined.krum_selected) == 5
    for key, expected in zip(("w", "b"), flower):
        assert torch.allclose(combined.update[key].double(), torch.as_tensor(expected), atol=1e-6)


def test_multi_krum_agrees_with_flower_on_near_ties_far_from_the_origin():
    """Replies of norm ~1e6 differing by ~1e-4: a Gram-matrix distance loses those digits (it kept replies
    2 and 5 here); Flower's direct differences (and fedmeta's) do not, so both keep the same replies."""
    from flwr.server.strategy.aggregate import aggregate_krum

    rng = np.random.default_rng(1)
    base = rng.normal(size=64) * 1e5
    arrays = [[base + rng.normal(size=64) * 1e-4 * (1 + i % 3)] for i in range(7)]
    replies = [{"w": torch.as_tensor(a[0])} for a in arrays]
    combined = aggregate(RunConfig(aggregation="krum", krum_byzantine=2, median_norm_bound=0.0), replies, [1.0] * 7)
    flower = aggregate_krum([(a, 1) for a in arrays], 2, 5)
    assert combined.krum_selected == [0, 1, 3, 4, 6]  # the replies of the smallest spread (i % 3 == 0 or 1)
    kept = np.mean([arrays[i][0] for i in combined.krum_selected], axis=0)
    assert np.allclose(kept, flower[0], rtol=0, atol=1e-9)


@pytest.mark.parametrize("rule, n, used, words", [
    ("krum", 4, "median", "krum needs 5 replies for krum-byzantine=1; 4 answered"),
    ("median", 2, "median", "median of 2 replies is their mean"),
    ("trimmed-mean", 1, "mean", "trimmed-mean needs 2 or more replies"),
])
def test_a_robust_rule_with_too_few_replies_says_so_in_the_round_record(rule, n, used, words):
    combined = aggregate(RunConfig(aggregation=rule), _honest(n), [1.0] * n)
    assert combined.rule == used and words in combined.record()["note"]


def test_robust_rules_keep_dtypes_and_the_mean_is_weighted():
    replies = [{"w": torch.ones(3) * v} for v in (1.0, 2.0, 3.0)]
    assert aggregate(UNBOUNDED, replies, [1.0, 1.0, 2.0]).update["w"].tolist() == [2.25] * 3
    median = aggregate(RunConfig(aggregation="median", median_norm_bound=0.0), replies, [1.0, 1.0, 100.0])
    assert median.update["w"].dtype == torch.float32 and median.update["w"].tolist() == [2.0] * 3


def test_a_non_finite_theta_stops_the_run():
    check_finite({"w": torch.ones(2)}, 3)
    with pytest.raises(FloatingPointError, match="non-finite in round 3 .*w.*last good checkpoint .*round 2"):
        check_finite({"w": torch.tensor([1.0, float("inf")])}, 3)


def test_replies_beyond_the_norm_bound_are_rejected_and_counted(smoke_federation, tmp_path):
    attacked = adversarial_client_app(Attack("scale", 1e6), {0})
    config = tiny_config(smoke_federation, tmp_path, num_rounds=2, max_update_norm=1e3)
    run = federate(config, smoke_federation, client=attacked)
    for record in read_metrics(tmp_path / METRICS_NAME):
        assert record["updated"] and record["sites_answered"] == record["sites_sampled"] - 1
        (drop,) = record["dropped"]
        assert drop["kind"] == "over-norm" and "exceeds max-update-norm=1000" in drop["reason"]
        assert partition_of(run.grid, drop["node_id"]) == 0
    assert load_checkpoint(tmp_path / CHECKPOINT_NAME).counters["dropped_replies"] == 2


def test_a_run_whose_every_reply_fails_ends_with_an_error(smoke_federation, tmp_path):
    config = tiny_config(smoke_federation, tmp_path, num_rounds=6, max_failed_rounds=2)
    with pytest.raises(RunFailed, match=r"every reply failed in 2 rounds in a row \(rounds 1-2.*NaN"):
        federate(config, smoke_federation, client=FaultySites("corrupt", partitions={0, 1, 2}))
    assert load_checkpoint(tmp_path / CHECKPOINT_NAME).round == 2  # stopped, checkpointed, not "succeeded"


def test_an_adversarial_site_rewrites_only_its_own_train_reply(smoke_federation, tmp_path):
    from fedmeta.client.app import app as honest
    from fedmeta.common.records import from_array_record

    attacked = adversarial_client_app(Attack("signflip", 2.0), {1})
    ratios: dict[int, float] = {}

    def spy(message: Message, context: Context) -> Message:
        reply = attacked(message, context)
        if message.metadata.message_type == "train":  # the honest reply of the same message, for comparison
            sent, truth = (from_array_record(r.content.array_records["meta-grads"])
                           for r in (reply, honest(message, context)))
            ratios[int(context.node_config["partition-id"])] = float(
                sum((sent[k] * truth[k]).sum() for k in sent) / sum((truth[k] ** 2).sum() for k in truth))
        return reply

    federate(tiny_config(smoke_federation, tmp_path, num_rounds=1), smoke_federation, client=spy)
    assert ratios == pytest.approx({0: 1.0, 1: -2.0, 2: 1.0}, rel=1e-5)


@pytest.mark.parametrize("spec, words", [
    ("boost", "unknown attack 'boost'"), ("scale:x", "'x' is not a number"), ("noise:0", "must be finite and > 0"),
    ("scale:inf", "must be finite"),
])
def test_bad_attack_specs_are_refused(spec, words):
    with pytest.raises(ValueError, match=words):
        parse_attack(spec)
    assert str(parse_attack("signflip")) == "signflip:1" and parse_attack("scale").factor == 1000


@pytest.mark.parametrize("changes, words", [
    (dict(aggregation="geomed"), "aggregation='geomed'"), (dict(aggregation_trim=0.5), "aggregation-trim=0.5"),
    (dict(krum_byzantine=-1), "krum-byzantine=-1"), (dict(max_update_norm=-1.0), "max-update-norm=-1.0"),
    (dict(max_failed_rounds=-1), "max-failed-rounds=-1"),
])
def test_bad_aggregation_settings_are_refused_with_the_key(changes, words):
    with pytest.raises(ValueError, match=words):
        RunConfig(**changes)


def test_simulate_refuses_attacks_outside_the_inprocess_engine_and_with_no_honest_site(smoke_federation, tmp_path):
    from fedmeta.simulations.experiments.simulate import simulate

    root = tmp_path / "cache"
    root.mkdir()
    (root / "smoke-0").symlink_to(smoke_federation)  # the session's smoke federation, where the cache looks
    with pytest.raises(ValueError, match="--attack runs on the in-process engine"):
        simulate(preset="smoke", engine="ray", attack="scale:1000", out=tmp_path / "out", federation_root=root,
                 quiet=True)
    with pytest.raises(ValueError, match="--attack-sites 3: choose 1..2"):
        simulate(preset="smoke", engine="inprocess", attack="scale", attack_sites=3, out=tmp_path / "out",
                 federation_root=root, quiet=True)


# -- one site cannot break the federation: the norm bound, the meta-optimiser's state, runs that stall ------------

def test_the_norm_bound_scales_a_huge_reply_to_a_multiple_of_the_rounds_lower_median():
    from fedmeta.common.privacy import update_norm
    from fedmeta.common.federated_round import bound_replies

    honest = _honest(3)
    hostile = {k: v * 1e30 for k, v in honest[0].items()}
    bounded, norms, bound, which = bound_replies([hostile, *honest[1:]], 3.0)
    assert which == [0] and norms[0] > 1e29
    assert bound == pytest.approx(3.0 * sorted(norms)[1])
    assert update_norm(bounded[0]) == pytest.approx(bound, rel=1e-5)
    assert all(torch.isfinite(t).all() for t in bounded[0].values())
    cosine = sum((bounded[0][k].double() * honest[0][k].double()).sum() for k in honest[0])
    assert float(cosine) > 0  # direction kept, only the size bounded
    assert bounded[1] is honest[1] and bounded[2] is honest[2]  # honest replies untouched
    # Two replies: the lower median is the smaller one, which the hostile one cannot raise.
    _, _, bound, which = bound_replies([hostile, honest[1]], 3.0)
    assert which == [0] and bound == pytest.approx(3.0 * norms[1])
    # One reply has nothing to be measured against; a factor of 0 turns the bound off.
    assert bound_replies([hostile], 3.0)[2:] == (0.0, [])
    assert bound_replies([hostile, *honest[1:]], 0.0)[2:] == (0.0, [])


def test_the_bound_records_every_replys_norm_and_scales_only_replies_above_it():
    honest = _honest(4)
    combined = aggregate(RunConfig(), honest, [1.0] * 4)  # the default: at most the (lower) median norm
    assert len(combined.norms) == 4 and combined.norm_bound == pytest.approx(sorted(combined.norms)[1])
    assert combined.bounded == sorted(i for i, n in enumerate(combined.norms) if n > combined.norm_bound)
    assert len(combined.bounded) <= 2  # never more than half: the lower median is one of the replies
    loose = aggregate(RunConfig(median_norm_bound=3.0), honest, [1.0] * 4)
    plain = aggregate(RunConfig(median_norm_bound=0.0), honest, [1.0] * 4)
    assert loose.bounded == []
    for key in plain.update:  # a bound no reply reaches changes no bit
        assert torch.equal(loose.update[key], plain.update[key])
    assert "norm_bound" not in plain.record() and loose.record()["bounded"] == []


@pytest.mark.parametrize("changes, words", [
    (dict(median_norm_bound=0.5), "median-norm-bound=0.5.*>= 1"), (dict(median_norm_bound=float("nan")), "finite"),
])
def test_bad_norm_bounds_are_refused(changes, words):
    with pytest.raises(ValueError, match=words):
        RunConfig(**changes)


def test_the_meta_optimiser_refuses_a_state_that_overflowed_or_stalled():
    from fedmeta.common.metaopt import MAX_STATE, MetaOptimizer, MetaOptimizerStateError

    params = {"w": torch.zeros(4, 3)}
    opt = MetaOptimizer(params, lr=1e-2)
    opt.step({"w": torch.full((4, 3), 0.1)})
    with pytest.raises(MetaOptimizerStateError, match=r"second moment of 'w' is non-finite in 12 of 12"):
        opt.step({"w": torch.full((4, 3), 1e30)})  # finite, but its square overflows float32
    # A finite state so large that Adam's steps vanish below θ's resolution: the next honest step stalls.
    opt = MetaOptimizer({"w": torch.full((4, 3), 1.0)}, lr=1e-3)
    opt.step({"w": torch.full((4, 3), 1e14)})
    with pytest.raises(MetaOptimizerStateError, match=r"did not move θ: only 0 of the 12 entries"):
        for _ in range(400):  # the poisoned first moment decays; the second moment stays and swamps every step
            opt.step({"w": torch.full((4, 3), 1e-2)})
    # Over the bound: refused at the step that put it there.
    opt = MetaOptimizer({"w": torch.zeros(2)}, lr=1e-2)
    with pytest.raises(MetaOptimizerStateError, match=re.escape(f"first moment of 'w' reaches 1e+16 (bound {MAX_STATE:g})")):
        opt.step({"w": torch.full((2,), 1e17)})


def test_a_checkpoint_whose_optimiser_state_is_broken_cannot_be_resumed(smoke_federation, tmp_path):
    import math

    from fedmeta.common.checkpoint import save_checkpoint

    config = tiny_config(smoke_federation, tmp_path, num_rounds=1)
    federate(config, smoke_federation)
    checkpoint = load_checkpoint(tmp_path / CHECKPOINT_NAME)
    state = checkpoint.optimizer["optimizer"]["state"]
    next(iter(state.values()))["exp_avg_sq"].fill_(math.inf)  # what a ×1e30 reply left before these checks
    save_checkpoint(tmp_path / CHECKPOINT_NAME, checkpoint)
    with pytest.raises(RunFailed, match=r"checkpoint.pt \(round 1\) cannot be resumed: .*non-finite.*Start a new run"):
        federate(config.replace(num_rounds=2, resume=True), smoke_federation)


def test_without_the_bound_a_1e30_site_stops_the_run_naming_the_round_and_the_site(smoke_federation, tmp_path):
    attacked = adversarial_client_app(Attack("scale", 1e30), {0})
    config = tiny_config(smoke_federation, tmp_path, num_rounds=3, median_norm_bound=0.0)
    with pytest.raises(RunFailed, match=r"round 1: the meta-optimiser's state is broken: .*non-finite") as raised:
        federate(config, smoke_federation, client=attacked)
    # The first site named is the one with the largest reply: the attacker (partition 0), norm ~1e30.
    assert "reply norm 1" in str(raised.value) and "e+30" in str(raised.value).split("),")[0]
    (failed,) = [r for r in read_metrics(tmp_path / METRICS_NAME) if "failed" in r]
    assert failed["round"] == 1 and "e+30" in failed["failed"]
    assert not (tmp_path / CHECKPOINT_NAME).exists() or load_checkpoint(tmp_path / CHECKPOINT_NAME).round == 0


@pytest.mark.parametrize("attack", ["scale:1e30", "scale:1000"])
def test_with_the_defaults_a_hostile_site_is_bounded_and_recorded(smoke_federation, tmp_path, attack):
    attacked = adversarial_client_app(parse_attack(attack), {0})
    run = federate(tiny_config(smoke_federation, tmp_path, num_rounds=2), smoke_federation, client=attacked)
    for record in [r for r in read_metrics(tmp_path / METRICS_NAME) if r["round"] >= 1]:
        assert record["updated"] and record["sites_answered"] == record["sites_sampled"]
        norms = {entry["node_id"]: entry["norm"] for entry in record["reply_norms"]}
        bound = record["aggregation"]["norm_bound"]
        assert bound == pytest.approx(sorted(norms.values())[(len(norms) - 1) // 2])  # 1 x the lower median
        (hostile,) = [n for n in norms if partition_of(run.grid, n) == 0]
        assert hostile in record["aggregation"]["bounded"] and norms[hostile] > 100 * bound
    assert load_checkpoint(tmp_path / CHECKPOINT_NAME).round == 2


def test_a_stalled_step_says_whether_the_update_or_the_state_is_to_blame():
    from fedmeta.common.metaopt import MetaOptimizer, MetaOptimizerStateError

    # SGD has no state: a step far below θ's float32 resolution is the update's doing, and the message shows it.
    opt = MetaOptimizer({"w": torch.full((3,), 1.0)}, optimizer="sgd", lr=1e-7)
    with pytest.raises(MetaOptimizerStateError, match=r"largest update entry 0\.01, lr 1e-07\)") as raised:
        opt.step({"w": torch.full((3,), 1e-2)})
    assert "Adam" not in str(raised.value)
    # Adam after a near-zero round (a 2-site round whose bound a near-zero reply set): both sizes are given.
    opt = MetaOptimizer({"w": torch.full((3,), 1.0)}, lr=1e-3)
    with pytest.raises(MetaOptimizerStateError, match=r"largest update entry 1e-30, √ of Adam's second moment up to"):
        opt.step({"w": torch.full((3,), 1e-30)})
