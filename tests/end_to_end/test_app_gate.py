"""A site runs the consortium's app and no other: a foreign app bundle submitted to the SuperLink is refused
by every site's app gate before any of its code runs (fedmeta.client.app_gate), on a real loopback deployment."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from fedmeta.simulations.engines.flower_runtime import LocalDeployment

pytestmark = [pytest.mark.slow]

REPO_ROOT = Path(__file__).resolve().parents[2]

FOREIGN_PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "foreign"
version = "1.0.0"

[tool.flwr.app]
publisher = "stranger"

[tool.flwr.app.components]
serverapp = "foreign_app:server"
clientapp = "foreign_app:client"

[tool.flwr.app.config]
marker-dir = ""
report = ""
"""

# What an attacker's app would do at a site: read the site's node config (its data folder) and leave a mark.
FOREIGN_APP = '''
import json
import time
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

client = ClientApp()
server = ServerApp()


@client.query()
def query(msg: Message, context: Context) -> Message:
    Path(context.run_config["marker-dir"], f"ran-at-{context.node_id}").write_text(json.dumps(context.node_config))
    return Message(RecordDict({"seen": ConfigRecord({"data-dir": str(context.node_config.get("data-dir"))})}),
                   reply_to=msg)


@server.main()
def main(grid: Grid, context: Context) -> None:
    nodes = []
    for _ in range(60):
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= 2:
            break
        time.sleep(1)
    messages = [Message(RecordDict({"q": ConfigRecord({"x": 1})}), dst_node_id=n, message_type="query") for n in nodes]
    replies = list(grid.send_and_receive(messages, timeout=90))
    report = [{"error": r.error.reason if r.has_error() else None} for r in replies]
    Path(context.run_config["report"]).write_text(json.dumps({"nodes": len(nodes), "replies": report}))
'''


def test_a_foreign_app_is_refused_by_every_site_and_none_of_its_code_runs(smoke_federation, tmp_path):
    from fedmeta.common.synth import load_manifest

    sites = [Path(s.path) for s in load_manifest(smoke_federation).train_sites[:2]]
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "pyproject.toml").write_text(FOREIGN_PYPROJECT)
    (foreign / "foreign_app.py").write_text(textwrap.dedent(FOREIGN_APP))
    marker_dir, report = tmp_path / "markers", tmp_path / "report.json"
    marker_dir.mkdir()
    with LocalDeployment(sites, flwr_home=tmp_path / "flwr-home") as deployment:
        home = deployment._require_home()
        # A local process beside site 0 that would run any app: Flower's stock SuperExec on the SuperNode's Runtime
        # API. Without the site's secret it is handed no task.
        from fedmeta.simulations.engines.flower_home import _flower_bin

        rogue = deployment._spawn("rogue-superexec", [_flower_bin("flower-superexec"), "--runtime-api-address",
                                                      f"127.0.0.1:{deployment._node_ports[0]}", "--insecure"],
                                  home.env)
        # An operator's (or anyone's who reached the Control API) `flwr run` of an app the consortium never signed.
        submitted = home.flwr(["run", str(foreign), "local-deployment", "--run-config",
                               f"marker-dir='{marker_dir}' report='{report}'", "--stream"], timeout_s=240)
        gate_logs = [deployment.log_of(pid) for pid in deployment.pids
                     if "site-exec" in " ".join(map(str, _argv(deployment, pid)))]
        rogue_log = deployment.log_of(rogue.pid)

    assert "Successfully started run" in submitted.stdout + submitted.stderr, submitted.stdout[-2000:]
    assert list(marker_dir.iterdir()) == [], "the foreign ClientApp ran at a site"
    answers = json.loads(report.read_text())
    assert answers["nodes"] == 2 and len(answers["replies"]) == 2, answers
    for reply in answers["replies"]:  # every site answered at once, with a refusal, not data
        assert reply["error"] and "not approved" in reply["error"], reply
    assert len(gate_logs) == 2
    assert "Start `flwr-clientapp` process" not in rogue_log, rogue_log[-1500:]
    # ... because site 0's SuperNode refused its request for a task: it does not hold the site's secret.
    site0 = (tmp_path / "flwr-home" / "logs" / "supernode-0.log").read_text(errors="replace")
    assert "SuperExec authentication failed" in site0, site0[-1500:]
    for log in gate_logs:
        assert "REFUSED run" in log and "not approved by the consortium" in log, log[-1500:]


def _argv(deployment: LocalDeployment, pid: int) -> list[str]:
    return next(p.args for p in deployment._processes if p.pid == pid)
