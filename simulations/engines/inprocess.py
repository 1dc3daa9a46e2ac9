"""The in-process engine: fedmeta's real ServerApp and ClientApp driven in one process, without Ray.

:class:`InProcessGrid` is a Flower ``Grid`` whose ``pull_messages`` hands each pushed message to the
ClientApp callable with that node's persistent ``Context`` and returns the replies, doing what the
SuperLink and SuperNode would: every message crosses a protobuf round trip (so nothing but what
Flower can serialise gets through), ids and metadata are set as Flower sets them, an exception in
the ClientApp becomes an Error reply, and a reply later than its message's ttl is not delivered.
Tests make nodes join, die or hang mid-run (``add_node``, ``remove_node``, ``hang``). Nodes
run one after another, so a run is deterministic and needs no extra processes.

Flower's ``Message`` constructor reads the sender's identity from ``TaskIdentity``, which only a
Flower process sets; :func:`run_inprocess` sets it the way ``flwr.simulation.run_simulation`` does
for its in-process Python API (the ServerApp runs as the SuperLink's node, task 1).
"""

from __future__ import annotations

import itertools
import logging
import time
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import Context, Error, Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from fedmeta.common.protocol import NUM_PARTITIONS_KEY, PARTITION_ID_KEY

log = logging.getLogger("fedmeta.inprocess")

ClientAppCallable = Callable[[Message, Context], Message]


@dataclass
class InProcessNode:
    node_id: int
    context: Context
    # message ids this node has received, in order; lets tests see who was asked what
    received: list[str] = field(default_factory=list)


class InProcessGrid(Grid):
    """A Grid over ClientApp callables in this process, one node per ``node_configs`` entry.

    Node ids are drawn from ``seed`` like Flower's random 63-bit ids, so their sorted order is not
    the partition order (aggregation code must not rely on it).
    """

    def __init__(
        self,
        client_app: ClientAppCallable,
        node_configs: Sequence[Mapping[str, Any]],
        run_config: Mapping[str, Any],
        *,
        run_id: int = 1,
        seed: int = 0,
    ):
        self.client_app = client_app
        self._run = Run.create_empty(run_id=run_id)
        self._run.override_config = dict(run_config)
        rng = np.random.default_rng(seed)
        ids = [int(x) for x in rng.choice(2**62, size=len(node_configs), replace=False) + 2]
        self._rng = rng  # ids of nodes that join later
        self._run_config = dict(run_config)
        self.hung: set[int] = set()
        self.nodes = {
            node_id: InProcessNode(node_id, Context(run_id, node_id, dict(cfg), RecordDict(), dict(run_config)))
            for node_id, cfg in zip(ids, node_configs)
        }
        self._ids = itertools.count(1)
        self._pending: dict[str, Message] = {}
        self._replies: dict[str, Message] = {}

    # -- Grid API -------------------------------------------------------------------------------

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.nodes)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for message in messages:
            message_id = f"{next(self._ids):032x}"
            message.metadata.__dict__["_message_id"] = message_id  # the SuperLink assigns ids likewise
            self._pending[message_id] = message
            ids.append(message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Delivers the asked-for pending messages (in push order), then returns the replies there are.

        A node handles its messages when the server first asks for their replies, one node after
        another; a reply that took longer than its message's ttl is lost, as it would expire at the
        SuperLink (real nodes work in parallel, so the ttl applies to each node's own time). A
        message for a node that left gets the SuperLink's "node unavailable" error; a hung node's
        messages stay pending.
        """
        wanted = list(message_ids)
        for message_id in sorted((i for i in wanted if i in self._pending), key=lambda i: int(i, 16)):
            message = self._pending[message_id]
            node_id = message.metadata.dst_node_id
            if node_id in self.hung:
                continue
            del self._pending[message_id]
            if node_id not in self.nodes:
                self._replies[message_id] = _superlink_error(message, ErrorCode.NODE_UNAVAILABLE,
                                                             "the destination node stopped sending heartbeats")
                continue
            began = time.perf_counter()
            reply = self._deliver(message)
            ttl = message.metadata.ttl
            if ttl and time.perf_counter() - began > ttl:
                log.warning("node %d replied after its message's %ss ttl; reply discarded", node_id, ttl)
                continue
            self._replies[message_id] = reply
        return [self._replies.pop(i) for i in wanted if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Every node's reply, as Flower's: those later than ``timeout`` seconds (of the node's own time) are lost."""
        messages = list(messages)
        if timeout is not None:
            for message in messages:
                message.metadata.ttl = timeout
        return self.pull_messages(list(self.push_messages(messages)))

    # -- membership changes, as real sites make them ----------------------------------------------

    def add_node(self, node_config: Mapping[str, Any]) -> int:
        """A site that connects during the run; returns its new node id."""
        node_id = int(self._rng.integers(2, 2**62))
        self.nodes[node_id] = InProcessNode(
            node_id, Context(self._run.run_id, node_id, dict(node_config), RecordDict(), dict(self._run_config)))
        return node_id

    def remove_node(self, node_id: int) -> None:
        """A site whose SuperNode died: it leaves the node list; messages to it get "node unavailable"."""
        self.nodes.pop(node_id)
        self.hung.discard(node_id)

    def hang(self, node_id: int, hung: bool = True) -> None:
        """A site that stays connected and never answers (or, with ``hung=False``, answers again)."""
        (self.hung.add if hung else self.hung.discard)(node_id)

    # -- one node handles one message -------------------------------------------------------------

    def _deliver(self, message: Message) -> Message:
        node = self.nodes[message.metadata.dst_node_id]
        node.received.append(message.metadata.message_id)
        delivered = _over_the_wire(message)
        delivered.metadata.delivered_at = str(time.time())
        try:
            reply = self.client_app(delivered, node.context)
        except Exception as err:  # as Flower's workers do: the federation hears an Error, not a crash
            log.error("ClientApp of node %d raised:\n%s", node.node_id, traceback.format_exc())
            reason = f"{type(err)}:<'{err}'>"
            reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=delivered)
        if not isinstance(reply, Message):
            reason = f"ClientApp returned {type(reply).__name__}, not a Message"
            reply = Message(Error(code=ErrorCode.UNKNOWN, reason=reason), reply_to=delivered)
        # The SuperNode overwrites routing fields so a ClientApp cannot impersonate another node.
        meta = reply.metadata.__dict__
        meta["_src_node_id"] = node.node_id
        meta["_dst_node_id"] = message.metadata.src_node_id
        meta["_reply_to_message_id"] = message.metadata.message_id
        meta["_run_id"] = message.metadata.run_id
        meta["_message_id"] = f"{next(self._ids):032x}"
        return _over_the_wire(reply)


def _superlink_error(message: Message, code: int, reason: str) -> Message:
    """The error the SuperLink stores in place of a reply that will not come (sender: the SuperLink)."""
    reply = Message(Error(code=code, reason=reason), reply_to=message)
    meta = reply.metadata.__dict__
    meta["_src_node_id"] = SUPERLINK_NODE_ID
    meta["_dst_node_id"] = SUPERLINK_NODE_ID
    meta["_reply_to_message_id"] = message.metadata.message_id
    return reply


def _over_the_wire(message: Message) -> Message:
    """A protobuf round trip: the receiver gets a copy holding only what Flower can transport."""
    return message_from_proto(message_to_proto(message))


@dataclass
class InProcessRun:
    grid: InProcessGrid
    seconds: float


def run_inprocess(
    run_config: Mapping[str, Any],
    node_configs: Sequence[Mapping[str, Any]],
    *,
    server_app: Callable[[Grid, Context], None] | None = None,
    client_app: ClientAppCallable | None = None,
    seed: int = 0,
    grid_class: type[InProcessGrid] | None = None,
) -> InProcessRun:
    """Runs a whole federation in this process: fedmeta's ServerApp against one ClientApp per node.

    ``run_config`` is the full kebab-case run config (defaults plus overrides, as Flower would merge
    them); ``node_configs`` one mapping per node (``partition-id`` in simulation, ``data-dir``
    deployed). ``server_app``/``client_app`` default to fedmeta's own ``app`` objects; tests pass
    wrappers around those to inject faults or audit messages, and ``grid_class`` a subclass that
    makes sites join, die or hang mid-run.
    """
    # fedmeta's own apps, loaded (with the server's or the client's modules) only when no other is given.
    if server_app is None:
        from fedmeta.server.app import app as server_app
    if client_app is None:
        from fedmeta.client.app import app as client_app
    grid = (grid_class or InProcessGrid)(client_app, node_configs, run_config, seed=seed)
    TaskIdentity.task_id = 1
    TaskIdentity.run_id = grid.run.run_id
    TaskIdentity.node_id = SUPERLINK_NODE_ID
    server_context = Context(grid.run.run_id, SUPERLINK_NODE_ID, {}, RecordDict(), dict(run_config))
    began = time.perf_counter()
    server_app(grid, server_context)
    return InProcessRun(grid=grid, seconds=time.perf_counter() - began)


def simulation_node_configs(num_sites: int) -> list[dict[str, int]]:
    """What Flower's Simulation Engine gives its nodes: a partition id and the partition count."""
    return [{PARTITION_ID_KEY: i, NUM_PARTITIONS_KEY: num_sites} for i in range(num_sites)]


__all__ = ["InProcessGrid", "InProcessNode", "InProcessRun", "run_inprocess", "simulation_node_configs"]
