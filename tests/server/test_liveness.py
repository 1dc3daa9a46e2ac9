"""Rounds that survive real sites, on the in-process engine: hung, dead, late and returning sites.

The SuperLink's behaviour is emulated by ``InProcessGrid`` (a dead node leaves the node list and its
messages get "node unavailable"; a hung one stays listed and never answers). The same round loop on
a real loopback deployment: tests/end_to_end/test_deployment.py and ``python -m fedmeta.simulations.perf.liveness``.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from fedmeta.common.synth import load_manifest
from fedmeta.server.metrics import METRICS_NAME, read_metrics
from fedmeta.simulations.engines.inprocess import InProcessGrid, run_inprocess, simulation_node_configs
from tests.simulations.test_inprocess import partition_of, tiny_config


class EventfulGrid(InProcessGrid):
    """Runs ``events[(round, kind)](grid)`` when the server pushes that round's train or evaluate messages."""

    events: dict[tuple[int, str], Callable[[InProcessGrid], None]] = {}

    def push_messages(self, messages):
        messages = list(messages)
        ids = super().push_messages(messages)
        if messages:
            group = messages[0].metadata.group_id
            kind = "evaluate" if group.startswith("eval-") else "train" if group.isdigit() else "query"
            server_round = int(group.removeprefix("eval-")) if kind != "query" else -1
            event = self.events.pop((server_round, kind), None)
            if event is not None:
                event(self)
        return ids


def node_of(grid: InProcessGrid, partition: int) -> int:
    return next(n for n in grid.nodes if partition_of(grid, n) == partition)


def run(federation, out_dir, events, *, partitions=None, **changes):
    manifest = load_manifest(federation)
    total = len(manifest.train_sites) + len(manifest.heldout_sites)
    configs = simulation_node_configs(total)
    if partitions is not None:
        configs = [configs[p] for p in partitions]
    grid_class = type("Grid", (EventfulGrid,), {"events": dict(events)})
    config = tiny_config(federation, out_dir, **changes)
    result = run_inprocess(config.to_run_config(), configs, grid_class=grid_class)
    return result.grid, {r["round"]: r for r in read_metrics(out_dir / METRICS_NAME)}


def test_a_hung_site_costs_the_round_deadline_not_the_round_timeout(smoke_federation, tmp_path):
    hang = {(1, "train"): lambda grid: grid.hang(node_of(grid, 0))}
    grid, records = run(smoke_federation, tmp_path, hang, num_rounds=2, round_deadline=0.5, round_timeout=60.0,
                        round_quorum=0.5, max_missed_rounds=0)
    for server_round in (1, 2):
        record = records[server_round]
        # Closed by the deadline (0.5 s), not the 60 s timeout: the round record says which, no clock needed.
        assert record["updated"] and record["closed_by"] == "deadline", record
        (drop,) = record["dropped"]
        assert drop["kind"] == "timeout" and "round-deadline=0.5s" in drop["reason"]
        assert partition_of(grid, drop["node_id"]) == 0


def test_without_a_quorum_the_round_waits_until_round_timeout(smoke_federation, tmp_path):
    n_train = len(load_manifest(smoke_federation).train_sites)
    hang = {(1, "train"): lambda grid: grid.hang(node_of(grid, 0))}
    # The honest sites must answer within the timeout on a loaded 2-core machine too (their first round loads data).
    _grid, records = run(smoke_federation, tmp_path, hang, num_rounds=1, round_deadline=0.2, round_timeout=8.0,
                         round_quorum=n_train)  # every sampled site is needed: the deadline cannot close it
    record = records[1]
    assert record["closed_by"] == "timeout" and record["seconds"] >= 8.0
    assert record["dropped"][0]["reason"] == "no reply before round-timeout=8s"


def test_a_site_that_dies_is_named_gone_and_is_not_sampled_again(smoke_federation, tmp_path):
    n_train = len(load_manifest(smoke_federation).train_sites)
    dead: list[int] = []

    def die(grid):
        dead.append(node_of(grid, 1))
        grid.remove_node(dead[0])

    grid, records = run(smoke_federation, tmp_path, {(2, "train"): die}, num_rounds=3, round_deadline=30.0)
    assert records[1]["sites_sampled"] == n_train and records[1]["dropped"] == []
    (drop,) = records[2]["dropped"]
    assert drop["node_id"] == dead[0] and drop["kind"] == "node-gone" and drop["reason"].startswith("node gone")
    assert records[2]["updated"] and records[2]["closed_by"] == "all"
    assert records[3]["sites_sampled"] == n_train - 1 and records[3]["dropped"] == []


def test_sites_that_connect_late_join_training_and_evaluation(smoke_federation, tmp_path):
    manifest = load_manifest(smoke_federation)
    n_train, n_heldout = len(manifest.train_sites), len(manifest.heldout_sites)
    total = n_train + n_heldout
    late_train, late_heldout = n_train - 1, total - 1
    joined: dict[str, int] = {}

    def join(partition: int, name: str):
        def event(grid):
            joined[name] = grid.add_node({"partition-id": partition, "num-partitions": total})
        return event

    early = [p for p in range(total) if p not in (late_train, late_heldout)]
    grid, records = run(smoke_federation, tmp_path,
                        {(2, "train"): join(late_train, "train"), (1, "train"): join(late_heldout, "heldout")},
                        partitions=early, num_rounds=4, eval_every=2)
    assert records[1]["sites_sampled"] == records[2]["sites_sampled"] == n_train - 1
    assert records[3]["sites_sampled"] == n_train and records[3]["sites_answered"] == n_train
    assert str(joined["train"]) not in records[2].get("heldout", {}).get("sites", {})
    assert len(records[0]["heldout"]["sites"]) == n_heldout - 1
    assert str(joined["heldout"]) in records[2]["heldout"]["sites"]  # joined in round 1, evaluated at round 2
    assert partition_of(grid, joined["train"]) == late_train


def test_a_site_that_misses_rounds_is_benched_then_probed_back(smoke_federation, tmp_path, caplog):
    n_train = len(load_manifest(smoke_federation).train_sites)
    hung: list[int] = []

    def hang(grid):
        hung.append(node_of(grid, 0))
        grid.hang(hung[0])

    events = {(1, "train"): hang, (3, "train"): lambda grid: grid.hang(hung[0], False)}
    _grid, records = run(smoke_federation, tmp_path, events, num_rounds=5, round_deadline=0.3, max_missed_rounds=2)
    assert [len(records[r]["dropped"]) for r in (1, 2)] == [1, 1]
    assert records[3]["sites_sampled"] == n_train - 1 and records[3]["benched"] == [hung[0]]
    # Round 3's probe reaches it once it answers again: sampled again from round 4.
    assert records[4]["sites_sampled"] == n_train and "benched" not in records[4]
    assert records[5]["sites_answered"] == n_train
    # Its replies to rounds 1 and 2 arrived after those rounds closed: the operator is told why they were lost.
    assert any("answered round 1" in r.message and "raise round-deadline" in r.message for r in caplog.records)


def test_the_run_starts_only_with_min_sites_training_sites(smoke_federation, tmp_path):
    n_train = len(load_manifest(smoke_federation).train_sites)
    with pytest.raises(RuntimeError, match=rf"{n_train} training site\(s\).*fewer than min-sites={n_train + 1}"):
        run(smoke_federation, tmp_path, {}, num_rounds=1, min_sites=n_train + 1)


def test_a_site_that_never_answers_the_role_query_delays_the_start_by_the_deadline_only(smoke_federation, tmp_path):
    n_train = len(load_manifest(smoke_federation).train_sites)
    hang = {(-1, "query"): lambda grid: grid.hang(node_of(grid, 0))}
    # round-timeout is far beyond anything a loaded machine adds, so the bound below separates "waited for the
    # deadline" from "waited for the timeout" without being a timing window.
    began = time.monotonic()
    _grid, records = run(smoke_federation, tmp_path, hang, num_rounds=1, round_deadline=1.0, round_timeout=900.0)
    assert time.monotonic() - began < 450
    assert records[1]["sites_sampled"] == n_train - 1 and records[1]["dropped"] == []


def test_fewer_than_min_sites_left_mid_run_stops_the_run_with_theta_checkpointed(smoke_federation, tmp_path):
    from fedmeta.common.checkpoint import CHECKPOINT_NAME, load_checkpoint

    n_train = len(load_manifest(smoke_federation).train_sites)
    with pytest.raises(RuntimeError, match=rf"{n_train - 1} training site\(s\) available.*min-sites={n_train}.*resume=true"):
        run(smoke_federation, tmp_path, {(2, "train"): lambda grid: grid.remove_node(node_of(grid, 0))},
            num_rounds=4, min_sites=n_train, node_wait_timeout=0.5)
    assert load_checkpoint(tmp_path / CHECKPOINT_NAME).round == 2  # round 2 ran (without an update), then it stopped


def test_a_site_whose_role_query_failed_once_is_asked_again(smoke_federation, tmp_path):
    from fedmeta.client.app import app as client_app

    n_train = len(load_manifest(smoke_federation).train_sites)
    failed = []

    def flaky(message, context):
        if message.metadata.message_type == "query" and context.node_config["partition-id"] == 0 and not failed:
            failed.append(True)
            raise OSError("the data volume is not mounted yet")
        return client_app(message, context)

    manifest = load_manifest(smoke_federation)
    total = len(manifest.train_sites) + len(manifest.heldout_sites)
    config = tiny_config(smoke_federation, tmp_path, num_rounds=4, round_deadline=0.01)
    run_inprocess(config.to_run_config(), simulation_node_configs(total), client_app=flaky, grid_class=EventfulGrid)
    records = {r["round"]: r for r in read_metrics(tmp_path / METRICS_NAME)}
    assert failed and records[1]["sites_sampled"] == n_train - 1
    assert records[4]["sites_sampled"] == records[4]["sites_answered"] == n_train, records[4]
    assert len(failed) == 1  # the one failure did not shut the node out: asked again, it trains
