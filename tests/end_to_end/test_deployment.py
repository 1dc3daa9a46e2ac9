"""fedmeta on Flower's Deployment Engine: a real SuperLink and two SuperNodes on loopback.

Slow: starts flower-superlink, two flower-supernode processes (each spawning a SuperExec and
ClientApp processes) and runs two rounds through `flwr run`, as a consortium would: TLS against a
provisioned CA, SuperNode authentication on, every site's key registered.
"""

from __future__ import annotations

import math
import re
import threading
import time
from pathlib import Path

import pytest

from fedmeta.common.checkpoint import CHECKPOINT_NAME, load_checkpoint
from fedmeta.server.metrics import METRICS_NAME, read_metrics
from fedmeta.simulations.engines.flower_home import _FlowerHome
from fedmeta.simulations.engines.flower_runtime import LocalDeployment
from fedmeta.simulations.experiments.presets import load_preset

REPO_ROOT = Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path("/proc").is_dir(), reason="the leftover-process check reads /proc"),
]


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def descendants(pids: list[int]) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, stack = set(), list(pids)
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in found:
                found.add(child)
                stack.append(child)
    return found


def _metrics(out_dir: Path) -> list[dict]:
    try:
        return read_metrics(out_dir / METRICS_NAME)
    except (OSError, ValueError):
        return []


def test_registered_sites_train_and_evaluate_a_late_site_joins_and_strangers_are_refused(federation, tmp_path):
    """A training hospital and a held-out one: meta-training rounds and held-out adaptation scores;
    a second training hospital whose SuperNode starts after round 2 trains in a later round."""
    from fedmeta.common.synth import load_manifest

    manifest = load_manifest(federation)
    train_site, heldout_site = Path(manifest.train_sites[0].path), Path(manifest.heldout_sites[0].path)
    late_site = Path(manifest.train_sites[1].path)
    out_dir = tmp_path / "out"
    overrides, _driver = load_preset("smoke")
    # No federation-dir: deployed nodes find their data through --node-config data-dir only.
    num_rounds = 10
    run_config = {**overrides, "out-dir": str(out_dir), "num-rounds": num_rounds, "eval-every": num_rounds,
                  "min-sites": 1}

    from fedmeta.server.provision import provision
    from fedmeta.simulations.engines.flower_runtime import _free_ports

    # Another consortium's material: a CA the SuperLink does not use and a key it never registered.
    rogue = provision(tmp_path / "rogue", server_names=["127.0.0.1"], sites=["rogue"]).out
    with LocalDeployment(
        [train_site, heldout_site, late_site], roles=["train", "heldout", "train"], late=[2],
        flwr_home=tmp_path / "flwr-home",
    ) as deployment:
        started = list(deployment.pids)
        # The SuperLink, and per started site its SuperNode and its app gate (fedmeta site-exec).
        assert len(started) == 5 and all(alive(pid) for pid in started)
        ports = _free_ports(2)
        # A third SuperNode that trusts the consortium CA but holds an unregistered key, and one that
        # does not trust the consortium's CA at all: neither may join.
        unregistered = deployment.start_supernode(
            2, private_key=rogue / "sites/rogue/site.key", root_certificates=deployment.pki / "ca/ca.crt", port=ports[0])
        untrusting = deployment.start_supernode(
            3, private_key=rogue / "sites/rogue/site.key", root_certificates=rogue / "ca/ca.crt", port=ports[1])
        finished: dict[str, object] = {}

        def run() -> None:
            try:
                finished["outcome"] = deployment.run(REPO_ROOT, run_config, timeout_s=400)
            except Exception as err:  # noqa: BLE001 - reported by the main thread
                finished["error"] = err

        runner = threading.Thread(target=run)
        runner.start()
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and runner.is_alive() and not any(
                r["round"] >= 2 for r in _metrics(out_dir)):
            time.sleep(0.5)
        late = deployment.start_supernode(2)  # the late hospital connects after round 2
        started.append(late.pid)
        runner.join(timeout=420)
        assert not runner.is_alive(), "the run did not finish"
        assert "error" not in finished, finished.get("error")
        outcome = finished["outcome"]
        # What an operator reads with `flwr log RUN_ID local-deployment` once the run is over.
        shown = _FlowerHome(tmp_path / "flwr-home").flwr(["log", str(outcome.run_id), "local-deployment", "--show"])
        listed = deployment.nodes()
        refused = {name: deployment.log_of(process.pid)
                   for name, process in (("unregistered", unregistered), ("untrusting", untrusting))}
        # SuperExecs below the SuperLink and SuperNodes (ClientApp processes come and go).
        spawned = descendants(started)
        assert spawned, "the SuperLink and SuperNodes run their apps in child processes"

    assert outcome.ok and outcome.status == "finished:completed"
    # The ServerApp's lines in the run's log (fedmeta.server.run_log): a start line, one per round, a final line.
    progress = re.findall(r"^fedmeta INFO: (start:|round \d+/\d+ |done:)", shown.stdout, flags=re.M)
    assert progress == ["start:", *(f"round {r}/{num_rounds} " for r in range(num_rounds + 1)), "done:"], shown
    # Only the three registered sites ever joined; the others never appear, so they receive no message.
    assert sorted(node["status"] for node in listed) == ["online"] * 3, listed
    for name, log in refused.items():  # turned away: the unknown key is not activated, the foreign CA not trusted
        assert "Failed to activate SuperNode" in log or log.count("Connection attempt failed") >= 2, (name, log[-600:])
    checkpoint = load_checkpoint(out_dir / CHECKPOINT_NAME)
    assert checkpoint.round == num_rounds
    records = {r["round"]: r for r in read_metrics(out_dir / METRICS_NAME)}
    assert sorted(records) == list(range(num_rounds + 1))
    for server_round in (1, 2):
        record = records[server_round]
        # Only the training site trains: the held-out one never receives a train message.
        assert record["sites_sampled"] == 1 and record["sites_answered"] == 1, record
    for record in (records[r] for r in range(1, num_rounds + 1)):
        assert record["updated"] is True and record["dropped"] == [], record
        assert math.isfinite(record["train"]["query-loss-after"])
    joined = [r for r in range(3, num_rounds + 1) if records[r]["sites_answered"] == 2]
    assert joined and joined == list(range(joined[0], num_rounds + 1)), [records[r]["sites_answered"] for r in records if r]
    for server_round in (0, num_rounds):
        heldout = records[server_round]["heldout"]
        assert heldout["sites_answered"] == 1 and heldout["dropped"] == [], heldout
        assert 0.0 <= heldout["summary"]["dice-mean-0"] <= 1.0
    left = [pid for pid in [*started, *spawned] if alive(pid)]
    assert left == [], f"processes left running after the deployment closed: {left}"
