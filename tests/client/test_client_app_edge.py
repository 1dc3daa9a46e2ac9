"""The ClientApp's edge: what it reads from its environment and what it records, called in-process."""

from __future__ import annotations

import logging

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

from fedmeta.client import app as client_module
from fedmeta.common.protocol import CONFIG_RECORD, METRICS_RECORD, PROTOCOL_VERSION, PROTOCOL_VERSION_KEY


@pytest.fixture
def task_identity():
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1


def _query(node_config: dict, run_config: dict | None = None) -> tuple[Message, Context]:
    body = RecordDict({CONFIG_RECORD: ConfigRecord({PROTOCOL_VERSION_KEY: PROTOCOL_VERSION})})
    message = Message(body, dst_node_id=7, message_type="query")
    return message, Context(0, 7, node_config, RecordDict(), run_config or {})


def test_a_deployed_site_keeps_its_key_under_the_fedmeta_home_the_app_reads(task_identity, tmp_path, monkeypatch):
    site = tmp_path / "site"
    site.mkdir()
    for home in ("home-a", "home-b"):  # read per message, not once at import
        monkeypatch.setenv("FEDMETA_HOME", str(tmp_path / home))
        reply = client_module.query(*_query({"data-dir": str(site)}))
        assert not reply.has_error() and METRICS_RECORD in reply.content.metric_records
        assert len(list((tmp_path / home / "site-keys").iterdir())) == 1
    assert list(site.iterdir()) == []  # never in the site's data folder


def test_a_run_config_the_handler_refused_is_recorded_without_a_device_and_logged(task_identity, tmp_path, caplog):
    message, context = _query({"partition-id": 0, "metrics-dir": str(tmp_path / "metrics")}, {"device": "tpu"})
    with caplog.at_level(logging.WARNING, logger="fedmeta.client"):
        reply = client_module.train(message, context)
    assert reply.has_error() and "ValueError" in reply.error.reason
    assert any("site metrics of train on node 7 have no episodes or device" in r.getMessage()
               and "device='tpu'" in r.getMessage() for r in caplog.records)
    assert (tmp_path / "metrics").is_dir()  # the message was still counted
