"""Component tests: fedmeta's real ServerApp and ClientApp on the smoke federation, in one process.

Each run is a real federation (query, train, evaluate messages through protobuf) on a tiny model, so
a test takes seconds: learning, bitwise resume, and the faults a federation must survive.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from flwr.app import Array, Context, Message

from fedmeta.client.app import app as client_app
from fedmeta.common.config import RunConfig
from fedmeta.common.checkpoint import CHECKPOINT_NAME, load_checkpoint
from fedmeta.server.metrics import METRICS_NAME, read_metrics
from fedmeta.simulations.engines.inprocess import InProcessGrid, run_inprocess, simulation_node_configs

TINY = dict(
    image_size=32, model_base_channels=8, model_levels=3, episodes_per_site=1, k_shot=2, q_query=2,
    inner_lr=0.1, meta_lr=0.01, eval_k_shot=2, eval_steps="0,3", eval_every=0, round_timeout=120.0,
    node_wait_timeout=0.0,
)


def tiny_config(federation, out_dir, **changes) -> RunConfig:
    return RunConfig(**{**TINY, "out_dir": str(out_dir), "federation_dir": str(federation), **changes})


def num_sites(federation) -> int:
    from fedmeta.common.synth import load_manifest

    manifest = load_manifest(federation)
    return len(manifest.train_sites) + len(manifest.heldout_sites)


def federate(config: RunConfig, federation, client=client_app):
    return run_inprocess(config.to_run_config(), simulation_node_configs(num_sites(federation)), client_app=client)


def partition_of(grid: InProcessGrid, node_id: int) -> int:
    return int(grid.nodes[node_id].context.node_config["partition-id"])


def test_meta_loss_falls_and_heldout_dice_rises(smoke_federation, tmp_path):
    config = tiny_config(smoke_federation, tmp_path, num_rounds=6, eval_every=6)
    federate(config, smoke_federation)
    records = read_metrics(tmp_path / METRICS_NAME)
    assert [r["round"] for r in records] == list(range(0, 7))
    train = [r for r in records if r["round"] > 0]
    assert all(r["updated"] and r["sites_answered"] == r["sites_sampled"] for r in train)
    losses = [r["train"]["query-loss-after"] for r in train]
    assert np.mean(losses[-2:]) < np.mean(losses[:2]), losses
    before, after = records[0]["heldout"]["summary"], records[-1]["heldout"]["summary"]
    assert records[-1]["heldout"]["sites_answered"] == len(records[-1]["heldout"]["sites"]) >= 1
    # Six tiny rounds: θ as it is already scores better on the new sites than the random start did
    # (after 3 adaptation steps the two are within noise of each other at this size).
    assert after["dice-mean-0"] > before["dice-mean-0"], (before, after)
    assert all(0.0 <= after[f"dice-mean-{s}"] <= 1.0 for s in (0, 3))
    checkpoint = load_checkpoint(tmp_path / CHECKPOINT_NAME)
    assert checkpoint.round == 6 and checkpoint.counters["dropped_replies"] == 0


@pytest.mark.parametrize("algorithm", ["fomaml", "metasgd", "lstm-optimizer"])
def test_a_stopped_and_resumed_run_ends_bitwise_equal_to_an_uninterrupted_one(smoke_federation, tmp_path, algorithm):
    whole = tiny_config(smoke_federation, tmp_path / "whole", num_rounds=3, sites_per_round=2, algorithm=algorithm)
    federate(whole, smoke_federation)
    parted = tiny_config(smoke_federation, tmp_path / "parted", num_rounds=1, sites_per_round=2, algorithm=algorithm)
    federate(parted, smoke_federation)
    assert load_checkpoint(tmp_path / "parted" / CHECKPOINT_NAME).round == 1
    # A crash after round 2's metrics line but before its checkpoint: resuming must drop that line.
    with (tmp_path / "parted" / METRICS_NAME).open("a") as handle:
        handle.write('{"round": 2, "sites_sampled": 2}\n')
    federate(parted.replace(num_rounds=3, resume=True), smoke_federation)

    a = load_checkpoint(tmp_path / "whole" / CHECKPOINT_NAME)
    b = load_checkpoint(tmp_path / "parted" / CHECKPOINT_NAME)
    assert a.round == b.round == 3
    for name in a.params:
        assert torch.equal(a.params[name], b.params[name]), name
    for index, state in a.optimizer["optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.equal(value, b.optimizer["optimizer"]["state"][index][key]), (index, key)
    assert a.rng_state == b.rng_state
    if algorithm == "metasgd":
        assert a.step_sizes and all(torch.equal(a.step_sizes[n], b.step_sizes[n]) for n in a.step_sizes)
    records = read_metrics(tmp_path / "parted" / METRICS_NAME)
    assert [r["round"] for r in records] == [1, 2, 3]
    assert all("sites_answered" in r for r in records)  # the crashed run's stray line is gone


def test_resuming_under_a_changed_config_is_refused(smoke_federation, tmp_path):
    config = tiny_config(smoke_federation, tmp_path, num_rounds=1)
    federate(config, smoke_federation)
    with pytest.raises(ValueError, match="different run config.*inner-lr"):
        federate(config.replace(num_rounds=2, resume=True, inner_lr=0.3), smoke_federation)


SLOW_SITE_SECONDS = 8.0  # the "slow" fault's delay, beyond the round timeout its test sets


class FaultySites:
    """Wraps the real ClientApp and spoils the train replies of chosen partitions."""

    def __init__(self, fault: str, partitions: set[int]):
        self.fault, self.partitions, self.grid = fault, partitions, None
        self.spoiled = 0

    def __call__(self, message: Message, context: Context) -> Message:
        hit = message.metadata.message_type == "train" and context.node_config["partition-id"] in self.partitions
        if hit and self.fault == "raise":
            self.spoiled += 1
            raise RuntimeError("the site's GPU fell off the bus")
        if hit and self.fault == "slow":
            self.spoiled += 1
            time.sleep(SLOW_SITE_SECONDS)
        reply = client_app(message, context)
        if hit and self.fault == "corrupt":
            self.spoiled += 1
            grads = reply.content.array_records["meta-grads"]
            name = sorted(grads)[0]
            bad = grads[name].numpy().copy()
            bad.flat[0] = np.nan
            grads[name] = Array(bad)
        return reply


@pytest.mark.parametrize(
    "fault, reason",
    [
        ("corrupt", "NaN or Inf"),
        ("raise", "site failed (error code 2)"),
    ],
)
def test_a_bad_site_is_dropped_counted_and_the_federation_goes_on(smoke_federation, tmp_path, fault, reason):
    faulty = FaultySites(fault, partitions={0})
    config = tiny_config(smoke_federation, tmp_path, num_rounds=2)
    run = federate(config, smoke_federation, client=faulty)
    assert faulty.spoiled == 2
    records = read_metrics(tmp_path / METRICS_NAME)
    for record in records:
        assert record["updated"]
        assert record["sites_answered"] == record["sites_sampled"] - 1
        (drop,) = record["dropped"]
        assert partition_of(run.grid, drop["node_id"]) == 0
        assert reason in drop["reason"]
    assert load_checkpoint(tmp_path / CHECKPOINT_NAME).counters["dropped_replies"] == 2


def test_a_site_slower_than_the_round_timeout_is_dropped(smoke_federation, tmp_path):
    from fedmeta.common.synth import load_manifest

    last_train = len(load_manifest(smoke_federation).train_sites) - 1
    # Honest sites must answer within the timeout on a loaded 2-core machine too (their first round loads data).
    config = tiny_config(smoke_federation, tmp_path, num_rounds=1, round_timeout=SLOW_SITE_SECONDS - 2)
    slow = FaultySites("slow", partitions={last_train})
    run = federate(config, smoke_federation, client=slow)
    (record,) = read_metrics(tmp_path / METRICS_NAME)
    assert record["updated"] and record["sites_answered"] == last_train  # every other training site
    (drop,) = record["dropped"]
    assert drop["reason"].startswith("no reply before round-timeout") and drop["kind"] == "timeout"
    assert partition_of(run.grid, drop["node_id"]) == last_train  # the slow site, no other


def test_too_few_valid_sites_skip_the_update_without_stopping(smoke_federation, tmp_path):
    from fedmeta.server.app import RunFailed

    config = tiny_config(smoke_federation, tmp_path, num_rounds=2, min_sites=3)
    with pytest.raises(RunFailed, match="no round from 1 to 2 updated"):  # every round ran; none updated
        federate(config, smoke_federation, client=FaultySites("raise", partitions={0}))
    records = read_metrics(tmp_path / METRICS_NAME)
    assert [r["updated"] for r in records] == [False, False]
    checkpoint = load_checkpoint(tmp_path / CHECKPOINT_NAME)
    assert checkpoint.round == 2 and checkpoint.counters["skipped_rounds"] == 2


def test_heldout_sites_never_train_and_training_sites_never_evaluate(smoke_federation, tmp_path):
    from fedmeta.common.synth import load_manifest

    manifest = load_manifest(smoke_federation)
    seen: list[tuple[str, int]] = []

    def recording(message: Message, context: Context) -> Message:
        seen.append((message.metadata.message_type, int(context.node_config["partition-id"])))
        return client_app(message, context)

    federate(tiny_config(smoke_federation, tmp_path, num_rounds=1, eval_every=1), smoke_federation, client=recording)
    n_train = len(manifest.train_sites)
    assert {p for t, p in seen if t == "train"} == set(range(n_train))
    assert {p for t, p in seen if t == "evaluate"} == set(range(n_train, n_train + len(manifest.heldout_sites)))
    assert {p for t, p in seen if t == "query"} == set(range(num_sites(smoke_federation)))


def test_the_inprocess_engine_is_deterministic(smoke_federation, tmp_path):
    for name in ("a", "b"):
        federate(tiny_config(smoke_federation, tmp_path / name, num_rounds=1), smoke_federation)
    a, b = (load_checkpoint(tmp_path / n / CHECKPOINT_NAME) for n in ("a", "b"))
    assert all(torch.equal(a.params[k], b.params[k]) for k in a.params)


def test_runs_agree_bitwise_whatever_node_ids_flower_hands_out(smoke_federation, tmp_path):
    """Flower's node ids are random per run; sampling and aggregation follow site keys instead."""
    thetas, orders = [], []
    for node_id_seed in (0, 1):
        config = tiny_config(smoke_federation, tmp_path / str(node_id_seed), num_rounds=2, sites_per_round=2)
        run = run_inprocess(config.to_run_config(), simulation_node_configs(num_sites(smoke_federation)),
                            seed=node_id_seed)
        thetas.append(load_checkpoint(tmp_path / str(node_id_seed) / CHECKPOINT_NAME).params)
        orders.append([partition_of(run.grid, n) for n in sorted(run.grid.nodes)])
    assert orders[0] != orders[1], "the two runs should sort their sites differently by node id"
    assert all(torch.equal(thetas[0][k], thetas[1][k]) for k in thetas[0])


@pytest.mark.parametrize("bad_key", [float("nan"), [1, 2], 2.5])
def test_a_site_with_a_malformed_site_key_is_left_out_and_the_rest_train(smoke_federation, tmp_path, bad_key):
    def client(message: Message, context: Context) -> Message:
        reply = client_app(message, context)
        if message.metadata.message_type == "query" and context.node_config["partition-id"] == 0:
            reply.content.metric_records["metrics"]["site-key"] = bad_key
        return reply

    config = tiny_config(smoke_federation, tmp_path, num_rounds=1)
    run = federate(config, smoke_federation, client=client)
    trained = {partition_of(run.grid, n) for n, node in run.grid.nodes.items() if len(node.received) > 1}
    assert 0 not in trained and {1, 2} <= trained
    assert load_checkpoint(tmp_path / CHECKPOINT_NAME).round == 1


def test_a_site_of_another_protocol_version_answers_with_both_versions_and_is_left_out(smoke_federation, tmp_path,
                                                                                      caplog):
    from fedmeta.common.protocol import FEDMETA_VERSION_KEY, PROTOCOL_VERSION_KEY, fedmeta_version

    seen = []

    def client(message: Message, context: Context) -> Message:
        record = message.content.config_records["config"]
        seen.append((record[PROTOCOL_VERSION_KEY], record[FEDMETA_VERSION_KEY]))
        if context.node_config["partition-id"] == 0:  # this site reads the server as another release
            record[PROTOCOL_VERSION_KEY] = 0
        return client_app(message, context)

    config = tiny_config(smoke_federation, tmp_path, num_rounds=1)
    with caplog.at_level("WARNING"):
        run = federate(config, smoke_federation, client=client)
    assert set(seen) == {(1, fedmeta_version())}  # every message the server sends carries both versions
    trained = {partition_of(run.grid, n) for n, node in run.grid.nodes.items() if len(node.received) > 1}
    assert 0 not in trained and {1, 2} <= trained
    refused = [r.getMessage() for r in caplog.records if "version mismatch" in r.getMessage()]
    assert len(refused) == 2, refused  # the site's own log, and the server's, once
    assert any("did not answer the role query" in line and "(protocol 0)" in line and "(protocol 1)" in line
               for line in refused)


def test_the_server_serves_operator_metrics_while_it_runs(smoke_federation, tmp_path):
    import threading
    import urllib.request

    from fedmeta.server.operator_metrics import METRIC_NAMES
    from fedmeta.simulations.engines.flower_runtime import _free_ports

    port = _free_ports(1)[0]
    config = tiny_config(smoke_federation, tmp_path, num_rounds=3, eval_every=1, metrics_port=port)
    done = threading.Event()
    runner = threading.Thread(target=lambda: (federate(config, smoke_federation), done.set()), daemon=True)
    runner.start()
    scraped, deadline = "", time.monotonic() + 120
    while time.monotonic() < deadline and not done.is_set():
        try:
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        except OSError:
            time.sleep(0.1)
            continue
        if "fedmeta_round 1.0" in text or "fedmeta_round 2.0" in text:
            scraped = text  # caught mid-run
        time.sleep(0.1)
    runner.join(timeout=120)
    assert done.is_set() and scraped, "no scrape caught the run between rounds 1 and 2"
    series = {line.split("{")[0].split(" ")[0] for line in scraped.splitlines() if line and not line.startswith("#")}
    for name in METRIC_NAMES:
        assert any(s == name or s.startswith(name + "_") for s in series), (name, sorted(series))
    assert 'fedmeta_sites_dropped_total{reason="timeout"} 0.0' in scraped
    assert "fedmeta_training_sites 3.0" in scraped and "fedmeta_heldout_sites 2.0" in scraped and 'fedmeta_heldout_dice{steps="3"}' in scraped
    received = float(next(line.split()[-1] for line in scraped.splitlines() if line.startswith("fedmeta_received_bytes_total")))
    assert received > 0
    with pytest.raises(OSError):  # the endpoint closes with the run
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)


def test_per_layer_per_step_step_sizes_train_checkpoint_and_adapt_past_the_trained_steps(smoke_federation, tmp_path):
    from fedmeta.common.adaptation import load_initialisation

    config = tiny_config(smoke_federation, tmp_path, num_rounds=2, eval_every=2, algorithm="metasgd",
                         step_sizes="per-layer-step", inner_steps=2)
    federate(config, smoke_federation)
    checkpoint = load_checkpoint(tmp_path / CHECKPOINT_NAME)
    for name, alpha in checkpoint.step_sizes.items():
        assert alpha.shape == (2,) + (1,) * checkpoint.params[name].dim()
    assert any(not torch.equal(a[0], a[1]) for a in checkpoint.step_sizes.values())  # each step learned its own
    heldout = read_metrics(tmp_path / METRICS_NAME)[-1]["heldout"]  # 3 adaptation steps: the last rate reused
    assert heldout["sites_answered"] >= 1 and 0 <= heldout["summary"]["dice-mean-3"] <= 1
    init, _ = load_initialisation(tmp_path / CHECKPOINT_NAME)
    assert set(init.inner_lr) == set(checkpoint.step_sizes)
