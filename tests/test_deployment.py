"""fedmeta on Flower's Deployment Engine: a real SuperLink and two SuperNodes on loopback.

Slow: starts flower-superlink, two flower-supernode processes (each spawning a SuperExec and
ClientApp processes) and runs two rounds through `flwr run`, as a consortium would: TLS against a
provisioned CA, SuperNode authentication on, every site's key registered.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from fedmeta.common.checkpoint import CHECKPOINT_NAME, load_checkpoint
from fedmeta.server.metrics import METRICS_NAME, read_metrics
from fedmeta.simulations.engines.flower_runtime import LocalDeployment
from fedmeta.simulations.experiments.presets import load_preset

REPO_ROOT = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path("/proc").is_dir(), reason="the leftover-process check reads /proc"),
]


@pytest.fixture
def federation(smoke_federation) -> Path:
    """The session's smoke federation (tests/conftest.py)."""
    return smoke_federation


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


def test_two_supernodes_with_their_own_data_dirs_and_roles_run_two_rounds(federation, tmp_path):
    """A training hospital and a held-out one: meta-training rounds and held-out adaptation scores."""
    from fedmeta.common.synth import load_manifest

    manifest = load_manifest(federation)
    train_site, heldout_site = Path(manifest.train_sites[0].path), Path(manifest.heldout_sites[0].path)
    out_dir = tmp_path / "out"
    overrides, _driver = load_preset("smoke")
    # No federation-dir: deployed nodes find their data through --node-config data-dir only.
    run_config = {**overrides, "out-dir": str(out_dir), "num-rounds": 2, "eval-every": 2, "min-sites": 1}

    from fedmeta.server.provision import provision
    from fedmeta.simulations.engines.flower_runtime import _free_ports

    # Another consortium's material: a CA the SuperLink does not use and a key it never registered.
    rogue = provision(tmp_path / "rogue", server_names=["127.0.0.1"], sites=["rogue"]).out
    with LocalDeployment(
        [train_site, heldout_site], roles=["train", "heldout"], flwr_home=tmp_path / "flwr-home"
    ) as deployment:
        started = list(deployment.pids)
        assert len(started) == 3 and all(alive(pid) for pid in started)
        ports = _free_ports(2)
        # A third SuperNode that trusts the consortium CA but holds an unregistered key, and one that
        # does not trust the consortium's CA at all: neither may join.
        unregistered = deployment.start_supernode(
            2, private_key=rogue / "sites/rogue/site.key", root_certificates=deployment.pki / "ca/ca.crt", port=ports[0])
        untrusting = deployment.start_supernode(
            3, private_key=rogue / "sites/rogue/site.key", root_certificates=rogue / "ca/ca.crt", port=ports[1])
        outcome = deployment.run(REPO_ROOT, run_config, timeout_s=300)
        listed = deployment.nodes()
        refused = {name: deployment.log_of(process.pid)
                   for name, process in (("unregistered", unregistered), ("untrusting", untrusting))}
        # SuperExecs below the SuperLink and SuperNodes (ClientApp processes come and go).
        spawned = descendants(started)
        assert spawned, "the SuperLink and SuperNodes run their apps in child processes"

    assert outcome.ok and outcome.status == "finished:completed"
    # Only the two registered sites ever joined; the others never appear, so they receive no message.
    assert sorted(node["status"] for node in listed) == ["online", "online"], listed
    for name, log in refused.items():  # they keep knocking and are turned away every time
        assert log.count("Connection attempt failed") >= 2, (name, log[-600:])
    checkpoint = load_checkpoint(out_dir / CHECKPOINT_NAME)
    assert checkpoint.round == 2
    records = {r["round"]: r for r in read_metrics(out_dir / METRICS_NAME)}
    assert sorted(records) == [0, 1, 2]
    for server_round in (1, 2):
        record = records[server_round]
        # Only the training site trains: the held-out one never receives a train message.
        assert record["sites_sampled"] == 1 and record["sites_answered"] == 1, record
        assert record["updated"] is True and record["dropped"] == []
        assert math.isfinite(record["train"]["query-loss-after"])
    for server_round in (0, 2):
        heldout = records[server_round]["heldout"]
        assert heldout["sites_answered"] == 1 and heldout["dropped"] == [], heldout
        assert 0.0 <= heldout["summary"]["dice-mean-0"] <= 1.0
    left = [pid for pid in [*started, *spawned] if alive(pid)]
    assert left == [], f"processes left running after the deployment closed: {left}"
