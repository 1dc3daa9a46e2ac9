"""SecAgg+ on fedmeta's round: the sum is exact within the quantisation bound, survives a site that
vanishes mid-protocol, and what the server records of one site says nothing about that site's reply."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Context, Message

from fedmeta.client import secure_aggregation
from fedmeta.client.app import app as client_app
from fedmeta.common.checkpoint import CHECKPOINT_NAME, load_checkpoint
from fedmeta.common.config import RunConfig
from fedmeta.common.protocol import (
    SECAGG_ACTIVE, SECAGG_CIPHERTEXTS, SECAGG_DEAD, SECAGG_NODES, SECAGG_PK1, SECAGG_PK2, SECAGG_RECORD,
    SECAGG_REFUSED, SECAGG_SOURCES,
)
from fedmeta.common.secagg import MOD_RANGE, expand_mask, levels_for, neighbours, quantisation_bound, threshold
from fedmeta.server.metrics import METRICS_NAME, read_metrics
from tests.simulations.test_inprocess import federate, tiny_config

# SGD at lr 1 makes θ move by exactly the aggregate, so θ compares the aggregates themselves.
# The plain runs compared with SecAgg+ take the plain mean: the server cannot bound replies it never sees
# one by one, so the secure sum is that of the unbounded replies (the sites clip to secagg-clip-range).
SGD = dict(algorithm="fomaml", meta_optimizer="sgd", meta_lr=1.0, num_rounds=1, median_norm_bound=0.0)


def _theta_gap(a_dir, b_dir) -> float:
    a, b = (load_checkpoint(d / CHECKPOINT_NAME) for d in (a_dir, b_dir))
    return max(float((a.params[k] - b.params[k]).abs().max()) for k in a.params)


def _bound(config: RunConfig, sites: int) -> float:
    # One quantisation step per reply, plus float32 rounding of θ (|θ| < 4 here) in the two runs.
    return quantisation_bound(config.secagg_clip_range, levels_for(config.secagg_levels, sites)) + 4e-6


def test_the_secure_aggregate_equals_plain_aggregation_within_the_quantisation_bound(smoke_federation, tmp_path):
    plain = tiny_config(smoke_federation, tmp_path / "plain", **SGD)
    federate(plain, smoke_federation)
    secure = plain.replace(out_dir=str(tmp_path / "secure"), secure_aggregation="secagg+")
    federate(secure, smoke_federation)
    assert 0 < _theta_gap(tmp_path / "plain", tmp_path / "secure") <= _bound(secure, 3)
    (record,) = read_metrics(tmp_path / "secure" / METRICS_NAME)
    assert record["updated"] and record["sites_answered"] == 3 and record["aggregation"]["secure"] == "secagg+"
    # A coarse quantiser has a coarse bound, and meets it.
    coarse = secure.replace(out_dir=str(tmp_path / "coarse"), secagg_levels=2**16)
    federate(coarse, smoke_federation)
    assert _theta_gap(tmp_path / "plain", tmp_path / "coarse") <= _bound(coarse, 3)


class Vanishing:
    """The real ClientApp, except that one partition dies at one stage of the protocol."""

    def __init__(self, partition: int, stage: str):
        self.partition, self.stage = partition, stage
        self.unmask_requests: list[tuple[list[int], list[int]]] = []

    def __call__(self, message: Message, context: Context) -> Message:
        kind = message.metadata.message_type
        if kind == "train.secagg_unmask":
            record = message.content.config_records[SECAGG_RECORD]
            self.unmask_requests.append((list(record[SECAGG_ACTIVE]), list(record[SECAGG_DEAD])))
        if context.node_config["partition-id"] == self.partition and kind == self.stage:
            raise ConnectionError("the site's SuperNode died")
        return client_app(message, context)


@pytest.mark.parametrize("stage", ["train", "train.secagg_unmask"])
def test_a_site_that_vanishes_after_sharing_keys_leaves_the_sum_of_the_rest_exact(smoke_federation, tmp_path, stage):
    secure = tiny_config(smoke_federation, tmp_path / "secure", secure_aggregation="secagg+", **SGD)
    vanishing = Vanishing(0, stage)
    federate(secure, smoke_federation, client=vanishing)
    (record,) = read_metrics(tmp_path / "secure" / METRICS_NAME)
    assert record["updated"], record
    for active, dead in vanishing.unmask_requests:  # never both secrets of one site
        assert not set(active) & set(dead)
    if stage == "train":  # gone before its masked reply: the two others are summed, its pairwise masks removed
        plain = tiny_config(smoke_federation, tmp_path / "plain", **SGD)
        federate(plain, smoke_federation, client=Vanishing(0, "train"))
        assert record["sites_answered"] == 2 and record["aggregation"]["dropped_after_sharing"] == 1
    else:  # gone after its masked reply: its mask seed is rebuilt from its neighbours' shares
        plain = tiny_config(smoke_federation, tmp_path / "plain", **SGD)
        federate(plain, smoke_federation)
        assert record["sites_answered"] == 3
    assert _theta_gap(tmp_path / "plain", tmp_path / "secure") <= _bound(secure, 3)


def test_too_many_vanished_sites_abandon_the_round_instead_of_unmasking_a_part(smoke_federation, tmp_path):
    from fedmeta.server.app import RunFailed

    config = tiny_config(smoke_federation, tmp_path, secure_aggregation="secagg+", secagg_threshold=1.0,
                         num_rounds=1, max_failed_rounds=0)
    with pytest.raises(RunFailed, match="no round .* updated"):
        federate(config, smoke_federation, client=Vanishing(0, "train.secagg_unmask"))
    (record,) = read_metrics(tmp_path / METRICS_NAME)
    assert not record["updated"] and "share(s) of site" in record["aggregation"]["abandoned"]


def test_the_servers_record_of_one_site_is_uncorrelated_with_its_reply(smoke_federation, tmp_path, monkeypatch):
    seen: list[tuple[np.ndarray, np.ndarray]] = []
    real = secure_aggregation.masked_reply

    def spy(message, context, config, grads, seed):
        record = real(message, context, config, grads, seed)
        names = sorted(grads)
        truth = np.concatenate([grads[n].double().numpy().ravel() for n in names])
        masked = np.concatenate([record[n].numpy().ravel() for n in names]).astype(np.float64)
        seen.append((truth, masked))
        return record

    monkeypatch.setattr(secure_aggregation, "masked_reply", spy)
    federate(tiny_config(smoke_federation, tmp_path, secure_aggregation="secagg+", **SGD), smoke_federation)
    assert len(seen) == 3
    for truth, masked in seen:
        assert masked.min() >= 0 and masked.max() < MOD_RANGE
        # ~26,000 elements: |r| of unrelated vectors is below 0.03 with overwhelming probability.
        assert abs(np.corrcoef(truth, masked)[0, 1]) < 0.03
        assert abs(np.mean(masked) / MOD_RANGE - 0.5) < 0.01  # uniform over the modulus


class HostileServer:
    """The real ClientApp behind a server that deviates from SecAgg+ towards one site (partition 0): it
    rewrites that site's message at one stage, as a server trying to unmask one reply would."""

    def __init__(self, stage: str, tamper):
        self.stage, self.tamper = stage, tamper
        self.victim_replies: list[Message] = []

    def __call__(self, message: Message, context: Context) -> Message:
        victim = context.node_config["partition-id"] == 0
        if victim and message.metadata.message_type == self.stage:
            self.tamper(message.content.config_records[SECAGG_RECORD], int(context.node_id))
        reply = client_app(message, context)
        if victim and message.metadata.message_type == self.stage:
            self.victim_replies.append(reply)
        return reply


def _only_me(record, me):  # a listing of the site alone: its reply would be the "sum"
    i = list(record[SECAGG_NODES]).index(me)
    for key in (SECAGG_NODES, SECAGG_PK1, SECAGG_PK2):
        record[key] = [list(record[key])[i]]


def _no_shares(record, me):  # withhold every neighbour's share: its reply would carry no pairwise mask
    record[SECAGG_SOURCES], record[SECAGG_CIPHERTEXTS] = [], []


def _me_gone(record, me):  # name it gone although it answered: its mask key's shares would unmask it
    record[SECAGG_ACTIVE] = [n for n in record[SECAGG_ACTIVE] if n != me]
    record[SECAGG_DEAD] = [*record[SECAGG_DEAD], me]


def _alone(record, me):  # name it the only one who answered: the "sum" would be its reply
    record[SECAGG_DEAD] = [n for n in record[SECAGG_ACTIVE] if n != me] + list(record[SECAGG_DEAD])
    record[SECAGG_ACTIVE] = [me]


def _strangers(record, me):  # name sites that never took part
    record[SECAGG_DEAD] = [*record[SECAGG_DEAD], 987654321]


@pytest.mark.parametrize("stage, tamper, words", [
    ("train.secagg_shares", _only_me, "the round lists 1 participant(s), fewer than max(2, min-sites, the site's min-secagg-sites)=2"),
    ("train", _no_shares, "shares from 0 neighbour(s) reached this site, fewer than the 1 its threshold needs"),
    ("train.secagg_unmask", _me_gone, "names this site, which sent its masked reply, as not having answered"),
    ("train.secagg_unmask", _alone, "only 1 site(s) named as answered"),
    ("train.secagg_unmask", _strangers, "nodes [987654321] did not take part in this round"),
])
def test_a_site_refuses_a_server_that_deviates_from_the_protocol_to_unmask_it(smoke_federation, tmp_path, stage,
                                                                              tamper, words):
    from fedmeta.server.app import RunFailed

    hostile = HostileServer(stage, tamper)
    config = tiny_config(smoke_federation, tmp_path, secure_aggregation="secagg+", max_failed_rounds=0, **SGD)
    try:
        federate(config, smoke_federation, client=hostile)
    except RunFailed:  # the round may be abandoned for want of the victim's shares: never unmasked
        pass
    (reply,) = hostile.victim_replies
    assert reply.has_error(), "the site answered a hostile request"
    assert reply.error.reason.startswith(SECAGG_REFUSED) and words in reply.error.reason, reply.error.reason
    (record,) = read_metrics(tmp_path / METRICS_NAME)
    refused = [d for d in record["dropped"] if d["kind"] == "secagg-refused"]
    assert len(refused) == 1 and words in refused[0]["reason"]


def test_a_listing_of_two_is_refused_when_min_sites_asks_for_three(smoke_federation, tmp_path):
    def two(record, me):
        keep = [i for i, n in enumerate(record[SECAGG_NODES]) if n == me][:1] + \
               [i for i, n in enumerate(record[SECAGG_NODES]) if n != me][:1]
        for key in (SECAGG_NODES, SECAGG_PK1, SECAGG_PK2):
            record[key] = [list(record[key])[i] for i in keep]

    hostile = HostileServer("train.secagg_shares", two)
    config = tiny_config(smoke_federation, tmp_path, secure_aggregation="secagg+", min_sites=3, max_failed_rounds=0,
                         **SGD)
    try:
        federate(config, smoke_federation, client=hostile)
    except Exception:  # noqa: BLE001 - the round cannot complete without the victim
        pass
    (reply,) = hostile.victim_replies
    assert reply.has_error() and "the round lists 2 participant(s), fewer than max(2, min-sites, the site's min-secagg-sites)=3" in reply.error.reason


def test_a_copied_public_key_leaves_out_both_sites_that_show_it(smoke_federation, tmp_path):
    from fedmeta.server.app import RunFailed

    shown: list[bytes] = []

    def copier(message: Message, context: Context) -> Message:
        reply = client_app(message, context)
        if message.metadata.message_type == "train.secagg_keys" and not reply.has_error():
            record = reply.content.config_records[SECAGG_RECORD]
            if len(shown) == 1:  # the second site to answer shows the first one's key, whose private half it lacks
                record[SECAGG_PK1] = shown[0]
            shown.append(record[SECAGG_PK1])
        return reply

    config = tiny_config(smoke_federation, tmp_path, secure_aggregation="secagg+", max_failed_rounds=0, **SGD)
    with pytest.raises(RunFailed):
        federate(config, smoke_federation, client=copier)
    (record,) = read_metrics(tmp_path / METRICS_NAME)
    copied = [d for d in record["dropped"] if "shows a public key another site shows too" in d["reason"]]
    assert len(copied) == 2 and not record["updated"]
    assert "1 site(s) sent keys, fewer than 2" in record["aggregation"]["abandoned"]


def test_the_shared_arithmetic():
    nodes = [5, 17, 2, 40, 33, 8]
    assert neighbours(nodes, 17, 0) == [2, 5, 8, 33, 40]
    ring = {n: set(neighbours(nodes, n, 2)) for n in nodes}
    assert all(len(v) == 2 for v in ring.values())
    assert all(a in ring[b] for a in nodes for b in ring[a])  # symmetric: both sides mask with each other
    assert [threshold(n, 0.6) for n in (2, 3, 4, 5, 10)] == [2, 2, 3, 3, 6]
    assert threshold(10, 0.5) == 6  # more than half: two disjoint groups can never both recover
    a, b = expand_mask(b"seed", [(3, 4), (5,)]), expand_mask(b"seed", [(3, 4), (5,)])
    assert all(np.array_equal(x, y) for x, y in zip(a, b)) and a[0].dtype == np.int64
    assert not np.array_equal(expand_mask(b"other", [(3, 4)])[0], a[0])
    big = expand_mask(b"x", [(200_000,)])[0]
    assert big.min() >= 0 and big.max() < MOD_RANGE and abs(big.mean() / MOD_RANGE - 0.5) < 0.01
    assert levels_for(0, 3) * 3 < MOD_RANGE and levels_for(0, 1) == 2**30 and levels_for(1000, 3) == 1000


@pytest.mark.parametrize("changes, words", [
    (dict(secure_aggregation="secagg"), "secure-aggregation='secagg'"),
    (dict(secure_aggregation="secagg+", aggregation="median"), "use aggregation='mean' with secure-aggregation"),
    (dict(secure_aggregation="secagg+", dp="central"), "use dp='local'"),
    (dict(secure_aggregation="secagg+", max_update_norm=10.0), "cannot measure one's norm"),
    (dict(secure_aggregation="secagg+", site_weighting="data"), "site-weighting='per-site'"),
    (dict(secagg_threshold=0.4), "secagg-threshold=0.4"),
    (dict(secagg_levels=1), "secagg-levels=1"),
])
def test_bad_secure_aggregation_settings_are_refused_with_the_key(changes, words):
    with pytest.raises(ValueError, match=words):
        RunConfig(**changes)


def test_a_site_refuses_to_send_an_unmasked_reply_when_the_run_uses_secure_aggregation(smoke_federation, tmp_path):
    """A server that skips the protocol (sends a plain train message) gets an error, not the raw reply."""
    from fedmeta.server.coordinator import Coordinator
    from fedmeta.simulations.engines.inprocess import InProcessGrid, simulation_node_configs

    config = tiny_config(smoke_federation, tmp_path, secure_aggregation="secagg+", **SGD)
    grid = InProcessGrid(client_app, simulation_node_configs(5), config.to_run_config())
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, grid.run.run_id, 1
    node = next(n for n, v in grid.nodes.items() if v.context.node_config["partition-id"] == 0)
    (message,) = Coordinator(config).train_messages(1, [node], round_seed=3)
    (reply,) = grid.pull_messages(grid.push_messages([message]))
    assert reply.has_error() and "train failed at the site with PermissionError" in reply.error.reason
    assert not reply.has_content()  # nothing but the error came back


def test_a_wrong_share_abandons_the_round_instead_of_stepping_theta_with_garbage(smoke_federation, tmp_path):
    from flwr.app import ConfigRecord

    from fedmeta.common.protocol import SECAGG_NODES, SECAGG_SHARES
    from fedmeta.server.app import RunFailed

    def lying(message: Message, context: Context) -> Message:
        reply = client_app(message, context)
        if context.node_config["partition-id"] == 1 and message.metadata.message_type == "train.secagg_unmask":
            record = reply.content.config_records[SECAGG_RECORD]
            shares = [bytes(s) for s in record[SECAGG_SHARES]]
            shares[0] = shares[0][:-1] + bytes([shares[0][-1] ^ 0xFF])
            reply.content[SECAGG_RECORD] = ConfigRecord({SECAGG_NODES: list(record[SECAGG_NODES]),
                                                         SECAGG_SHARES: shares})
        return reply

    config = tiny_config(smoke_federation, tmp_path, secure_aggregation="secagg+", max_failed_rounds=0,
                         max_missed_rounds=1, **SGD)  # one missed round would bench a site
    with pytest.raises(RunFailed, match="no round .* updated"):
        federate(config, smoke_federation, client=lying)
    (record,) = read_metrics(tmp_path / METRICS_NAME)
    assert not record["updated"] and "disagree (a site sent a wrong share)" in record["aggregation"]["abandoned"]
    assert "benched" not in record  # the sites answered every stage: an abandoned round is not a missed one


class ShareWithholdingServer:
    """A server that strips one site (partition 0, V) without equivocating: it delivers V the share of one
    neighbour S only (t - 1 = 1 with 3 sites), so that V masks with S alone, then names V and the other
    neighbour W answered and S gone. Recovering V's seed and S's mask key would then expose V's reply."""

    def __init__(self):
        self.victim_replies: list[Message] = []
        self.sender: int | None = None

    def __call__(self, message: Message, context: Context) -> Message:
        victim = context.node_config["partition-id"] == 0
        kind = message.metadata.message_type
        record = message.content.config_records.get(SECAGG_RECORD)
        if victim and kind == "train":
            sources, ciphertexts = list(record[SECAGG_SOURCES]), list(record[SECAGG_CIPHERTEXTS])
            self.sender = sources[0]
            record[SECAGG_SOURCES], record[SECAGG_CIPHERTEXTS] = sources[:1], ciphertexts[:1]
        if victim and kind == "train.secagg_unmask":
            everyone = list(record[SECAGG_ACTIVE]) + list(record[SECAGG_DEAD])
            record[SECAGG_ACTIVE] = [n for n in everyone if n != self.sender]
            record[SECAGG_DEAD] = [self.sender]
        reply = client_app(message, context)
        if victim and kind == "train.secagg_unmask":
            self.victim_replies.append(reply)
        return reply


def test_a_site_refuses_to_unmask_when_named_neighbours_are_not_the_ones_it_masked_with(smoke_federation, tmp_path):
    from fedmeta.server.app import RunFailed

    hostile = ShareWithholdingServer()
    config = tiny_config(smoke_federation, tmp_path, secure_aggregation="secagg+", max_failed_rounds=0, **SGD)
    try:  # the rest of the run is the wrapped (honest) server's, fed a tampered share: what it sums is moot
        federate(config, smoke_federation, client=hostile)
    except RunFailed:
        pass
    (reply,) = hostile.victim_replies
    assert reply.has_error() and reply.error.reason.startswith(SECAGG_REFUSED)
    assert "are named, but no share of theirs reached this site" in reply.error.reason, reply.error.reason


def _replay(stage: str):
    """A client that the server asks twice for one stage of one round (partition 0)."""
    replies: list[Message] = []

    def client(message: Message, context: Context) -> Message:
        reply = client_app(message, context)
        if context.node_config["partition-id"] == 0 and message.metadata.message_type == stage:
            replies.append(client_app(message, context))  # the same request again, as a replaying server would
        return reply

    return client, replies


@pytest.mark.parametrize("stage, words", [
    ("train", "asked for a second masked reply in one round"),
    ("train.secagg_shares", "asked to share this site's secrets a second time in one round"),
])
def test_a_site_answers_each_stage_once_per_round(smoke_federation, tmp_path, stage, words):
    client, replies = _replay(stage)
    federate(tiny_config(smoke_federation, tmp_path, secure_aggregation="secagg+", **SGD), smoke_federation,
             client=client)
    (second,) = replies
    assert second.has_error() and words in second.error.reason, second.error.reason


def test_a_public_key_of_another_curve_is_dropped_at_the_key_exchange(smoke_federation, tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    foreign = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)

    def other_curve(message: Message, context: Context) -> Message:
        reply = client_app(message, context)
        if context.node_config["partition-id"] == 1 and message.metadata.message_type == "train.secagg_keys":
            reply.content.config_records[SECAGG_RECORD][SECAGG_PK2] = foreign
        return reply

    config = tiny_config(smoke_federation, tmp_path, secure_aggregation="secagg+", **SGD)
    federate(config, smoke_federation, client=other_curve)
    (record,) = read_metrics(tmp_path / METRICS_NAME)
    assert record["updated"] and record["sites_answered"] == 2  # the two honest sites' sum, not a lost round
    (dropped,) = record["dropped"]
    assert dropped["kind"] == "invalid" and "not an EC key on secp384r1" in dropped["reason"]


def test_a_garbage_share_costs_one_site_the_round_not_the_federation(smoke_federation, tmp_path):
    """Partition 1 sends partition 0 a ciphertext that does not decrypt: 0 refuses naming 1, the server
    removes 0's pairwise masks with its mask key, and the sum of 1 and 2 is exact."""
    from flwr.app import ConfigRecord

    from fedmeta.common.protocol import SECAGG_DESTINATIONS

    def garbling(message: Message, context: Context) -> Message:
        reply = client_app(message, context)
        if context.node_config["partition-id"] == 1 and message.metadata.message_type == "train.secagg_shares":
            record = reply.content.config_records[SECAGG_RECORD]
            destinations = list(record[SECAGG_DESTINATIONS])
            victim = next(n for n in destinations if garbling.victim == n)
            ciphertexts = [b"garbage" + bytes(c)[7:] if d == victim else bytes(c)
                           for d, c in zip(destinations, record[SECAGG_CIPHERTEXTS])]
            reply.content[SECAGG_RECORD] = ConfigRecord({SECAGG_DESTINATIONS: destinations,
                                                         SECAGG_CIPHERTEXTS: ciphertexts})
        if context.node_config["partition-id"] == 0:
            garbling.victim = int(context.node_id)
        return reply

    garbling.victim = None
    secure = tiny_config(smoke_federation, tmp_path / "secure", secure_aggregation="secagg+", **SGD)
    federate(secure, smoke_federation, client=garbling)
    (record,) = read_metrics(tmp_path / "secure" / METRICS_NAME)
    assert record["updated"] and record["sites_answered"] == 2, record
    (refused,) = [d for d in record["dropped"] if d["kind"] == "secagg-refused"]
    assert "the share from node" in refused["reason"] and "does not decrypt" in refused["reason"]
    assert "benched" not in record
    # Over several rounds the victim, which refused at the train stage, is never counted as missing one.
    longer = secure.replace(out_dir=str(tmp_path / "longer"), num_rounds=3, max_missed_rounds=1)
    federate(longer, smoke_federation, client=garbling)
    assert all("benched" not in r and r["updated"] for r in read_metrics(tmp_path / "longer" / METRICS_NAME))
    plain = tiny_config(smoke_federation, tmp_path / "plain", **SGD)
    federate(plain, smoke_federation, client=Vanishing(0, "train"))
    assert _theta_gap(tmp_path / "plain", tmp_path / "secure") <= _bound(secure, 3)


def test_local_dp_sites_refuse_to_unmask_fewer_replies_than_their_noise_was_split_over(smoke_federation, tmp_path):
    from fedmeta.server.app import RunFailed

    def fewer(record, me):  # name one answering site gone: two of three, below the quorum of 3 the noise assumed
        others = [n for n in record[SECAGG_ACTIVE] if n != me]
        record[SECAGG_ACTIVE] = [n for n in record[SECAGG_ACTIVE] if n != others[0]]
        record[SECAGG_DEAD] = [*record[SECAGG_DEAD], others[0]]

    hostile = HostileServer("train.secagg_unmask", fewer)
    config = tiny_config(smoke_federation, tmp_path, secure_aggregation="secagg+", dp="local", dp_clip_norm=1.0,
                         dp_noise_multiplier=0.5, round_quorum=1.0, max_failed_rounds=0, **SGD)
    try:  # the two others unmask; what the wrapped server then sums is moot
        federate(config, smoke_federation, client=hostile)
    except RunFailed:
        pass
    (reply,) = hostile.victim_replies
    assert reply.has_error() and "fewer than the 3 this site's local DP noise was split over" in reply.error.reason


def test_a_site_whose_shares_nobody_can_decrypt_is_named_in_every_round(smoke_federation, tmp_path):
    """It stops the rounds (the others refuse its garbage), and the record names it for the operator; nobody is
    excluded on an accusation (two colluding sites could otherwise exclude honest ones) or counted missing."""
    from flwr.app import ConfigRecord

    from fedmeta.common.protocol import SECAGG_DESTINATIONS
    from fedmeta.server.app import RunFailed

    def garbling_all(message: Message, context: Context) -> Message:
        reply = client_app(message, context)
        if context.node_config["partition-id"] == 1 and message.metadata.message_type == "train.secagg_shares":
            record = reply.content.config_records[SECAGG_RECORD]
            reply.content[SECAGG_RECORD] = ConfigRecord({
                SECAGG_DESTINATIONS: list(record[SECAGG_DESTINATIONS]),
                SECAGG_CIPHERTEXTS: [b"garbage" + bytes(c)[7:] for c in record[SECAGG_CIPHERTEXTS]]})
        return reply

    config = tiny_config(smoke_federation, tmp_path, secure_aggregation="secagg+", max_failed_rounds=0,
                         max_missed_rounds=1, **{**SGD, "num_rounds": 2})
    with pytest.raises(RunFailed):
        federate(config, smoke_federation, client=garbling_all)
    records = read_metrics(tmp_path / METRICS_NAME)
    assert len(records) == 2 and not any(r["updated"] or "benched" in r for r in records)
    for record in records:
        (named,) = record["aggregation"]["undecryptable_shares_from"].items()
        assert len(named[1]) == 2  # both honest sites said so


@pytest.mark.parametrize("changes, words", [
    (dict(secagg_neighbours=1, min_sites=3), "a sparse graph needs at least 2 neighbours"),
    (dict(secagg_neighbours=2, dp="local"), "use secagg-neighbours=0 (every other site) with dp='local'"),
    (dict(dp="local", dp_noise_multiplier=2.0), "must be at least C + 6 sd = 13"),
])
def test_secure_settings_a_deviating_server_could_exploit_are_refused(changes, words):
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)").replace("+", r"\+")):
        RunConfig(secure_aggregation="secagg+", **changes)


def test_a_round_is_answered_once_and_rounds_only_go_forward():
    from flwr.app import ConfigRecord, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from fedmeta.common.protocol import CONFIG_RECORD, ROUND_KEY

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
    context = Context(0, 7, {}, RecordDict(), {})

    def keys_for(server_round: int) -> None:
        body = RecordDict({CONFIG_RECORD: ConfigRecord({ROUND_KEY: server_round}), SECAGG_RECORD: ConfigRecord({})})
        secure_aggregation.keys(Message(body, dst_node_id=7, message_type="train.secagg_keys"), context)

    keys_for(5)
    for again in (5, 4):  # a rerun of round 5, then an older round: refused
        with pytest.raises(secure_aggregation.SecAggError, match="a round is answered once"):
            keys_for(again)
    keys_for(6)


def test_a_site_refuses_a_run_below_its_own_privacy_floor(smoke_federation, tmp_path):
    from fedmeta.server.app import RunFailed
    from fedmeta.simulations.engines.inprocess import run_inprocess, simulation_node_configs
    from tests.simulations.test_inprocess import num_sites

    # The site operator's node config, not the server's run config: secure aggregation and local DP required.
    nodes = [{**n, "require-secure-aggregation": "secagg+", "require-dp": "local"}
             for n in simulation_node_configs(num_sites(smoke_federation))]
    config = tiny_config(smoke_federation, tmp_path, secure_aggregation="secagg+", max_failed_rounds=0, **SGD)
    with pytest.raises(RunFailed):
        run_inprocess(config.to_run_config(), nodes, client_app=client_app)
    (record,) = read_metrics(tmp_path / METRICS_NAME)
    refused = [d for d in record["dropped"] if d["kind"] == "secagg-refused"]
    assert len(refused) == 3 and all("privacy floor" in d["reason"] and "needs dp='local' (noise the site adds "
                                     "itself) but the run has dp='none'" in d["reason"] for d in refused)
    # A plain run (no secure aggregation at all) is refused at the train message too: no raw reply leaves.
    plain = config.replace(out_dir=str(tmp_path / "plain"), secure_aggregation="none")
    with pytest.raises(RunFailed):
        run_inprocess(plain.to_run_config(), nodes, client_app=client_app)
    (record,) = read_metrics(tmp_path / "plain" / METRICS_NAME)
    assert all("needs secure-aggregation='secagg+' but the run has 'none'" in d["reason"] for d in record["dropped"])
    # The site's own floor on the fewest participants: 4 required, 3 listed.
    fewest = [{**n, "min-secagg-sites": 4} for n in simulation_node_configs(num_sites(smoke_federation))]
    with pytest.raises(RunFailed):
        run_inprocess(config.replace(out_dir=str(tmp_path / "fewest")).to_run_config(), fewest, client_app=client_app)
    (record,) = read_metrics(tmp_path / "fewest" / METRICS_NAME)
    assert any("the site's min-secagg-sites)=4" in d["reason"] for d in record["dropped"])


@pytest.mark.parametrize("floor, changes, words", [
    # A noise floor is a local-DP floor: central DP would send the raw reply to the server.
    ({"min-dp-noise-multiplier": 1.0}, dict(secure_aggregation="none", dp="central"), "needs dp='local'"),
    ({"max-dp-clip-norm": 1.0}, dict(dp="local", dp_seeded_noise=True), "dp-seeded-noise=true"),
    ({"min-secagg-sites": 5}, dict(secure_aggregation="none"), "needs secure-aggregation='secagg+'"),
    ({"min-secagg-threshold": 0.8}, dict(secagg_threshold=0.6), "min-secagg-threshold=0.8"),
    ({"data-dir": "/data"}, dict(dp="local", dp_seeded_noise=True), "for simulations only"),
])
def test_the_floor_implies_what_it_needs(floor, changes, words):
    from fedmeta.client.floor import floor_problem

    config = RunConfig(**{"secure_aggregation": "secagg+", **changes})
    assert words in (floor_problem(config, floor) or "")


@pytest.mark.parametrize("floor, words", [
    ({"min-secagg-sites": 2.7}, "must be a whole number"),
    ({"max-dp-clip-norm": 0}, "must be a number > 0"),
    ({"require-secure-aggregation": True}, "use 'secagg+'"),
    ({"require-dp": "central"}, "use 'local'"),
])
def test_bad_floor_values_are_named(floor, words):
    from fedmeta.client.floor import floor_problem

    import re

    with pytest.raises(ValueError, match=re.escape(words)):
        floor_problem(RunConfig(), floor)


def test_a_later_round_repeating_a_round_seed_is_refused(smoke_federation, tmp_path):
    """The same θ and seed would give the same reply: answering it twice lets a server difference two sums."""
    from fedmeta.common.protocol import CONFIG_RECORD, ROUND_SEED_KEY

    first_seed: list[int] = []
    refusals: list[str] = []

    def replaying(message: Message, context: Context) -> Message:
        if message.metadata.message_type == "train" and context.node_config["partition-id"] == 0:
            record = message.content.config_records[CONFIG_RECORD]
            first_seed.append(int(record[ROUND_SEED_KEY]))
            record[ROUND_SEED_KEY] = first_seed[0]  # round 2 carries round 1's seed
        reply = client_app(message, context)
        if reply.has_error():
            refusals.append(reply.error.reason)
        return reply

    config = tiny_config(smoke_federation, tmp_path, secure_aggregation="secagg+", **{**SGD, "num_rounds": 2})
    try:
        federate(config, smoke_federation, client=replaying)
    except Exception:  # noqa: BLE001 - the tampered round may be abandoned
        pass
    assert any("this round's seed was answered in an earlier round" in r for r in refusals), refusals


def test_a_deployed_site_never_gives_the_same_reply_twice_under_secure_aggregation(smoke_federation, tmp_path,
                                                                                    monkeypatch):
    """Two runs, the same θ and round seeds: a deployed site's episodes differ (its own randomness), so no two
    sums can be subtracted to isolate it; a simulated site's repeat exactly (reproducibility)."""
    from fedmeta.client import app as client_module
    from fedmeta.common.synth import load_manifest
    from fedmeta.simulations.engines.inprocess import run_inprocess, simulation_node_configs
    from tests.simulations.test_inprocess import num_sites

    seeds: list[int] = []
    real = client_module.site_update

    def spy(*args, **kwargs):
        seeds.append(kwargs["seed"])
        return real(*args, **kwargs)

    monkeypatch.setattr(client_module, "site_update", spy)
    manifest = load_manifest(smoke_federation)
    deployed = [{"data-dir": str(smoke_federation / s.path), "role": "train", "site-id": i}
                for i, s in enumerate(manifest.train_sites)]
    deployed += [{"data-dir": str(smoke_federation / s.path), "role": "heldout", "site-id": 10 + i}
                 for i, s in enumerate(manifest.heldout_sites)]
    for nodes in (deployed, simulation_node_configs(num_sites(smoke_federation))):
        runs = []
        for run in ("a", "b"):
            seeds.clear()
            config = tiny_config(smoke_federation, tmp_path / f"{len(nodes)}-{run}-{id(nodes)}",
                                 secure_aggregation="secagg+", **SGD)
            run_inprocess(config.to_run_config(), nodes, client_app=client_app)
            runs.append(sorted(seeds))
        if nodes is deployed:
            assert len(runs[0]) == 3 and not set(runs[0]) & set(runs[1])
        else:
            assert runs[0] == runs[1]


def test_a_site_refuses_to_unmask_a_piece_of_a_sparse_graph_smaller_than_min_sites():
    """secagg-neighbours=2 on a ring of 9: a server withholds the shares of sites 3, 6 and 9 (never naming them)
    so that {1,2}, {4,5}, {7,8} mask only within themselves, then names all six answered in one list. Each piece
    would unmask alone, a sum of 2 under min-sites=3: every site refuses (a review reproduced the pair sums)."""
    import torch
    from flwr.app import ConfigRecord, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from fedmeta.common.protocol import CONFIG_RECORD, ROUND_KEY, ROUND_SEED_KEY, SECAGG_DESTINATIONS

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
    config = RunConfig(secure_aggregation="secagg+", secagg_neighbours=2, min_sites=3)

    def message(node, payload, **extra):
        body = RecordDict({CONFIG_RECORD: ConfigRecord({ROUND_KEY: 1, ROUND_SEED_KEY: 7, **extra}),
                           SECAGG_RECORD: ConfigRecord(payload)})
        return Message(body, dst_node_id=node, message_type="train")

    nodes = list(range(1, 10))
    pieces = [[1, 2], [4, 5], [7, 8]]
    active = [n for piece in pieces for n in piece]
    contexts = {n: Context(0, n, {}, RecordDict(), {}) for n in nodes}
    keys = {n: secure_aggregation.keys(message(n, {}), contexts[n]).content.config_records[SECAGG_RECORD]
            for n in nodes}
    listing = {SECAGG_NODES: nodes, SECAGG_PK1: [keys[n][SECAGG_PK1] for n in nodes],
               SECAGG_PK2: [keys[n][SECAGG_PK2] for n in nodes]}
    sent = {}
    for n in nodes:
        reply = secure_aggregation.shares(message(n, dict(listing)), contexts[n], config)
        record = reply.content.config_records[SECAGG_RECORD]
        sent[n] = dict(zip(record[SECAGG_DESTINATIONS], record[SECAGG_CIPHERTEXTS]))
    piece_of = {n: piece for piece in pieces for n in piece}
    for n in active:  # only the shares from within its own piece reach each site
        sources = [s for s in piece_of[n] if s != n and n in sent[s]]
        secure_aggregation.masked_reply(message(n, {SECAGG_SOURCES: sources,
                                                    SECAGG_CIPHERTEXTS: [sent[s][n] for s in sources]}),
                                        contexts[n], config, {"w": torch.full((4,), 0.01 * n)}, seed=n)
    for n in active:  # one list for everyone: no equivocation
        with pytest.raises(secure_aggregation.SecAggError, match="only 2 of the sites this site masked with"):
            secure_aggregation.unmask(message(n, {SECAGG_ACTIVE: active, SECAGG_DEAD: []}), contexts[n], config)
