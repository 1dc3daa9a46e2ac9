"""The plan round (run config plan-round = true): fedmeta's real ServerApp asks real ClientApps for their fingerprints,
in one process (fedmeta.simulations.engines.inprocess: every message through Flower's protobuf, routed by the
ClientApp to its ``query.fingerprint`` handler), and writes the plan `fedmeta plan --sites` makes from the same
folders; a reply tampered with after the site's own check is refused, named in the log, and left out of the plan.

Deployed nodes (``data-dir`` and ``site-id`` in their node config) on two tiny CT sites; the simulated path
(partition ids over the smoke federation) in one test. No test here trains: the plan round ends before round 1.
The same apps on the Deployment Engine (a loopback SuperLink and two SuperNodes, `flwr run`, the lines read back
from the run's log) took 70 s on this 2-core machine, more than the in-process runs add, so that is not repeated
here: the engine's transport and its log are tested by tests/end_to_end/test_deployment.py.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tomllib

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common.config import parse_config_args

from fedmeta.client.app import app as client_app
from fedmeta.common.checkpoint import CHECKPOINT_NAME
from fedmeta.common.config import RunConfig
from fedmeta.common.fingerprint import site_fingerprint
from fedmeta.common.outputs import OutputRefused
from fedmeta.common.plan import RUN_CONFIG_KEYS, merge_fingerprints
from fedmeta.common.protocol import FINGERPRINT_KEY, FINGERPRINT_MESSAGE_TYPE, FINGERPRINT_RECORD
from fedmeta.common.read_limits import ReadLimits
from fedmeta.server.metrics import METRICS_NAME
from fedmeta.server.plan_round import PlanRoundFailed
from fedmeta.simulations.cli import main
from fedmeta.simulations.engines.inprocess import run_inprocess, simulation_node_configs
from tests.common.test_fingerprint import CASE_PREFIX, SITE_NAME, ct_volumes, write_site

CT_LABELS = {"0": "background", "1": "liver", "2": "tumour"}
SERVER_LOG = "fedmeta.server"


@pytest.fixture
def sites(tmp_path):
    """Two CT sites (another HU distribution and spacing each), as folders named for the hospitals."""
    folders = {}
    for name, seed, zooms in (("hospital-a", 0, (0.8, 0.8, 5.0)), ("hospital-b", 3, (0.7, 0.7, 3.0))):
        images, labels = ct_volumes(2, seed=seed)
        folders[name] = write_site(tmp_path / name, images, labels, zooms, {"0": "CT"}, CT_LABELS)
    return folders


def deployed_nodes(sites) -> list[dict]:
    """What the hospitals' SuperNodes pass: their data folder and the operator's site-id (1, 2 in folder order)."""
    return [{"data-dir": str(folder), "site-id": key} for key, folder in enumerate(sites.values(), 1)]


def plan_round(node_configs, out_dir, client=client_app, **changes):
    config = RunConfig(plan_round=True, out_dir=str(out_dir), node_wait_timeout=0.0, **changes)
    return run_inprocess(config.to_run_config(), node_configs, client_app=client)


class Recorder:
    """The real ClientApp; records each message type it answered and, for chosen site keys, rewrites the
    fingerprint reply after the site's own check (what a modified or hostile site could send)."""

    def __init__(self, tamper=None, keys: set[int] = frozenset()):
        self.tamper, self.keys = tamper, keys
        self.seen: list[tuple[str, int, Message]] = []  # (message type, node id, reply)

    def __call__(self, message: Message, context: Context) -> Message:
        reply = client_app(message, context)
        kind = message.metadata.message_type
        if self.tamper and kind == FINGERPRINT_MESSAGE_TYPE and context.node_config.get("site-id") in self.keys:
            data = reply.content.config_records[FINGERPRINT_RECORD][FINGERPRINT_KEY]
            reply = Message(RecordDict({FINGERPRINT_RECORD: ConfigRecord({FINGERPRINT_KEY: self.tamper(data)})}),
                            reply_to=message)
        self.seen.append((kind, context.node_id, reply))
        return reply


def node_of(run, key: int) -> int:
    return next(n for n, node in run.grid.nodes.items() if node.context.node_config.get("site-id") == key)


def test_the_plan_round_writes_the_plan_fedmeta_plan_makes_and_trains_nothing(sites, tmp_path, caplog):
    out = tmp_path / "run"
    recorder = Recorder()
    with caplog.at_level(logging.INFO, logger=SERVER_LOG):
        run = plan_round(deployed_nodes(sites), out, client=recorder, round_deadline=30.0)

    # Nothing trained: only the role query and the fingerprint query went out, and no round left a file.
    assert sorted({kind for kind, _, _ in recorder.seen}) == ["query", FINGERPRINT_MESSAGE_TYPE]
    assert not (out / CHECKPOINT_NAME).exists() and not (out / METRICS_NAME).exists()
    # What left each site: one ConfigRecord holding one bytes value, naming no case, file, folder or dataset.
    for kind, _, reply in recorder.seen:
        if kind == FINGERPRINT_MESSAGE_TYPE:
            assert set(reply.content.keys()) == {FINGERPRINT_RECORD}
            [(key, data)] = reply.content.config_records[FINGERPRINT_RECORD].items()
            assert key == FINGERPRINT_KEY and isinstance(data, bytes)
            for word in (CASE_PREFIX, SITE_NAME, "hospital-", str(tmp_path), "nii", "imagesTr"):
                assert word.encode() not in data, word

    reference = tmp_path / "reference"
    assert main(["plan", "--sites", str(sites["hospital-a"]), str(sites["hospital-b"]), "--out", str(reference),
                 "--quiet"]) == 0
    deployed_config = tomllib.loads((out / "run-config.toml").read_text())
    reference_config = tomllib.loads((reference / "run-config.toml").read_text())
    # The same planned values. plan-sha256 differs, rightly: the coordinator names sites by their order key
    # (site-1, site-2), `fedmeta plan` by their folders, and the names are in plan.json and its reasons.
    assert {k: deployed_config[k] for k in RUN_CONFIG_KEYS} == {k: reference_config[k] for k in RUN_CONFIG_KEYS}
    # With the names swapped, plan.json is byte for byte the one `fedmeta plan` wrote: the same merge, the same
    # reasons, the same canonical JSON.
    deployed_plan = (out / "plan.json").read_text()
    renamed = (reference / "plan.json").read_text().replace("hospital-a", "site-1").replace("hospital-b", "site-2")
    assert deployed_plan == renamed and list(json.loads(deployed_plan)["sites"]) == ["site-1", "site-2"]
    assert deployed_config["plan-sha256"] == hashlib.sha256(renamed.encode()).hexdigest() != \
        reference_config["plan-sha256"]
    # Beside the plan, the run's own settings (Flower takes a file or key=value pairs, not both), plan-round off:
    # the file alone starts the training run under the plan, in the same out-dir.
    assert deployed_config["out-dir"] == str(out) and deployed_config["round-deadline"] == 30.0
    assert "plan-round" not in deployed_config
    flower_reads = parse_config_args([str(out / "run-config.toml")])  # as `flwr run --run-config FILE` reads it
    assert flower_reads == deployed_config
    trained = RunConfig.from_run_config(flower_reads)
    assert not trained.plan_round and trained.plan_sha256 == deployed_config["plan-sha256"]
    assert trained.trajectory_hash() != trained.replace(plan_sha256="").trajectory_hash()

    # The operator's log (`flwr log`): one line per site, by node id and site key, then the plan and the files.
    lines = [r.getMessage() for r in caplog.records if r.name == SERVER_LOG]
    for key in (1, 2):
        [line] = [m for m in lines if f"node {node_of(run, key)} (site key {key}) as site-{key}: 2 case(s)" in m]
        assert "channels CT" in line
    assert any(m.startswith("plan round: plan from 2 site(s)") for m in lines)
    assert any("nothing was trained" in m and "--run-config" in m for m in lines)


def _with(**changes):
    def tamper(data: bytes) -> bytes:
        report = json.loads(data)
        for path, value in changes.items():
            *parents, last = path.split("/")
            target = report
            for key in parents:
                target = target[int(key) if isinstance(target, list) else key]
            target[last] = value
        return json.dumps(report).encode()
    return tamper


VOXELS = [[float(v) for v in row] for row in ct_volumes(1, seed=9)[0][0][:, :, 2]]  # a slice of a scan: 24 x 20


@pytest.mark.parametrize("tamper, named", [
    pytest.param(_with(voxels=VOXELS), "fingerprint field voxels", id="an extra key holding a voxel array"),
    pytest.param(_with(**{"spacing-mm/min": [0.001, 0.7, 3.0]}), "fingerprint field spacing-mm.min[0]",
                 id="an out-of-range statistic"),
    pytest.param(_with(**{"intensity/0/quantiles": list(range(100_000))}), "fingerprint field intensity[0].quantiles",
                 id="a voxel dump in place of the quantiles"),
    pytest.param(lambda data: data[:-1] + b', "padding": "' + b"x" * (2 << 20) + b'"}',
                 "at most 1,048,576 bytes of JSON", id="two megabytes"),
    pytest.param(lambda data: data.replace(b'"cases":2', b'"cases":NaN'), "strict UTF-8 JSON", id="NaN"),
    pytest.param(lambda data: data[:-1] + b', "cases": 900}', "appears twice", id="a key twice"),
    pytest.param(lambda data: b"\x00\xff" + data, "strict UTF-8 JSON", id="not UTF-8"),
    # well-formed, but a site that cannot take part: left out, not the end of the round
    pytest.param(_with(cases=1), "only 1 usable case(s)", id="one case"),
])
def test_a_tampered_fingerprint_is_refused_and_named_and_the_plan_is_made_from_the_quorum(sites, tmp_path, caplog,
                                                                                          tamper, named):
    out = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger=SERVER_LOG):
        run = plan_round(deployed_nodes(sites), out, client=Recorder(tamper, keys={2}))  # round-quorum 0.5: 1 of 2
    bad = node_of(run, 2)
    lines = [r.getMessage() for r in caplog.records]
    [refusal] = [m for m in lines if f"node {bad} (site key 2) is not in the plan" in m]
    assert named in refusal and "refused" in refusal, refusal
    assert len(refusal) < 500 and "\n" not in refusal  # a hostile site's bytes never flood or forge the log
    plan = json.loads((out / "plan.json").read_text())
    assert list(plan["sites"]) == ["site-1"]
    alone = merge_fingerprints({"site-1": site_fingerprint(sites["hospital-a"], limits=ReadLimits())})
    assert plan["run-config"] == alone["run-config"]
    assert not (out / CHECKPOINT_NAME).exists()


def _bad_spacing(real):
    def fingerprint(root, **kwargs):
        report = real(root, **kwargs)
        if root.name == "hospital-b":
            report["spacing-mm"]["min"][0] = 0.001
        return report
    return fingerprint


def _unreadable(real):
    def fingerprint(root, **kwargs):
        if root.name == "hospital-b":
            raise ValueError(f"site {root}: none of its listed case(s) is usable")  # names the folder: stays local
        return real(root, **kwargs)
    return fingerprint


@pytest.mark.parametrize("fault, reason", [
    (_bad_spacing, "the site's fingerprint fails the coordinator's check"),
    (_unreadable, "fingerprint failed at the site with ValueError"),
], ids=["its own check refuses it", "its data cannot be read"])
def test_a_site_that_cannot_send_a_usable_fingerprint_answers_an_error_and_the_plan_goes_on(sites, tmp_path, caplog,
                                                                                            monkeypatch, fault, reason):
    import fedmeta.client.app as client_module

    monkeypatch.setattr(client_module, "site_fingerprint", fault(client_module.site_fingerprint))
    recorder = Recorder()
    with caplog.at_level(logging.INFO, logger=SERVER_LOG):
        run = plan_round(deployed_nodes(sites), tmp_path / "run", client=recorder)
    bad = node_of(run, 2)
    [reply] = [r for kind, node, r in recorder.seen if kind == FINGERPRINT_MESSAGE_TYPE and node == bad]
    assert reply.has_error() and reason in reply.error.reason
    assert "hospital-b" not in reply.error.reason  # what names the site's folder stays in its own log
    assert any(f"node {bad} (site key 2) is not in the plan: refused: site failed" in r.getMessage() and
               reason in r.getMessage() for r in caplog.records)
    assert list(json.loads((tmp_path / "run" / "plan.json").read_text())["sites"]) == ["site-1"]


def test_fewer_usable_fingerprints_than_the_quorum_write_no_plan_and_say_which_node_failed(sites, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(PlanRoundFailed) as failed:  # round-quorum 1: every site must send a usable fingerprint
        plan_round(deployed_nodes(sites), out, client=Recorder(_with(cases=-1), keys={2}), round_quorum=1.0)
    message = str(failed.value)
    assert "1 of 2 training site(s)" in message and "quorum of 2" in message and "fingerprint field cases" in message
    assert "lower round-quorum" in message
    assert not (out / "plan.json").exists()


def test_a_plan_round_never_replaces_a_plan_a_run_trained_under_but_replaces_its_own(sites, tmp_path):
    out = tmp_path / "run"
    plan_round(deployed_nodes(sites), out)
    first = (out / "plan.json").read_bytes()
    plan_round(deployed_nodes(sites), out)  # asked again: its own unchanged files are replaced
    assert (out / "plan.json").read_bytes() == first
    (out / "plan.json").write_text("{}")  # edited by hand: kept
    with pytest.raises(OutputRefused, match="changed since"):
        plan_round(deployed_nodes(sites), out)
    (out / CHECKPOINT_NAME).write_bytes(b"trained")
    with pytest.raises(PlanRoundFailed, match="new out-dir"):
        plan_round(deployed_nodes(sites), out)


def test_a_simulated_federation_fingerprints_its_training_sites_only(smoke_federation, tmp_path):
    from fedmeta.common.synth import load_manifest

    manifest = load_manifest(smoke_federation)
    training, heldout = len(manifest.train_sites), len(manifest.heldout_sites)
    recorder = Recorder()
    out = tmp_path / "run"
    run = plan_round(simulation_node_configs(training + heldout), out, client=recorder,
                     federation_dir=str(smoke_federation))
    asked = {node for kind, node, _ in recorder.seen if kind == FINGERPRINT_MESSAGE_TYPE}
    partitions = {int(run.grid.nodes[n].context.node_config["partition-id"]) for n in asked}
    assert partitions == set(range(training))  # the held-out sites (the last partitions) are never asked
    plan = json.loads((out / "plan.json").read_text())
    assert list(plan["sites"]) == [f"site-{i}" for i in range(training)]
    assert plan["run-config"]["in-channels"] == 1
    assert tomllib.loads((out / "run-config.toml").read_text())["federation-dir"] == str(smoke_federation)

