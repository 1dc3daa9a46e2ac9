"""The server's side of SecAgg+ over fedmeta's own Message-API round (Flower 1.41 ships SecAgg+ only
for its legacy strategy stack).

One training round becomes four exchanges with the sampled sites (``fedmeta.client.secure_aggregation``
says what each site does): public keys → encrypted shares routed between neighbours → the train
message with each site's incoming shares, answered by a quantised, masked reply → the shares that
remove the masks of those who answered and the pairwise masks of those who vanished after sharing.
The server then holds the sum of the answering sites' quantised replies and nothing else; it
recovers secrets only with Flower's ``combine_shares`` and never asks for both secrets of one site.
Every exchange closes like a training round (``round-deadline`` once a quorum answered,
``round-timeout`` at the latest); sites may vanish after sharing keys as long as each secret keeps
``secagg-threshold`` of its holders.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable

import numpy as np
import torch
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.common.secure_aggregation.crypto.shamir import combine_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import generate_shared_key
from flwr.serverapp import Grid
from flwr.supercore.primitives.asymmetric import bytes_to_private_key, bytes_to_public_key

from fedmeta.common.config import RunConfig
from fedmeta.common.privacy import local_noise_split
from fedmeta.common.protocol import (
    CONFIG_RECORD, MASKED_RECORD, METRICS_RECORD, NUM_EXAMPLES, ROUND_KEY, ROUND_SEED_KEY, SAMPLED_SITES_KEY,
    SECAGG_ACTIVE, SECAGG_BAD_SHARE, SECAGG_CIPHERTEXTS, SECAGG_DEAD, SECAGG_DESTINATIONS, SECAGG_KEYS_ACTION, SECAGG_NODES,
    SECAGG_PK1, SECAGG_PK2, SECAGG_RECORD, SECAGG_SHARES, SECAGG_SHARES_ACTION, SECAGG_SOURCES,
    SECAGG_UNMASK_ACTION, version_stamp,
)
from fedmeta.common.secagg import MOD_RANGE, expand_mask, levels_for, neighbours, threshold
from fedmeta.server.aggregation import Aggregate
from fedmeta.server.coordinator import Coordinator, Drop, InvalidReply, RoundOutcome, content_of, validated_metrics
from fedmeta.server.rounds import Collected, collect

log = logging.getLogger("fedmeta.server")


def secure_training_round(grid: Grid, coordinator: Coordinator, server_round: int, chosen: list[int],
                          round_seed: int) -> tuple[list[Message], RoundOutcome, set[int]]:
    """One training round under SecAgg+; returns every reply received (for byte counts), the outcome, and
    the sites that took part up to the last stage reached (a round abandoned because of one site's wrong
    share must not count as missed by the honest ones)."""
    config = coordinator.config
    exchange = _Exchange(grid, config, server_round)
    outcome = RoundOutcome()
    try:
        _run(exchange, coordinator, server_round, chosen, round_seed, outcome)
    except _RoundAbandoned as err:
        log.warning("round %d: secure aggregation abandoned: %s; θ is left unchanged this round", server_round, err)
        outcome.accepted.clear()
        outcome.aggregation = {"rule": "secagg+", "abandoned": str(err)}
    # Who said whose shares do not decrypt: named in the round record for the operator (`fedmeta revoke-site`).
    # Not acted on: an accusation cannot be verified without revealing secrets, and excluding sites on the word
    # of two colluding ones would let them exclude honest sites and steer θ alone.
    accusations = exchange.accusations()
    if accusations:
        outcome.aggregation = {**(outcome.aggregation or {}),
                               "undecryptable_shares_from": {str(n): sorted(a) for n, a in sorted(accusations.items())}}
        for node, accusers in sorted(accusations.items()):
            log.warning("round %d: nodes %s could not decrypt the shares node %d sent", server_round, sorted(accusers),
                        node)
    outcome.dropped = exchange.drops
    coordinator.counters["dropped_replies"] += len(outcome.dropped)
    if not outcome.updated:
        coordinator.counters["skipped_rounds"] += 1
    return exchange.received, outcome, exchange.last_accepted


def _run(exchange: "_Exchange", coordinator: Coordinator, server_round: int, chosen: list[int], round_seed: int,
         outcome: RoundOutcome) -> None:
    config = coordinator.config
    enough = max(2, config.min_sites)
    exchange.require(len(chosen) * levels_for(config.secagg_levels, len(chosen)) < MOD_RANGE,
                     f"{len(chosen)} sites x secagg-levels={config.secagg_levels} would overflow the 2^32 modulus; "
                     "lower secagg-levels (0 picks the most that fits) or sites-per-round")

    # 1. Public keys.
    keys = exchange.stage(SECAGG_KEYS_ACTION, {n: {} for n in chosen}, _public_keys, "keys")
    # A key shown by two sites (a copy: the copier holds no private key) would make every site refuse the
    # listing; leave out every site that shows it rather than guess which one copied.
    shown: dict[bytes, list[int]] = {}
    for node in sorted(keys):
        for key in keys[node]:
            shown.setdefault(key, []).append(node)
    copied = sorted({n for owners in shown.values() if len(owners) > 1 for n in owners})
    for node in copied:
        del keys[node]
        exchange.drops.append(Drop(node, "secagg keys: shows a public key another site shows too", "invalid"))
        log.warning("secagg keys: dropped node %d: it shows a public key another site shows too", node)
    u1 = sorted(keys)
    exchange.require(len(u1) >= enough, f"{len(u1)} site(s) sent keys, fewer than {enough}")
    pk1 = {n: keys[n][0] for n in u1}
    listing = {SECAGG_NODES: u1, SECAGG_PK1: [keys[n][0] for n in u1], SECAGG_PK2: [keys[n][1] for n in u1]}

    # 2. Encrypted shares, to be routed to their holders.
    def routed(reply: Message, node: int) -> dict[int, bytes]:
        record = _secagg_record(reply)
        destinations, ciphertexts = _ints(record, SECAGG_DESTINATIONS), _blobs(record, SECAGG_CIPHERTEXTS)
        expected = neighbours(u1, node, config.secagg_neighbours)
        if sorted(destinations) != expected or len(ciphertexts) != len(destinations):
            raise InvalidReply("its shares are not addressed to exactly its neighbours")
        return dict(zip(destinations, ciphertexts))

    sent_shares = exchange.stage(SECAGG_SHARES_ACTION, {n: listing for n in u1}, routed, "shares")
    u2 = sorted(sent_shares)
    exchange.require(len(u2) >= enough, f"{len(u2)} site(s) shared their secrets, fewer than {enough}")

    # 3. The train message, each with the shares addressed to it; answered by masked replies.
    exchange.routed = {n: [s for s in u2 if n in sent_shares[s]] for n in u2}  # whose shares reach whom

    def inbox(node: int) -> dict:
        sources = exchange.routed[node]
        return {SECAGG_SOURCES: sources, SECAGG_CIPHERTEXTS: [sent_shares[s][node] for s in sources]}

    extra = {ROUND_SEED_KEY: round_seed, SAMPLED_SITES_KEY: len(chosen)}
    masked = exchange.stage(None, {n: inbox(n) for n in u2}, lambda r, n: _masked(r, coordinator), "train",
                            content=lambda: coordinator.content(server_round, extra))
    u3 = coordinator.in_site_order(masked)
    dead = sorted(set(u2) - set(u3))
    exchange.require(len(u3) >= config.min_sites and len(u3) >= 2,
                     f"{len(u3)} masked repl(ies), fewer than {max(2, config.min_sites)}")
    if config.dp == "local":  # each site's noise was split over this many replies; it unmasks no fewer
        split = local_noise_split(config, len(u1))
        exchange.require(len(u3) >= split, f"{len(u3)} masked repl(ies), fewer than the {split} the sites' "
                                           "local DP noise was split over (the sites would refuse to unmask)")

    # 4. Shares that remove the masks: seeds of those who answered, mask keys of those who vanished.
    def revealed(reply: Message, node: int) -> dict[int, bytes]:
        record = _secagg_record(reply)
        nodes, shares = _ints(record, SECAGG_NODES), _blobs(record, SECAGG_SHARES)
        if len(nodes) != len(shares) or len(set(nodes)) != len(nodes):
            raise InvalidReply("its unmasking shares do not pair one share with each named site")
        # A site holds shares only of itself and of the sites that sent it theirs.
        held = {node, *exchange.routed.get(node, ())}
        if not set(nodes) <= (set(u3) | set(dead)) & held:
            raise InvalidReply("its unmasking shares name sites it holds no share of")
        return dict(zip(nodes, shares))

    unmask = {SECAGG_ACTIVE: u3, SECAGG_DEAD: dead}
    revealed_by = exchange.stage(SECAGG_UNMASK_ACTION, {n: unmask for n in u3}, revealed, "unmask")

    def secret(owner: int) -> bytes:
        return _recovered_secret(exchange, config, u1, sent_shares, revealed_by, owner)

    names = sorted(coordinator.expected)
    total = _unmasked_sum(names, [coordinator.expected[n][0] for n in names], masked, u3, dead, pk1, sent_shares,
                          secret)
    n = len(u3)
    mean = _dequantised_mean(config, names, total, n, len(u1), coordinator.params)
    for node in u3:
        outcome.accepted[node] = masked[node][1]
    combined = Aggregate(mean, "mean", n)
    # The sites split local DP noise over the key listing (u1), never over more: so does the accountant.
    coordinator.step(server_round, len(u1), outcome, combined, u3, [1.0] * n)
    outcome.aggregation = {**combined.record(), "secure": "secagg+", "dropped_after_sharing": len(dead)}


def _recovered_secret(exchange: _Exchange, config: RunConfig, u1: list[int], sent_shares: dict[int, dict[int, bytes]],
                      revealed_by: dict[int, dict[int, bytes]], owner: int) -> bytes:
    """Site ``owner``'s secret from the shares its holders revealed; abandons the round when too few came back
    or they disagree."""
    group = neighbours(u1, owner, config.secagg_neighbours)
    need = threshold(len(group) + 1, config.secagg_threshold)
    holders = {owner} | set(sent_shares.get(owner, {}))  # revealed() already refused any other holder
    held = [shares[owner] for holder, shares in sorted(revealed_by.items()) if owner in shares and holder in holders]
    exchange.require(len(held) >= need, f"only {len(held)} share(s) of site {owner}'s secret came back, "
                                        f"{need} needed (more sites vanished than secagg-threshold tolerates)")
    try:
        recovered = combine_shares(held[:need])
        # A wrong share yields another secret, and masks that no longer cancel: with a spare share,
        # two different subsets must agree, or the round is abandoned rather than θ stepped with garbage.
        agree = len(held) == need or combine_shares(held[-need:]) == recovered
    except Exception:  # noqa: BLE001 - Flower's "Failed to combine shares", or shares a hostile site crafted
        agree = False
    exchange.require(agree, f"the shares of site {owner}'s secret disagree (a site sent a wrong share)")
    return recovered


def _unmasked_sum(names: list[str], shapes: list[tuple[int, ...]], masked: dict, u3: list[int], dead: list[int],
                  pk1: dict[int, bytes], sent_shares: dict[int, dict[int, bytes]],
                  secret: Callable[[int], bytes]) -> list[np.ndarray]:
    """The sum, mod 2^32, of the answering sites' quantised replies: their own masks and the pairwise masks of
    the sites that vanished after sharing removed."""
    total = [np.zeros(shape, dtype=np.int64) for shape in shapes]
    for node in u3:
        total = [(t + masked[node][0][name]) % MOD_RANGE for t, name in zip(total, names)]
        total = [(t - m) % MOD_RANGE for t, m in zip(total, expand_mask(secret(node), shapes))]
    for gone in dead:  # the pairwise masks its neighbours added for it no longer cancel
        try:
            key = bytes_to_private_key(secret(gone))
            if not isinstance(key, ec.EllipticCurvePrivateKey):
                raise ValueError("not an EC key")
            pairwise_keys = {node: generate_shared_key(key, bytes_to_public_key(pk1[node])) for node in u3
                             if node in sent_shares[gone]}
        except _RoundAbandoned:
            raise
        except Exception:  # noqa: BLE001 - shares that combine, but not into a usable key: a hostile site
            raise _RoundAbandoned(f"the shares of site {gone}'s mask key do not form a key (a site sent a wrong "
                                  "share)") from None
        for node, shared in pairwise_keys.items():  # it shared with these sites, so they masked with it
            pairwise = expand_mask(shared, shapes)
            sign = 1 if node > gone else -1
            total = [(t - sign * m) % MOD_RANGE for t, m in zip(total, pairwise)]
    return total


def _dequantised_mean(config: RunConfig, names: list[str], total: list[np.ndarray], n: int, listed: int,
                      params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The mean of ``n`` replies from the sum of their quantised values, in θ's dtypes."""
    # Each quantised value is (x + R) · L / 2R, rounded: the sum of n of them, scaled back, less n·R.
    # The sites quantised with the levels that fit every participant of the key exchange (``listed``, u1).
    scale = 2 * config.secagg_clip_range / levels_for(config.secagg_levels, listed)
    mean = {}
    for name, t in zip(names, total):
        summed = t.astype(np.float64) * scale - n * config.secagg_clip_range
        dtype = params[name].dtype if name in params else torch.float32
        mean[name] = torch.from_numpy(summed / n).to(dtype)
    return mean


class _RoundAbandoned(RuntimeError):
    """Too few sites (or shares) to finish the round securely: no update, never a partial unmasking."""


class _Exchange:
    """One stage at a time: messages out, replies screened, drops recorded with their stage."""

    def __init__(self, grid: Grid, config: RunConfig, server_round: int):
        self.grid, self.config, self.round = grid, config, server_round
        self.drops: list[Drop] = []
        self.received: list[Message] = []
        self.last_accepted: set[int] = set()  # the sites whose reply the latest stage accepted, or that refused it
        self.routed: dict[int, list[int]] = {}  # site -> the senders whose ciphertexts the server routed to it

    def require(self, condition: bool, why: str) -> None:
        if not condition:
            raise _RoundAbandoned(why)

    def stage(self, action: str | None, payloads: dict[int, dict], validate: Callable[[Message, int], object],
              label: str, content: Callable[[], RecordDict] | None = None) -> dict[int, object]:
        messages = []
        for node, payload in sorted(payloads.items()):
            body = content() if content is not None else RecordDict(
                {CONFIG_RECORD: ConfigRecord({ROUND_KEY: self.round, **version_stamp()})})
            body[SECAGG_RECORD] = ConfigRecord(dict(payload))
            kind = MessageType.TRAIN if action is None else f"{MessageType.TRAIN}.{action}"
            messages.append(Message(body, node, kind, ttl=self.config.round_timeout,
                                    group_id=f"{self.round}-secagg-{label}"))
        collected = collect(self.grid, messages, quorum=self.config.quorum(len(messages)),
                            deadline=self.config.round_deadline, timeout=self.config.round_timeout)
        self.received += collected.messages
        accepted = self._screen(list(payloads), collected, validate, label)
        # A site that refused a stage someone else got wrong took part as far as the protocol let it, whichever
        # stage it refused (its refusal keeps it out of the later stages, not out of the round).
        refused = {d.node_id for d in self.drops if d.kind == "secagg-refused"}
        self.last_accepted = set(accepted) | refused
        return accepted

    def accusations(self) -> dict[int, set[int]]:
        """Who could not decrypt whose shares this round: {sender: the sites that said so}, counting only a
        refusal of the train stage naming a sender whose ciphertext the server routed to that site."""
        pattern = re.compile(re.escape(SECAGG_BAD_SHARE).replace(re.escape("{node}"), r"(\d+)"))
        accused: dict[int, set[int]] = {}
        for drop in self.drops:
            if drop.kind != "secagg-refused" or not drop.reason.startswith("secagg train:"):
                continue
            match = pattern.search(drop.reason)
            if match and int(match.group(1)) in self.routed.get(drop.node_id, ()):
                accused.setdefault(int(match.group(1)), set()).add(drop.node_id)
        return accused

    def _screen(self, sent_to: Iterable[int], collected: Collected, validate, label: str) -> dict[int, object]:
        expected, accepted = set(sent_to), {}
        for node, why in sorted(collected.gone.items()):
            self.drops.append(Drop(node, f"secagg {label}: node gone: {why}", "node-gone"))
        for node, reply in collected.replies:
            if node not in expected or node in accepted:
                self.drops.append(Drop(node, f"secagg {label}: unexpected reply", "unexpected"))
                continue
            try:
                accepted[node] = validate(reply, node)
            except InvalidReply as err:
                self.drops.append(Drop(node, f"secagg {label}: {err}", err.kind))
                log.warning("secagg %s: dropped the reply of node %d: %s", label, node, err)
            except Exception as err:  # noqa: BLE001 - malformed bytes from a hostile site: drop, never crash
                self.drops.append(Drop(node, f"secagg {label}: malformed reply ({type(err).__name__})", "invalid"))
        answered = set(accepted) | {d.node_id for d in self.drops}
        for node in sorted(expected - answered):
            self.drops.append(Drop(node, f"secagg {label}: no reply by the stage's deadline", "timeout"))
        return accepted


def _secagg_record(reply: Message) -> ConfigRecord:
    content = content_of(reply, {SECAGG_RECORD})
    record = content.config_records.get(SECAGG_RECORD)
    if record is None:
        raise InvalidReply(f"no ConfigRecord {SECAGG_RECORD!r}")
    return record


_CURVE = ec.SECP384R1()  # the curve of Flower's generate_key_pairs (flwr.supercore.primitives.asymmetric)

# The largest byte string a site may send in one field: an ECDH public key is ~180 bytes, a Shamir share
# of a key ~250, its Fernet ciphertext ~700. Anything far larger is a hostile site's padding.
_MAX_FIELD_BYTES = 4096


def _ints(record: ConfigRecord, key: str) -> list[int]:
    values = record.get(key)
    if not isinstance(values, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise InvalidReply(f"{key!r} is not a list of node ids")
    return [int(v) for v in values]


def _blobs(record: ConfigRecord, key: str) -> list[bytes]:
    values = record.get(key)
    if not isinstance(values, list) or not all(isinstance(v, bytes) and len(v) <= _MAX_FIELD_BYTES for v in values):
        raise InvalidReply(f"{key!r} is not a list of byte strings of at most {_MAX_FIELD_BYTES} bytes")
    return list(values)


def _public_keys(reply: Message, node: int) -> tuple[bytes, bytes]:
    record = _secagg_record(reply)
    pk1, pk2 = record.get(SECAGG_PK1), record.get(SECAGG_PK2)
    if not isinstance(pk1, bytes) or not isinstance(pk2, bytes) or pk1 == pk2:
        raise InvalidReply("its public keys are missing or equal")
    if max(len(pk1), len(pk2)) > _MAX_FIELD_BYTES:
        raise InvalidReply(f"its public keys are longer than {_MAX_FIELD_BYTES} bytes")
    for key in (pk1, pk2):
        # Every site agrees keys with these: one of another curve or type would break every neighbour's
        # key agreement, so only keys of the curve Flower's generate_key_pairs uses get listed.
        try:
            public = bytes_to_public_key(key)
        except Exception:  # noqa: BLE001 - bytes that do not parse as a PEM public key
            raise InvalidReply("its public key does not parse") from None
        if not isinstance(public, ec.EllipticCurvePublicKey) or public.curve.name != _CURVE.name:
            raise InvalidReply(f"its public key is not an EC key on {_CURVE.name}")
    return pk1, pk2


def _masked(reply: Message, coordinator: Coordinator) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    content = content_of(reply, {MASKED_RECORD, METRICS_RECORD})
    record = content.array_records.get(MASKED_RECORD)
    if record is None:
        raise InvalidReply(f"no ArrayRecord {MASKED_RECORD!r}")
    if sorted(record.keys()) != sorted(coordinator.expected):
        raise InvalidReply("masked arrays are not keyed like θ")
    arrays = {}
    for name, (shape, _dtype) in coordinator.expected.items():
        array = record[name].numpy()
        if tuple(array.shape) != shape or array.dtype != np.uint32:
            raise InvalidReply(f"masked {name!r} is {array.dtype}{list(array.shape)}, not uint32{list(shape)}")
        arrays[name] = array.astype(np.int64)
    metrics = validated_metrics(content)
    most = coordinator.config.episodes_per_site * (coordinator.config.k_shot + coordinator.config.q_query)
    if metrics[NUM_EXAMPLES] > most:
        raise InvalidReply(f"{NUM_EXAMPLES} is {metrics[NUM_EXAMPLES]:g}, more than the {most} this round asked for")
    return arrays, metrics


__all__ = ["secure_training_round"]
