"""A site's own metrics: ClientApp processes record into the site's metrics folder, `fedmeta
site-metrics` serves them for Prometheus (a real process, scraped over HTTP)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from fedmeta.client.site_metrics import SITE_METRIC_NAMES, read_state, record_message
from fedmeta.common.synth import load_manifest
from fedmeta.simulations.engines.flower_runtime import _free_ports
from fedmeta.simulations.engines.inprocess import run_inprocess, simulation_node_configs
from tests.simulations.test_inprocess import tiny_config


def _scrape(port: int, attempts: int = 200) -> dict[str, list]:
    for _ in range(attempts):
        try:
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
            break
        except OSError:
            time.sleep(0.1)
    else:
        raise AssertionError(f"nothing answered on port {port}")
    return {family.name: family.samples for family in text_string_to_metric_families(text)}


def test_the_clientapp_records_what_it_did_and_the_exporter_serves_it(smoke_federation, tmp_path):
    manifest = load_manifest(smoke_federation)
    total = len(manifest.train_sites) + len(manifest.heldout_sites)
    nodes = [{**node, "metrics-dir": str(tmp_path / f"site-{i}")} for i, node in enumerate(simulation_node_configs(total))]
    config = tiny_config(smoke_federation, tmp_path / "out", num_rounds=2, eval_every=2)
    run_inprocess(config.to_run_config(), nodes)

    train_state, heldout_state = read_state(tmp_path / "site-0"), read_state(tmp_path / f"site-{total - 1}")
    assert train_state["messages"] == {"query/ok": 1, "train/ok": 2}
    assert train_state["episodes"] == 2 * config.episodes_per_site and train_state["episode_seconds"] > 0
    assert heldout_state["messages"] == {"query/ok": 1, "evaluate/ok": 2} and heldout_state["episodes"] == 0
    assert train_state["device"] == "cpu" and train_state["peak_memory_bytes"]["rss"] > 10 * 2**20

    port = _free_ports(1)[0]
    exporter = subprocess.Popen([sys.executable, "-m", "fedmeta.simulations.cli", "site-metrics", "--dir",
                                 str(tmp_path / "site-0"), "--port", str(port)],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        families = _scrape(port)
        # Recorded after the exporter started: it reads the folder at every scrape.
        record_message({"metrics-dir": str(tmp_path / "site-0")}, "train", ok=False, seconds=0.5)
        again = _scrape(port)
    finally:
        exporter.send_signal(signal.SIGTERM)
        assert exporter.wait(timeout=20) == 0
    names = {name.removesuffix("_total") for name in families}
    assert {name.removesuffix("_total") for name in SITE_METRIC_NAMES} <= names
    messages = {(s.labels["type"], s.labels["outcome"]): s.value for s in again["fedmeta_site_messages"]}
    assert messages == {("query", "ok"): 1, ("train", "ok"): 2, ("train", "error"): 1}
    episodes = {s.name: s.value for s in families["fedmeta_site_episode_duration_seconds"]}
    assert episodes["fedmeta_site_episode_duration_seconds_count"] == 2 * config.episodes_per_site
    (device,) = families["fedmeta_site_device_info"]
    assert device.labels == {"device": "cpu", "name": "cpu"} and device.value == 1


def test_recording_never_fails_a_round(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    record_message({"metrics-dir": str(blocker)}, "train", ok=True, seconds=1.0, episodes=2)  # logged, not raised
    record_message({}, "train", ok=True, seconds=1.0)  # no metrics-dir: nothing recorded
    assert not (tmp_path / "site-metrics.json").exists()


def test_the_exporter_refuses_a_bad_port_with_the_fix(tmp_path):
    result = subprocess.run([sys.executable, "-m", "fedmeta.simulations.cli", "site-metrics", "--dir", str(tmp_path),
                             "--port", "70000"], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert result.returncode == 2 and "--port 70000 is not a TCP port" in result.stderr


def test_a_tampered_state_file_never_breaks_recording_or_scraping(tmp_path):
    from prometheus_client import CollectorRegistry, generate_latest

    from fedmeta.client.site_metrics import STATE_NAME, SiteMetricsCollector

    hostile = ('{"messages": {"train/ok": "x", "evil/ok": 3, "query/ok": 2}, "message_seconds": {"train": 5}, '
               '"episodes": Infinity, "episode_seconds": -1, "peak_memory_bytes": {"rss": ' + "9" * 400 + '}, '
               '"device": ["cpu"], "last_message": NaN}')
    (tmp_path / STATE_NAME).write_text(hostile)
    registry = CollectorRegistry()
    registry.register(SiteMetricsCollector(tmp_path))
    text = generate_latest(registry).decode()  # scraping works on what is valid
    assert 'fedmeta_site_messages_total{outcome="ok",type="query"} 2.0' in text and "evil" not in text
    record_message({"metrics-dir": str(tmp_path)}, "train", ok=True, seconds=2.0, episodes=2, device="cpu")
    state = read_state(tmp_path)
    assert state["messages"] == {"query/ok": 2, "train/ok": 1} and state["episodes"] == 2
    assert not list(tmp_path.glob(".site-metrics-*.tmp"))


def test_the_exporter_refuses_a_file_as_its_folder(tmp_path):
    (tmp_path / "f").write_text("x")
    result = subprocess.run([sys.executable, "-m", "fedmeta.simulations.cli", "site-metrics", "--dir",
                             str(tmp_path / "f"), "--port", "9101"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "is a file" in result.stderr
