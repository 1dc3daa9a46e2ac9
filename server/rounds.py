"""Rounds that survive real sites: who is in the federation now, and replies collected against a deadline.

Flower's ``Grid.send_and_receive`` waits for every reply or the full timeout, and hands back the
SuperLink's "node unavailable" errors under the SuperLink's own node id, so a dead site reads as "a
reply from a node this round did not ask". Here the ServerApp pushes and pulls itself:

* :func:`collect` maps each reply to the node it was asked of through the message it answers
  (``reply_to_message_id``), stops waiting for a node the SuperLink no longer lists as online, and
  closes the round when every node answered, or at ``round-deadline`` once a quorum answered, or at
  ``round-timeout`` whatever happened. Messages carry ``ttl = round-timeout``, so a site that wakes
  up later does not train on a round long gone.
* :class:`Membership` re-reads the SuperLink's node list every round: a node that connects late (or
  comes back after a restart) is asked its role and joins the next round; a
  node that left is no longer sampled; a site that missed ``max-missed-rounds`` rounds in a row is
  benched and probed with the (cheap, data-free) role query each round until it answers again.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid

from fedmeta.common.config import RunConfig
from fedmeta.common.protocol import (
    CONFIG_RECORD, METRICS_RECORD, PROTOCOL_VERSION, PROTOCOL_VERSION_KEY, ROLE_HELDOUT, ROLE_METRIC, ROLE_TRAIN,
    ROUND_KEY, SITE_KEY_METRIC, version_stamp,
)

log = logging.getLogger("fedmeta.server")

POLL_S = 0.25  # between pulls: replies are small to ask for, and a round should close soon after its last one
ONLINE_EVERY_S = 2.0  # between reads of the SuperLink's node list while a round waits

# Errors the SuperLink (not the site) puts in place of a reply.
_NODE_GONE = {ErrorCode.NODE_UNAVAILABLE: "the SuperLink reports the node unavailable (no heartbeat)"}
_EXPIRED = {ErrorCode.MESSAGE_UNAVAILABLE: "the message expired or was removed before the site replied",
            ErrorCode.REPLY_MESSAGE_UNAVAILABLE: "the reply expired before the server pulled it"}


@dataclass
class Collected:
    """What came back for one batch of messages, each reply attributed to the node it was sent to."""

    replies: list[tuple[int, Message]] = field(default_factory=list)  # arrival order
    gone: dict[int, str] = field(default_factory=dict)  # node -> what happened to it
    closed_by: str = "all"  # all | deadline | timeout
    outstanding: dict[str, int] = field(default_factory=dict)  # message id -> node, unanswered at the close

    @classmethod
    def by_sender(cls, replies: Iterable[Message]) -> Collected:
        """Replies gathered some other way (``send_and_receive``, tests), each credited to its sender."""
        return cls(replies=[(int(reply.metadata.src_node_id), reply) for reply in replies], closed_by="timeout")

    @property
    def messages(self) -> list[Message]:
        return [reply for _node, reply in self.replies]


def collect(
    grid: Grid,
    messages: Sequence[Message],
    *,
    quorum: int,
    deadline: float,
    timeout: float,
    counts: Callable[[Message], bool] = lambda reply: not reply.has_error(),
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> Collected:
    """Pushes ``messages`` and pulls their replies until every node answered, or the round closes.

    The round closes at ``deadline`` seconds once ``quorum`` replies that ``counts`` accepts are in,
    and at ``timeout`` seconds in any case. A node the SuperLink stops listing as online, or reports
    unavailable, is not waited for.
    """
    began = clock()
    result = Collected()
    pending: dict[str, int] = {}
    ids = list(grid.push_messages(messages))
    for message, message_id in zip(messages, ids + [None] * (len(messages) - len(ids))):
        node_id = int(message.metadata.dst_node_id)
        if message_id:
            pending[str(message_id)] = node_id
        else:
            result.gone[node_id] = "the SuperLink did not accept a message for it (not connected)"
    answered = 0
    last_online_check = began
    while pending:
        for reply in grid.pull_messages(list(pending)):
            node_id = pending.pop(reply.metadata.reply_to_message_id, None)
            if node_id is None:
                continue  # not one this batch waits for
            if reply.has_error() and reply.error.code in _NODE_GONE:
                result.gone[node_id] = _NODE_GONE[reply.error.code]
                continue
            if reply.has_error() and reply.error.code in _EXPIRED:
                log.warning("node %d: %s", node_id, _EXPIRED[reply.error.code])
                continue
            if int(reply.metadata.src_node_id) != node_id:  # the SuperLink refuses this; never credit it anyway
                log.error("a reply to node %d's message came from node %d; ignored", node_id,
                          int(reply.metadata.src_node_id))
                continue
            result.replies.append((node_id, reply))
            answered += counts(reply)
        if not pending:
            break
        now = clock()
        if now - last_online_check >= ONLINE_EVERY_S:
            last_online_check = now
            online = {int(n) for n in grid.get_node_ids()}
            for message_id, node_id in list(pending.items()):
                if node_id not in online:
                    result.gone[node_id] = "it left the federation (the SuperLink no longer lists it online)"
                    del pending[message_id]
            if not pending:
                break
        elapsed = now - began
        if elapsed >= timeout:
            result.closed_by = "timeout"
            break
        if elapsed >= deadline and answered >= quorum:
            result.closed_by = "deadline"
            break
        sleep(POLL_S)
    result.outstanding = dict(pending)
    return result


@dataclass
class Site:
    """A node that answered the role query."""

    role: str  # ROLE_TRAIN | ROLE_HELDOUT
    key: int  # the site's stable order key: node ids are random per connection, keys are not
    missed: int = 0  # rounds missed in a row (no valid reply)


class Membership:
    """The federation as it is now: nodes online, their roles, and which sites are benched."""

    def __init__(self, config: RunConfig):
        self.config = config
        self.sites: dict[int, Site] = {}
        # Nodes whose role answer was unusable -> (when to ask again, the problem). An error can pass (data not
        # mounted yet), and in Flower 1.41 a restarted SuperNode keeps its node id (one per registered key), so
        # no node is shut out for good: a failed query is asked again after round-deadline, an unusable answer
        # (another protocol, malformed fields) after 5 x round-deadline.
        self.refused: dict[int, tuple[float, str]] = {}
        self._asked: dict[str, tuple[int, float]] = {}  # role-query message id -> (node, when asked)
        self._late: dict[str, tuple[int, str, float]] = {}  # message id -> (node, what it was, when the round closed)
        self._clock = time.monotonic

    # -- who may take part ------------------------------------------------------------------------

    def training(self) -> list[int]:
        """Training nodes that may be sampled now, in site order."""
        return self._ordered(ROLE_TRAIN, benched=False)

    def heldout(self) -> list[int]:
        return self._ordered(ROLE_HELDOUT, benched=False)

    def benched(self) -> list[int]:
        return sorted(n for n, s in self.sites.items() if self._is_benched(s))

    def asking(self) -> bool:
        """Whether role queries are still out (a node that connected may yet become a site)."""
        return bool(self._asked)

    # -- keeping up with the SuperLink ----------------------------------------------------------

    def refresh(self, grid: Grid) -> None:
        """Forgets nodes that left, asks new (and benched) nodes their role, takes in the answers."""
        online = {int(n) for n in grid.get_node_ids()}
        for node_id in sorted(set(self.sites) - online):
            site = self.sites.pop(node_id)
            log.warning("node %d (%s site, key %d) left the federation; it is no longer sampled",
                        node_id, site.role, site.key)
        self.refused = {n: r for n, r in self.refused.items() if n in online}
        now = self._clock()
        for message_id, (node_id, asked_at) in list(self._asked.items()):
            if node_id not in online or now - asked_at > self.config.round_timeout:
                del self._asked[message_id]  # gone, or never answered: ask again if it is still there
        waiting = {node_id for node_id, _ in self._asked.values()}
        to_ask = [n for n in sorted(online)
                  if n not in waiting and (n not in self.refused or now >= self.refused[n][0])
                  and (n not in self.sites or self._is_benched(self.sites[n]))]
        if to_ask:
            query = RecordDict({CONFIG_RECORD: ConfigRecord({ROUND_KEY: 0, **version_stamp()})})
            messages = [Message(query, n, MessageType.QUERY, ttl=self.config.round_timeout, group_id="roles")
                        for n in to_ask]
            for node_id, message_id in zip(to_ask, grid.push_messages(messages)):
                if message_id:
                    self._asked[str(message_id)] = (node_id, now)
        if self._asked:
            for reply in grid.pull_messages(list(self._asked)):
                asked = self._asked.pop(reply.metadata.reply_to_message_id, None)
                if asked is not None:
                    self._admit(asked[0], reply)
        self._take_late_replies(grid, now)

    def expect_late(self, collected: Collected, what: str) -> None:
        """Keeps listening for the replies a closed round did not wait for (until their ttl ends)."""
        closed = self._clock()
        for message_id, node_id in collected.outstanding.items():
            self._late[message_id] = (node_id, what, closed)

    def _take_late_replies(self, grid: Grid, now: float) -> None:
        """A reply after the round closed: the site is alive but slower than round-deadline. It is not
        a missed round (the site is not benched), and the operator learns what to change."""
        for message_id, (_node, _what, closed) in list(self._late.items()):
            if now - closed > self.config.round_timeout:
                del self._late[message_id]  # its ttl ran out: no reply will come
        if not self._late:
            return
        for reply in grid.pull_messages(list(self._late)):
            late = self._late.pop(reply.metadata.reply_to_message_id, None)
            if late is None or (reply.has_error() and reply.error.code in (*_NODE_GONE, *_EXPIRED)):
                continue
            node_id, what, closed = late
            if reply.has_error():  # it failed after the round closed: a site failure, not a slow site
                log.warning("node %d failed %s after the round had closed: %s", node_id, what,
                            str(reply.error.reason)[:200])
                continue
            site = self.sites.get(node_id)
            if site is not None:
                site.missed = 0
            log.warning("node %d answered %s %.0f s after the round had closed: its rounds take longer than "
                        "round-deadline=%gs, so its work is lost; raise round-deadline above its round time",
                        node_id, what, now - closed, self.config.round_deadline)

    def record(self, asked: Iterable[int], answered: Iterable[int]) -> None:
        """Counts the rounds each asked site missed in a row; benches a site at max-missed-rounds."""
        answered = set(answered)
        for node_id in asked:
            site = self.sites.get(node_id)
            if site is None:
                continue
            if node_id in answered:
                site.missed = 0
                continue
            site.missed += 1
            if self._is_benched(site) and site.missed == self.config.max_missed_rounds:
                log.warning("node %d (site key %d) missed %d rounds in a row; left out until it answers again",
                            node_id, site.key, site.missed)

    # -- internals ------------------------------------------------------------------------------

    def _is_benched(self, site: Site) -> bool:
        return self.config.max_missed_rounds > 0 and site.missed >= self.config.max_missed_rounds

    def _ordered(self, role: str, *, benched: bool) -> list[int]:
        nodes = [n for n, s in self.sites.items() if s.role == role and self._is_benched(s) == benched]
        return sorted(nodes, key=lambda n: (self.sites[n].key, n))

    def _admit(self, node_id: int, reply: Message) -> None:
        problem, lasting, role, key = _role_of(reply)
        if problem:
            earlier = self.refused.get(node_id)
            if earlier is None or earlier[1] != problem:  # each new problem once, not every retry
                log.warning("node %d %s; leaving it out until it answers the role query usably", node_id, problem)
            wait = self.config.round_deadline * (5 if lasting else 1)
            self.refused[node_id] = (self._clock() + wait, problem)
            self.sites.pop(node_id, None)
            return
        if self.refused.pop(node_id, None) is not None:
            log.info("node %d now answers the role query", node_id)
        known = self.sites.get(node_id)
        if known is not None and self._is_benched(known):
            log.info("node %d (site key %d) answers again; it is sampled again", node_id, key)
        elif known is None:
            log.info("node %d joined as a %s site (key %d)", node_id, role, key)
        elif known.role != role:
            log.info("node %d is now a %s site (was %s)", node_id, role, known.role)
        self.sites[node_id] = Site(role, key)


def _role_of(reply: Message) -> tuple[str, bool, str, int]:
    """(problem, whether it lasts, role, site key) from a role-query reply; ``problem`` is empty for a usable one.

    An error reply may pass (the site's data not mounted yet); another protocol version or malformed
    fields last until the site is changed.
    """
    if reply.has_error():
        return f"did not answer the role query ({str(reply.error.reason)[:200]})", False, "", 0
    if not reply.has_content() or METRICS_RECORD not in reply.content.metric_records:
        return "did not answer the role query (no metrics in the reply)", True, "", 0
    metrics = reply.content.metric_records[METRICS_RECORD]
    version = metrics.get(PROTOCOL_VERSION_KEY)
    if version != PROTOCOL_VERSION:
        return (f"speaks fedmeta protocol {version!r}, this server {PROTOCOL_VERSION} (install the same fedmeta "
                "release at the site and the server)"), True, "", 0
    flag = metrics.get(ROLE_METRIC)
    if flag not in (0, 1):
        return f"sent role flag {flag!r}", True, "", 0
    key = metrics.get(SITE_KEY_METRIC, 0)
    if isinstance(key, bool) or not isinstance(key, (int, float)) or not math.isfinite(key) or key != int(key):
        return f"sent site key {key!r}, not a whole number", True, "", 0
    return "", False, ROLE_HELDOUT if flag == 1 else ROLE_TRAIN, int(key)


def wait_for_training_sites(grid: Grid, membership: Membership, config: RunConfig, *, settle: bool = False,
                            clock: Callable[[], float] = time.monotonic,
                            sleep: Callable[[float], None] = time.sleep) -> list[int]:
    """The training sites that may be sampled now, once there are ``min-sites`` of them (held-out sites
    and benched ones do not count); at the start of a run and before every round.

    Waits up to ``node-wait-timeout`` for sites to connect (or come back), and while role queries or
    probes are out up to ``round-timeout`` more; then fails with the counts, because rounds below
    min-sites cannot update θ (θ is checkpointed after every round, so the run resumes later).
    ``settle`` (the start): once min-sites is reached, the nodes already asked still get up to
    ``round-deadline`` to answer, so that every site connected at the start is in round 1 (in a
    simulation all are, whatever the order their answers arrive in: the sampling repeats run after run).
    """
    began = clock()
    settle_s = min(config.round_deadline, config.round_timeout) if settle else 0.0
    warned = settle
    while True:
        membership.refresh(grid)
        nodes = membership.training()
        waited = clock() - began
        if len(nodes) >= config.min_sites:
            if waited >= settle_s or not membership.asking():
                return nodes
        else:
            if not warned:
                warned = True
                log.warning("%d training site(s) available, fewer than min-sites=%d (others left, or are benched "
                            "after missing rounds); waiting up to node-wait-timeout=%gs", len(nodes),
                            config.min_sites, config.node_wait_timeout)
            if waited >= config.node_wait_timeout and (
                    not membership.asking() or waited >= config.node_wait_timeout + config.round_timeout):
                break
        sleep(POLL_S)
    raise RuntimeError(
        f"{len(nodes)} training site(s) available (answered the role query, not benched) after node-wait-timeout="
        f"{config.node_wait_timeout:g}s, fewer than min-sites={config.min_sites} ({len(membership.heldout())} "
        f"held-out site(s), which never train; {len(membership.benched())} benched after missing rounds; "
        f"{len(membership.refused)} node(s) connected but failed or refused the role query, see the warnings "
        "above). Start more training sites, lower min-sites or raise node-wait-timeout; θ is checkpointed after "
        "every round, so a run stopped mid-way resumes with resume=true."
    )


__all__ = ["Collected", "Membership", "Site", "collect", "wait_for_training_sites"]
