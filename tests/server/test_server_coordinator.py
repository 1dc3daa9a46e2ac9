"""The coordinator alone: reproducible sampling, reply validation, weighted aggregation in a fixed order."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity

from fedmeta.common.config import RunConfig
from fedmeta.common.records import to_array_record
from fedmeta.common.protocol import GRADS_RECORD, METRICS_RECORD
from fedmeta.server.coordinator import Coordinator

TINY = dict(model_base_channels=4, model_levels=2, image_size=16, meta_optimizer="sgd", meta_lr=1.0)


@pytest.fixture(autouse=True)
def server_identity():
    # What a ServerApp process has: the identity Message() stamps on instructions.
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 7, SUPERLINK_NODE_ID


def _strategy(**changes) -> Coordinator:
    return Coordinator(RunConfig(**{**TINY, **changes}))


def _reply(instruction: Message, grads: dict[str, torch.Tensor] | ArrayRecord, metrics: dict | None = None) -> Message:
    record = grads if isinstance(grads, ArrayRecord) else to_array_record(grads)
    content = RecordDict({GRADS_RECORD: record, METRICS_RECORD: MetricRecord(metrics or {"num-examples": 4, "train-slices": 10})})
    reply = Message(content, reply_to=instruction)
    return reply


def _instructions(strategy, nodes):
    messages = strategy.train_messages(1, nodes, round_seed=5)
    for i, m in enumerate(messages):
        m.metadata.__dict__["_message_id"] = f"m{i}"
    return messages


def _grads_like(strategy, value: float) -> dict[str, torch.Tensor]:
    return {k: torch.full_like(v, value) for k, v in strategy.params.items()}


def test_site_sampling_is_reproducible_from_the_seed_and_differs_between_seeds():
    nodes = [11, 5, 42, 7, 99, 3]
    draws = [_strategy(seed=3, sites_per_round=3).sample_sites(nodes) for _ in range(2)]
    assert draws[0] == draws[1]
    chosen, _ = draws[0]
    # The chosen sites keep the site order they came in (fedmeta.server.app sorts nodes by site key).
    assert len(chosen) == 3 and chosen == sorted(chosen, key=nodes.index) and set(chosen) <= set(nodes)
    others = {tuple(_strategy(seed=s, sites_per_round=3).sample_sites(nodes)[0]) for s in range(10)}
    assert len(others) > 1
    assert _strategy(sites_per_round=0).sample_sites(nodes)[0] == nodes


def test_data_weighting_is_the_mean_weighted_by_training_slices_and_ignores_reply_order():
    results = []
    for shuffle in (False, True):
        strategy = _strategy(site_weighting="data", median_norm_bound=0.0)  # the weighting alone
        theta = strategy.params
        sent = _instructions(strategy, [30, 10, 20])
        replies = [
            _reply(sent[0], _grads_like(strategy, 1.0), {"num-examples": 4, "train-slices": 1, "query-loss-after": 1.0}),
            _reply(sent[1], _grads_like(strategy, 2.0), {"num-examples": 4, "train-slices": 2, "query-loss-after": 2.0}),
            _reply(sent[2], _grads_like(strategy, 4.0), {"num-examples": 4, "train-slices": 5, "query-loss-after": 3.0}),
        ]
        if shuffle:
            random.Random(0).shuffle(replies)
        outcome = strategy.apply_train_replies(1, [30, 10, 20], replies)
        assert outcome.updated and not outcome.dropped
        expected_step = (1 * 1.0 + 2 * 2.0 + 5 * 4.0) / 8
        for name, value in strategy.params.items():  # SGD lr 1: θ − mean gradient
            torch.testing.assert_close(value, theta[name] - expected_step, rtol=0, atol=1e-6)
        assert outcome.metrics["query-loss-after"] == pytest.approx((1 + 4 + 15) / 8)
        results.append(strategy.params)
    for name in results[0]:
        assert torch.equal(results[0][name], results[1][name])


@pytest.mark.parametrize(("weighting", "algorithm", "expected_step"), [
    # Meta-learners: one weight per site (task-averaged MAML).
    ("auto", "fomaml", (1.0 + 2.0 + 4.0) / 3),
    # FedAvg: the sites' data; the third site's claim of 10^6 slices is capped at 3 x the median of
    # the others' counts (75), so it weighs 225, not 10^6.
    ("auto", "fedavg", (100 * 1.0 + 50 * 2.0 + 225 * 4.0) / 375),
    ("per-site", "fedavg", (1.0 + 2.0 + 4.0) / 3),
])
def test_site_weighting_per_site_or_by_capped_data(weighting, algorithm, expected_step):
    strategy = _strategy(site_weighting=weighting, algorithm=algorithm, max_weight_ratio=3.0,
                         median_norm_bound=0.0)  # the weighting alone, not the norm bound
    theta = strategy.params
    sent = _instructions(strategy, [1, 2, 3])
    replies = [_reply(sent[i], _grads_like(strategy, value), {"num-examples": 4, "train-slices": slices})
               for i, (value, slices) in enumerate(((1.0, 100), (2.0, 50), (4.0, 10**6)))]
    outcome = strategy.apply_train_replies(1, [1, 2, 3], replies)
    assert outcome.updated
    for name, value in strategy.params.items():
        torch.testing.assert_close(value, theta[name] - expected_step, rtol=0, atol=1e-6)
    if algorithm == "fedavg" and weighting == "auto":
        assert outcome.metrics["train-slices"] == 100 + 50 + 10**6  # reported as sent, weighted as capped


def _corrupt(kind: str, strategy: Coordinator, instruction: Message) -> Message:
    grads = _grads_like(strategy, 0.1)
    name = sorted(grads)[0]
    if kind == "missing key":
        grads.pop(name)
    elif kind == "extra key":
        grads["images"] = torch.zeros(2, 1, 16, 16)
    elif kind == "wrong shape":
        grads[name] = torch.zeros(grads[name].numel() + 1)
    elif kind == "wrong dtype":
        grads[name] = grads[name].double()
    elif kind == "nan":
        grads[name][...] = float("nan")
    elif kind == "bad bytes":
        record = to_array_record(grads)
        good = record[name]
        record[name] = Array(dtype=good.dtype, shape=good.shape, stype=good.stype, data=b"\x00garbage")
        return _reply(instruction, record)
    elif kind == "zero examples":
        return _reply(instruction, grads, {"num-examples": 0})
    elif kind == "inflated examples":
        return _reply(instruction, grads, {"num-examples": 1e300})
    elif kind == "no data size":
        return _reply(instruction, grads, {"num-examples": 3})
    elif kind == "huge data size":
        return _reply(instruction, grads, {"num-examples": 3, "train-slices": 1e12})
    elif kind == "fractional data size":
        return _reply(instruction, grads, {"num-examples": 3, "train-slices": 2.5})
    elif kind == "inf metric":
        return _reply(instruction, grads, {"num-examples": 3, "query-loss-after": float("inf")})
    elif kind == "no metrics":
        return Message(RecordDict({GRADS_RECORD: to_array_record(grads)}), reply_to=instruction)
    elif kind == "gradient in metrics":
        content = RecordDict({METRICS_RECORD: MetricRecord({"num-examples": 3, "grad": [0.1, 0.2]})})
        return Message(content, reply_to=instruction)
    elif kind == "extra record":
        content = RecordDict({GRADS_RECORD: to_array_record(grads), METRICS_RECORD: MetricRecord({"num-examples": 3}),
                              "site": ConfigRecord({"patient": "p001"})})
        return Message(content, reply_to=instruction)
    elif kind == "error":
        return Message(Error(code=2, reason="train failed at the site with ValueError"), reply_to=instruction)
    return _reply(instruction, grads)


BAD = {
    "missing key": "missing",
    "extra key": "unexpected ['images']",
    "wrong shape": "expected float32",
    "wrong dtype": "float64",
    "nan": "NaN or Inf",
    "bad bytes": "do not decode",
    "zero examples": "positive example count",
    "inflated examples": "more than the 20 this round asked for",
    "no data size": "train-slices is None",
    "fractional data size": "train-slices is 2.5",
    "huge data size": "train-slices is 1000000000000.0",
    "inf metric": "not a finite scalar",
    "no metrics": "no MetricRecord",
    "gradient in metrics": "no ArrayRecord",
    "extra record": "unexpected records ['site']",
    "error": "site failed (error code 2)",
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_a_bad_reply_is_dropped_with_its_reason_counted_and_the_round_goes_on(kind):
    strategy = _strategy(site_weighting="data")  # the data size is checked when it weighs
    theta = strategy.params
    sent = _instructions(strategy, [1, 2])
    replies = [_reply(sent[0], _grads_like(strategy, 1.0)), _corrupt(kind, strategy, sent[1])]
    outcome = strategy.apply_train_replies(1, [1, 2], replies)
    assert [d.node_id for d in outcome.dropped] == [2]
    assert BAD[kind] in outcome.dropped[0].reason
    assert strategy.counters["dropped_replies"] == 1
    assert outcome.updated and list(outcome.accepted) == [1]
    name = sorted(theta)[0]
    torch.testing.assert_close(strategy.params[name], theta[name] - 1.0)  # the good site alone


def test_replies_from_unasked_nodes_duplicates_and_silence_are_all_dropped():
    strategy = _strategy()
    sent = _instructions(strategy, [1, 2, 3])
    stranger = _instructions(strategy, [9])[0]
    replies = [
        _reply(sent[0], _grads_like(strategy, 1.0)),
        _reply(sent[0], _grads_like(strategy, 5.0)),
        _reply(stranger, _grads_like(strategy, 5.0)),
    ]
    outcome = strategy.apply_train_replies(1, [1, 2, 3], replies)
    reasons = {(d.node_id, d.reason) for d in outcome.dropped}
    assert (1, "second reply from the same node") in reasons
    assert (9, "reply from a node this round did not ask") in reasons
    assert {(2, "no reply before round-timeout=600s"), (3, "no reply before round-timeout=600s")} <= reasons
    assert list(outcome.accepted) == [1]


def test_fewer_valid_replies_than_min_sites_leaves_theta_unchanged():
    strategy = _strategy(min_sites=2)
    theta = strategy.params
    sent = _instructions(strategy, [1, 2])
    outcome = strategy.apply_train_replies(1, [1, 2], [_reply(sent[0], _grads_like(strategy, 1.0))])
    assert not outcome.updated
    assert strategy.counters["skipped_rounds"] == 1
    for name in theta:
        assert torch.equal(strategy.params[name], theta[name])


def test_metasgd_sends_step_sizes_and_expects_their_gradients():
    strategy = _strategy(algorithm="metasgd", inner_lr=0.05)
    message = strategy.train_messages(1, [4], round_seed=1)[0]
    keys = set(message.content.array_records["arrays"].keys())
    step_keys = {k for k in keys if k.startswith("lr.")}
    assert step_keys and {k[3:] for k in step_keys} == set(strategy.params)
    assert np.allclose(message.content.array_records["arrays"][sorted(step_keys)[0]].numpy(), 0.05)
    message.metadata.__dict__["_message_id"] = "m"
    grads = {**_grads_like(strategy, 0.0), **{k: torch.ones_like(v) for k, v in
                                              ((f"lr.{n}", s) for n, s in strategy.step_sizes.items())}}
    outcome = strategy.apply_train_replies(1, [4], [_reply(message, grads)])
    assert outcome.updated
    name = sorted(strategy.step_sizes)[0]
    torch.testing.assert_close(strategy.step_sizes[name], torch.full_like(strategy.step_sizes[name], 0.05 - 1.0))
    without_steps = _reply(message, _grads_like(strategy, 0.0))
    assert "missing ['lr." in strategy.apply_train_replies(2, [4], [without_steps]).dropped[0].reason


def test_evaluation_summary_is_mean_and_worst_site():
    strategy = _strategy(eval_steps="0,5")
    sent = strategy.evaluate_messages(1, [8, 6])
    for i, m in enumerate(sent):
        m.metadata.__dict__["_message_id"] = f"e{i}"
    replies = [
        Message(RecordDict({METRICS_RECORD: MetricRecord({"num-examples": 10, "dice-step-0": 0.2, "dice-step-5": 0.6})}), reply_to=sent[0]),
        Message(RecordDict({METRICS_RECORD: MetricRecord({"num-examples": 10, "dice-step-0": 0.4, "dice-step-5": 1.5})}), reply_to=sent[1]),
    ]
    outcome = strategy.collect_evaluation(1, [6, 8], replies)
    assert [d.node_id for d in outcome.dropped] == [8] and "dice-step-5 is 1.5" in outcome.dropped[0].reason
    assert outcome.metrics == {"dice-mean-0": 0.2, "dice-worst-0": 0.2, "dice-mean-5": 0.6, "dice-worst-5": 0.6}
    assert sent[0].content.config_records["config"]["eval-seed"] == strategy.config.seed
