"""A site's side of SecAgg+ (Bell et al. 2020; Bonawitz et al. 2017), on Flower's primitives.

Per round, around fedmeta's train message:

1. ``keys``: two fresh ECDH key pairs (Flower's ``generate_key_pairs``): one to agree pairwise masks,
   one to encrypt shares; the public halves go to the server.
2. ``shares``: a fresh 32-byte mask seed b; b and the first private key are Shamir-shared
   (Flower's ``create_shares``) among the site's neighbours, each share encrypted for its holder
   with a key agreed from the second pair (Flower's ``generate_shared_key``, Fernet ``encrypt``).
3. ``train``: the ordinary site update, quantised (Flower's stochastic ``quantize``), plus the mask
   from b, plus (or minus) one pairwise mask per neighbour that shared, modulo 2^32. The server
   sees only this.
4. ``unmask``: for each neighbour the server names as having answered, the share of its b; for
   each it names as gone, the share of its mask key — never both for one site (refused).

What a site checks, so that a server that deviates from the protocol cannot strip one site's masks
(Bonawitz et al. §4's client-side checks): the round lists at least max(2, min-sites) participants,
each with its own keys; at least t − 1 neighbours' shares reach it (t: its Shamir threshold), so its
reply is masked with enough pairwise masks that the server would need t holders' help to remove them;
it answers each stage once per round; at unmasking, it is itself named as answered, at least max(2,
min-sites) sites are named as answered (under local DP, the quorum its noise was split over), every
named site is one of the round's participants, every named neighbour is one whose share it received
(so masked with), and t of the sites it masked with, itself included, are named as answered: one of
them stays answered, so its pairwise mask with this site is never revealed. What it
cannot check alone is that every site got the same lists: a server that shows different sites
different "answered" lists is outside the honest-but-curious model SecAgg+ assumes (docs/privacy.md).

The private keys, b and the shares held for others live in the node's ``context.state`` for one
round and are replaced the next.
"""

from __future__ import annotations

import os
import secrets

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common.secure_aggregation.crypto.shamir import create_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import decrypt, encrypt, generate_shared_key
from flwr.common.secure_aggregation.quantization import quantize
from flwr.common.secure_aggregation.secaggplus_utils import share_keys_plaintext_concat, share_keys_plaintext_separate
from flwr.supercore.primitives.asymmetric import (
    bytes_to_private_key, bytes_to_public_key, generate_key_pairs, private_key_to_bytes, public_key_to_bytes,
)

from fedmeta.client.floor import sites_floor
from fedmeta.common.config import RunConfig
from fedmeta.common.protocol import (
    CONFIG_RECORD, DATA_DIR_KEY, ROUND_KEY, ROUND_SEED_KEY, SECAGG_ACTIVE, SECAGG_CIPHERTEXTS, SECAGG_DEAD,
    SECAGG_DESTINATIONS, SAMPLED_SITES_KEY, SECAGG_BAD_SHARE, SECAGG_NODES, SECAGG_PK1, SECAGG_PK2, SECAGG_RECORD,
    SECAGG_SHARES, SECAGG_SOURCES,
)
from fedmeta.common.privacy import local_noise_split
from fedmeta.common.secagg import MOD_RANGE, expand_mask, levels_for, neighbours, threshold

_STATE = "fedmeta-secagg"  # the node's context.state ConfigRecord for the round in progress
_LAST = "fedmeta-secagg-last"  # the latest round whose keys this node sent; never deleted
_SEEDS, _SEEDS_KEPT = "fedmeta-secagg-seeds", 4096  # the round seeds this node answered (the latest ones)


class SecAggError(ValueError):
    """A message that breaks the protocol (wrong round, a key shown twice, a share asked for twice)."""


def episode_seed(message: Message, context: Context, seed: int) -> int:
    """The seed a site draws its round's episodes with: ``seed`` (the round's, per site), or, at a deployed site
    under secure aggregation, ``seed`` mixed with fresh randomness of its own: the same θ and round seed in
    another run (a relaunch, a resume, a server replaying) never give the same reply, so two sums cannot be
    subtracted to isolate it. Simulations keep the round seed alone: reproducible."""
    if SECAGG_RECORD in message.content.config_records and DATA_DIR_KEY in context.node_config:
        return (seed + secrets.randbelow(2**31 - 1)) % (2**31 - 1)
    return seed


def keys(message: Message, context: Context) -> Message:
    server_round = _round(message)
    last = context.state.config_records.get(_LAST)
    if last is not None and server_round <= int(last["round"]):
        # A round answered once is never answered again: a server that reran it (with or without some site)
        # could difference the two sums, or release more than the accountant booked.
        raise SecAggError(f"round {server_round}'s key exchange comes after round {int(last['round'])}'s: a round is "
                          "answered once, and rounds only go forward")
    context.state[_LAST] = ConfigRecord({"round": server_round})
    sk1, pk1 = generate_key_pairs()
    sk2, pk2 = generate_key_pairs()
    context.state[_STATE] = ConfigRecord({
        "round": server_round, "sk1": private_key_to_bytes(sk1), "sk2": private_key_to_bytes(sk2),
        "pk1": public_key_to_bytes(pk1), "pk2": public_key_to_bytes(pk2),
    })
    reply = ConfigRecord({SECAGG_PK1: public_key_to_bytes(pk1), SECAGG_PK2: public_key_to_bytes(pk2)})
    return Message(RecordDict({SECAGG_RECORD: reply}), reply_to=message)


def shares(message: Message, context: Context, config: RunConfig) -> Message:
    state = _state(context, _round(message))
    if "seed" in state:
        # A second sharing would hand out shares of a second seed (or, after masking, of a seed already used).
        raise SecAggError("asked to share this site's secrets a second time in one round")
    record = message.content.config_records[SECAGG_RECORD]
    nodes = [int(n) for n in record[SECAGG_NODES]]
    pk1s, pk2s = list(record[SECAGG_PK1]), list(record[SECAGG_PK2])
    me = int(context.node_id)
    if len(set(nodes)) != len(nodes) or len(pk1s) != len(nodes) or len(pk2s) != len(nodes):
        raise SecAggError("the participants' list is malformed (duplicate nodes or missing keys)")
    if len(set(pk1s) | set(pk2s)) != 2 * len(nodes):
        raise SecAggError("two participants show the same public key")
    if len(nodes) < _fewest(config, context):
        # Two participants: the sum and its own reply give the other's; one: its reply in the clear.
        raise SecAggError(f"the round lists {len(nodes)} participant(s), fewer than max(2, min-sites, the site's "
                          f"min-secagg-sites)={_fewest(config, context)}; refusing to share secrets with so few")
    if me not in nodes or pk1s[nodes.index(me)] != state["pk1"] or pk2s[nodes.index(me)] != state["pk2"]:
        raise SecAggError("the server lists this site with keys it did not send")
    group = neighbours(nodes, me, config.secagg_neighbours)
    t = threshold(len(group) + 1, config.secagg_threshold)
    seed = os.urandom(32)
    holders = [me, *group]
    seed_shares = create_shares(seed, t, len(holders))
    key_shares = create_shares(state["sk1"], t, len(holders))
    sk2 = bytes_to_private_key(state["sk2"])
    destinations, ciphertexts = [], []
    for holder, seed_share, key_share in zip(holders, seed_shares, key_shares):
        if holder == me:
            own = (seed_share, key_share)
            continue
        shared = _agree(sk2, pk2s[nodes.index(holder)], holder)
        destinations.append(holder)
        ciphertexts.append(encrypt(shared, share_keys_plaintext_concat(me, holder, seed_share, key_share)))
    state.update({
        "seed": seed, "nodes": nodes, "pk1s": pk1s, "pk2s": pk2s,
        # shares this site holds: its own, then (at the train message) its neighbours'
        "held-from": [me], "held-seed": [own[0]], "held-key": [own[1]],
    })
    reply = ConfigRecord({SECAGG_DESTINATIONS: destinations, SECAGG_CIPHERTEXTS: ciphertexts})
    return Message(RecordDict({SECAGG_RECORD: reply}), reply_to=message)


def masked_reply(message: Message, context: Context, config: RunConfig, grads: dict[str, torch.Tensor],
                 seed: int) -> ArrayRecord:
    """The train reply under secure aggregation: ``grads`` quantised and masked, keyed like θ."""
    state = _state(context, _round(message))
    if "seed" not in state:
        raise SecAggError("asked for a masked reply before this site shared its secrets")
    if state.get("masked"):
        # Two masked replies under one seed and one set of pairwise masks: their difference is unmasked.
        raise SecAggError("asked for a second masked reply in one round")
    # A round seed answered before: the same θ and seed give the same reply, so a later round repeating both
    # without one site would let the server subtract that site's reply out of two sums.
    round_seed = int(message.content.config_records[CONFIG_RECORD][ROUND_SEED_KEY])
    seen = context.state.config_records.get(_SEEDS)
    answered = [int(v) for v in seen["seeds"]] if seen is not None else []
    if round_seed in answered:
        raise SecAggError("this round's seed was answered in an earlier round: a rerun of a round, refused")
    context.state[_SEEDS] = ConfigRecord({"seeds": (answered + [round_seed])[-_SEEDS_KEPT:]})
    record = message.content.config_records[SECAGG_RECORD]
    me, nodes = int(context.node_id), [int(n) for n in state["nodes"]]
    group = set(neighbours(nodes, me, config.secagg_neighbours))
    sk2 = bytes_to_private_key(state["sk2"])
    pk2s, pk1s = list(state["pk2s"]), list(state["pk1s"])
    held_from, held_seed, held_key = list(state["held-from"]), list(state["held-seed"]), list(state["held-key"])
    sources, ciphertexts = list(record[SECAGG_SOURCES]), list(record[SECAGG_CIPHERTEXTS])
    if len(sources) != len(ciphertexts):
        raise SecAggError(f"{len(sources)} share sources but {len(ciphertexts)} ciphertexts")
    senders: list[int] = []  # the neighbours whose shares this site holds, and masks its reply with
    for source, ciphertext in zip(sources, ciphertexts):
        source = int(source)
        if source not in group or source in senders:
            raise SecAggError(f"a share from node {source}, which is not an expected neighbour")
        shared = _agree(sk2, pk2s[nodes.index(source)], source)
        try:
            src, dst, seed_share, key_share = share_keys_plaintext_separate(decrypt(shared, bytes(ciphertext)))
        except Exception:  # noqa: BLE001 - Fernet's InvalidToken, or a plaintext that does not split
            # This site leaves the round (the server recovers its mask key from its other holders and the
            # round goes on without it). Leaving out the sender instead would need the sender's mask key
            # from holders other than this site, which a small federation (3 sites, t = 2) does not have.
            raise SecAggError(SECAGG_BAD_SHARE.format(node=source) + " with the key agreed with it (a wrong or "
                              "tampered share)") from None
        if (src, dst) != (source, me):
            raise SecAggError(f"a share labelled {src}->{dst} arrived as {source}->{me}")
        senders.append(source)
        held_from.append(source), held_seed.append(seed_share), held_key.append(key_share)
    t = threshold(len(group) + 1, config.secagg_threshold)
    if len(senders) < t - 1:
        # Masked with fewer neighbours than the threshold, its reply could be unmasked by the server with
        # the help of fewer sites than the threshold promises: refuse rather than send it.
        raise SecAggError(f"shares from {len(senders)} neighbour(s) reached this site, fewer than the "
                          f"{t - 1} its threshold needs; refusing to send a weakly masked reply")
    split = 0
    if config.dp == "local":  # the fewest replies whose sum this site will help unmask (its noise's split)
        sampled = int(message.content.config_records[CONFIG_RECORD].get(SAMPLED_SITES_KEY, len(nodes)))
        if sampled < 1:
            raise SecAggError(f"{SAMPLED_SITES_KEY}={sampled}: a round samples at least one site")
        split = local_noise_split(config, min(sampled, len(nodes)))
        # The quantiser clips each element to +-secagg-clip-range after the noise is added: a range within
        # reach of the noise would cut it off, and the sum would no longer carry the Gaussian the accountant books.
        reach = config.dp_clip_norm + 6 * config.dp_noise_multiplier * config.dp_clip_norm / split ** 0.5
        if config.secagg_clip_range < reach:
            raise SecAggError(f"secagg-clip-range={config.secagg_clip_range:g} would clip the local DP noise (each "
                              f"element is within C + 6 sd = {reach:.3g} of zero); the run needs a larger range")
    state.update({"held-from": held_from, "held-seed": held_seed, "held-key": held_key, "masked": True,
                  "senders": senders, "noise-split": split})

    names = sorted(grads)
    arrays = [grads[n].detach().cpu().to(torch.float64).numpy() for n in names]
    # Stochastic rounding draws from NumPy's global generator (Flower's quantize); seeded here so that a
    # simulation repeats, and restored so that nothing else in the process sees the change.
    saved = np.random.get_state()
    np.random.seed(seed % 2**32)
    try:
        levels = levels_for(config.secagg_levels, len(nodes))  # the sum of every participant must fit 2^32
        quantised = quantize(arrays, config.secagg_clip_range, levels)
    finally:
        np.random.set_state(saved)
    shapes = [a.shape for a in quantised]
    masked = [q.astype(np.int64) + m for q, m in zip(quantised, expand_mask(state["seed"], shapes))]
    sk1 = bytes_to_private_key(state["sk1"])
    for other in senders:  # pairwise masks cancel in the sum: the larger id adds, the smaller subtracts
        pairwise = expand_mask(_agree(sk1, pk1s[nodes.index(other)], other), shapes)
        sign = 1 if me > other else -1
        masked = [v + sign * m for v, m in zip(masked, pairwise)]
    # Values below 2^32 travel as uint32: the masked reply costs what a float32 one does.
    return ArrayRecord({n: Array(np.mod(v, MOD_RANGE).astype(np.uint32)) for n, v in zip(names, masked)})


def participants(message: Message, context: Context) -> int:
    """How many sites the round's key listing holds: the most whose replies the server can sum, hence the
    most over which local DP may split its noise (a server that claims more sites asks for less noise each)."""
    return len(_state(context, _round(message))["nodes"])


def unmask(message: Message, context: Context, config: RunConfig) -> Message:
    state = _state(context, _round(message))
    if not state.get("masked"):
        raise SecAggError("asked to unmask before this site sent its masked reply")
    record = message.content.config_records[SECAGG_RECORD]
    active, dead = [int(n) for n in record[SECAGG_ACTIVE]], [int(n) for n in record[SECAGG_DEAD]]
    me, nodes = int(context.node_id), [int(n) for n in state["nodes"]]
    if set(active) & set(dead):
        # Both shares of one site would let the server strip its mask and read its reply.
        raise SecAggError(f"nodes {sorted(set(active) & set(dead))} are named both answered and gone")
    if len(set(active)) != len(active) or len(set(dead)) != len(dead):
        raise SecAggError("the answered or gone list names a node twice")
    if not set(active) | set(dead) <= set(nodes):
        raise SecAggError(f"nodes {sorted((set(active) | set(dead)) - set(nodes))} did not take part in this round")
    if me not in active:
        # This site did answer; named gone, its mask key's shares would unmask the reply it sent.
        raise SecAggError("the server names this site, which sent its masked reply, as not having answered")
    if len(active) < _fewest(config, context):
        raise SecAggError(f"only {len(active)} site(s) named as answered, fewer than max(2, min-sites, the site's "
                          f"min-secagg-sites)={_fewest(config, context)}: the sum would reveal too few sites' replies")
    if len(active) < int(state.get("noise-split", 0)):
        raise SecAggError(f"only {len(active)} site(s) named as answered, fewer than the {state['noise-split']} "
                          "this site's local DP noise was split over: the sum would carry less noise than budgeted")
    # Checked against what this site itself received, not against the key listing: the server that chose
    # which shares reached it could otherwise name its few senders gone, recover their mask keys, and
    # with this site's seed strip every mask from its reply.
    group = set(neighbours(nodes, me, config.secagg_neighbours))
    senders = {int(n) for n in state["senders"]}
    strangers = ((set(active) | set(dead)) & group) - senders
    if strangers:
        raise SecAggError(f"neighbours {sorted(strangers)} are named, but no share of theirs reached this site: "
                          "it did not mask with them")
    # Only sites this one masked with can share a sum with it: with a sparse graph (secagg-neighbours > 0) a
    # server that withholds shares can cut the answered sites into pieces and unmask each piece alone, so
    # the site's own piece must hold as many answered sites as any sum it helps unmask (min-sites, its
    # floor, the local-DP split), not only its Shamir threshold.
    t = threshold(len(group) + 1, config.secagg_threshold)
    needed = max(t, _fewest(config, context), int(state.get("noise-split", 0)))
    answered = len(set(active) & (senders | {me}))
    if answered < needed:
        raise SecAggError(f"only {answered} of the sites this site masked with (itself included) are named as "
                          f"answered, fewer than the {needed} a sum it helps unmask must hold (its threshold {t}, "
                          "min-sites, its floor, the local-DP split)")
    held = {int(n): i for i, n in enumerate(state["held-from"])}
    nodes, out = [], []
    for node in active:
        if node in held:
            nodes.append(node), out.append(state["held-seed"][held[node]])
    for node in dead:
        if node in held:
            nodes.append(node), out.append(state["held-key"][held[node]])
    del context.state[_STATE]  # one unmasking per round: a second request finds nothing
    reply = ConfigRecord({SECAGG_NODES: nodes, SECAGG_SHARES: out})
    return Message(RecordDict({SECAGG_RECORD: reply}), reply_to=message)


def _agree(private_key, public_key: bytes, node: int) -> bytes:
    """Flower's ECDH + HKDF key agreement with a neighbour's public key, or an error naming the neighbour."""
    try:
        return generate_shared_key(private_key, bytes_to_public_key(bytes(public_key)))
    except Exception as err:  # noqa: BLE001 - a key of another curve or type, or bytes that do not parse
        raise SecAggError(f"the public key node {node} showed does not agree with this site's key "
                          f"({type(err).__name__}): not an EC key on Flower's curve") from None


def _fewest(config: RunConfig, context: Context) -> int:
    """The fewest participants a site accepts in a secure round: a sum of fewer than two replies is one reply;
    the run's min-sites and the site's own floor (node config min-secagg-sites) can ask for more."""
    return max(2, int(config.min_sites), sites_floor(context.node_config))


def _round(message: Message) -> int:
    return int(message.content.config_records[CONFIG_RECORD][ROUND_KEY])


def _state(context: Context, server_round: int) -> dict:
    record = context.state.config_records.get(_STATE)
    if record is None or int(record["round"]) != server_round:
        raise SecAggError(f"no key exchange of round {server_round} at this site (a restart, or a stage skipped)")
    return _StateView(record)


class _StateView(dict):
    """The ConfigRecord's values as a dict whose updates are written back to the record."""

    def __init__(self, record: ConfigRecord):
        super().__init__(record.items())
        self._record = record

    def update(self, values: dict) -> None:  # type: ignore[override]
        super().update(values)
        for key, value in values.items():
            self._record[key] = value


__all__ = ["SecAggError", "episode_seed", "keys", "masked_reply", "participants", "shares", "unmask"]
