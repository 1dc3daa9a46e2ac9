"""The plan round (run config ``plan-round = true``): a deployment's federation planned from its sites' fingerprints.

``fedmeta plan --sites`` plans a simulation from folders it can read. In a deployment only the sites read their
data, so the ServerApp asks every *training* site for its fingerprint instead (aggregate statistics only:
``fedmeta.common.fingerprint``, docs/planning.md); held-out sites play new hospitals and are never asked, as
``fedmeta plan --heldout`` never reads them. The question goes out like a training round (``fedmeta.server.rounds``:
the sites in the federation now, ``round-deadline`` once ``round-quorum`` answered, ``round-timeout`` at most), and
every reply is checked before it is read (:func:`fedmeta.common.fingerprint.decode_fingerprint`: its size first,
then strict JSON, then :func:`~fedmeta.common.fingerprint.check_fingerprint`). A malformed, oversized or
out-of-range reply is refused and logged with its node id; it never stops the round. From the usable ones, once
a quorum sent them, :func:`fedmeta.common.plan.merge_fingerprints` makes the plan exactly as ``fedmeta plan`` does.
plan.json and run-config.toml go into the run's out-dir, and the run ends: nothing is trained.

In the plan, a site is named by its order key (``site-<key>``: the node config's site-id, or the random key a site
keeps; the partition id when simulated). Node ids change when a SuperNode connects again, and the coordinator knows
no site's path or name.

run-config.toml holds the plan's keys and then the run's own settings (every key the plan round ran with that
differs from its default, ``plan-round`` excepted). This is because ``flwr run --run-config FILE`` takes no
``key=value`` beside a file (Flower 1.41 refuses "TOML files cannot be passed alongside key-value pairs"). So
``flwr run . <connection> --run-config OUT/run-config.toml`` trains under the plan with the same out-dir, sites and
deadlines; operators edit the file first to change anything else, such as num-rounds.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from fedmeta.common.checkpoint import CHECKPOINT_NAME
from fedmeta.common.config import RunConfig
from fedmeta.common.fingerprint import decode_fingerprint
from fedmeta.common.outputs import Outputs
from fedmeta.common.plan import PLAN_FILE, RUN_CONFIG_FILE, RUN_CONFIG_KEYS, format_plan, merge_fingerprints, \
    plan_bytes, run_config_toml, site_problem
from fedmeta.common.protocol import (
    CONFIG_RECORD, FINGERPRINT_KEY, FINGERPRINT_MESSAGE_TYPE, FINGERPRINT_RECORD, ROUND_KEY, version_stamp,
)
from fedmeta.server.coordinator import InvalidReply, content_of
from fedmeta.server.rounds import Membership, collect, wait_for_training_sites

log = logging.getLogger("fedmeta.server")

PLAN_ROUND = "plan-round"  # the command named in out-dir's journal (fedmeta.common.outputs) for the files it writes
# The budget `fedmeta plan` also uses by default (its --max-image-size): pixels a side of a 2D slice.
MAX_IMAGE_SIZE = 256
_SHOWN = 300  # characters of a refusal in the log: a hostile site's text never floods the operator's log
_LISTED = 10  # refused nodes the failure's own message names; the log has a line for each


class PlanRoundFailed(RuntimeError):
    """The plan round could not make a plan: too few usable fingerprints, or sites that cannot train one model."""


@dataclass
class PlanRound:
    """What one plan round asked and heard: per node its site key, and either its fingerprint or why not."""

    keys: dict[int, int]  # node -> site key, in site order
    reports: dict[int, dict[str, Any]] = field(default_factory=dict)  # node -> checked fingerprint
    refused: dict[int, str] = field(default_factory=dict)  # node -> why its reply (or its silence) was not used

    def site_names(self) -> dict[int, str]:
        """node -> its name in the plan: ``site-<key>``, or ``site-<key>-node-<node>`` when two sites share a key."""
        shared = {key for key in self.keys.values() if list(self.keys.values()).count(key) > 1}
        return {node: f"site-{key}" + (f"-node-{node}" if key in shared else "") for node, key in self.keys.items()}


def run_plan_round(grid: Grid, config: RunConfig, out_dir: Path) -> dict[str, Any]:
    """Asks the training sites for their fingerprints, writes the plan into ``out_dir`` and returns it; trains
    nothing. :class:`PlanRoundFailed` when fewer than the quorum sent usable fingerprints or they cannot be merged."""
    outputs = Outputs(out_dir, PLAN_ROUND, option="run config out-dir")
    _check_out_dir(out_dir, outputs)  # before any site is asked: a plan that cannot be written is not asked for
    membership = Membership(config)
    nodes = wait_for_training_sites(grid, membership, config, settle=True)
    if membership.heldout():
        log.info("plan round: %d held-out site(s) not asked: a new hospital's data never shapes the plan",
                 len(membership.heldout()))
    asked = ask_for_fingerprints(grid, config, {node: membership.sites[node].key for node in nodes})
    names = asked.site_names()
    for node in asked.keys:
        _log_site(node, asked, names[node])
    quorum = config.quorum(len(nodes))
    if len(asked.reports) < quorum:
        listed = list(asked.refused.items())
        silent = "; ".join(f"node {n}: {_shown(why)}" for n, why in listed[:_LISTED])
        if len(listed) > _LISTED:
            silent += f"; and {len(listed) - _LISTED} more (the lines above name each)"
        raise PlanRoundFailed(
            f"plan round: {len(asked.reports)} of {len(nodes)} training site(s) sent a usable fingerprint, fewer than "
            f"the quorum of {quorum} (round-quorum={config.round_quorum:g}, min-sites={config.min_sites}); no plan was "
            f"written. Not used: {silent}. Fix those sites (their data, or their fedmeta release), or lower "
            "round-quorum, and run the plan round again.")
    reports = {names[node]: report for node, report in asked.reports.items()}
    try:
        plan = merge_fingerprints(reports, max_image_size=MAX_IMAGE_SIZE, model_levels=config.model_levels)
        text = run_config_toml(plan, usage="flwr run . <connection> --run-config run-config.toml (every key of the run "
                               "is in this file: Flower takes no key=value beside a file)",
                               run_keys=_run_keys(config))
        _check_training_config(plan, config)
    except ValueError as err:
        raise PlanRoundFailed(f"plan round: the fingerprints of {', '.join(reports)} make no plan: {err} No plan was "
                              "written.") from None
    for line in format_plan(plan).splitlines():
        log.info("plan round: %s", _ascii(line))
    outputs.claim([PLAN_FILE, RUN_CONFIG_FILE], overwrite=True)
    plan_path = outputs.write_bytes(PLAN_FILE, plan_bytes(plan))
    config_path = outputs.write_text(RUN_CONFIG_FILE, text)
    log.info("plan round: wrote %s and %s from %d of %d training site(s); nothing was trained. Train under this "
             "plan with: flwr run . <connection> --run-config %s", plan_path, config_path, len(reports), len(nodes),
             config_path)
    return plan


def ask_for_fingerprints(grid: Grid, config: RunConfig, keys: dict[int, int]) -> PlanRound:
    """Sends the fingerprint query to ``keys``' nodes and checks each reply as it arrives (the round closes as a
    training round does, counting usable fingerprints towards the quorum)."""
    asked = PlanRound(keys=dict(keys))
    request = RecordDict({CONFIG_RECORD: ConfigRecord({ROUND_KEY: 0, **version_stamp()})})
    messages = [Message(request, node, FINGERPRINT_MESSAGE_TYPE, ttl=config.round_timeout, group_id="plan")
                for node in keys]
    verdicts: dict[int, tuple[dict[str, Any] | None, str]] = {}

    def usable(reply: Message) -> bool:  # collect() asks as each reply arrives; the verdict is kept for below
        report, problem = _read_reply(reply)
        # A site that cannot take part (one case, a "CT" not in HU) is left out of the plan like a malformed reply,
        # and does not count towards the quorum: one site never stops the round, nor moves the window.
        if report is not None and (problem := site_problem(f"node {reply.metadata.src_node_id}", report) or ""):
            report = None
        verdicts[id(reply)] = report, problem
        return report is not None

    collected = collect(grid, messages, quorum=config.quorum(len(keys)), deadline=config.round_deadline,
                        timeout=config.round_timeout, counts=usable)
    for node, reply in collected.replies:
        report, problem = verdicts[id(reply)]  # every reply collect() keeps was counted, so checked, on arrival
        if report is not None:
            asked.reports[node] = report
        else:
            asked.refused[node] = f"refused: {problem}"
    for node, why in collected.gone.items():
        asked.refused[node] = f"sent no fingerprint: {why}"
    closed = {"deadline": f"round-deadline={config.round_deadline:g}s (the quorum had answered)",
              "timeout": f"round-timeout={config.round_timeout:g}s"}.get(collected.closed_by, "the close")
    for node in collected.outstanding.values():
        asked.refused[node] = f"sent no fingerprint by {closed}"
    return asked


def _read_reply(reply: Message) -> tuple[dict[str, Any] | None, str]:
    """(the checked fingerprint, "") or (None, why the reply is refused)."""
    try:
        content = content_of(reply, {FINGERPRINT_RECORD})  # an error reply, an empty one, or records not asked for
    except InvalidReply as err:
        return None, str(err)
    record = content.config_records.get(FINGERPRINT_RECORD)
    if record is None or list(record.keys()) != [FINGERPRINT_KEY]:
        held = sorted(record.keys())[:5] if record is not None else "no ConfigRecord"
        return None, (f"its reply holds {held}, not one ConfigRecord {FINGERPRINT_RECORD!r} with the one key "
                      f"{FINGERPRINT_KEY!r}")
    try:
        return decode_fingerprint(record[FINGERPRINT_KEY]), ""
    except ValueError as err:
        return None, str(err)


def _log_site(node: int, asked: PlanRound, name: str) -> None:
    """One line per site asked: what its fingerprint says in brief, or why it is not in the plan."""
    key = asked.keys[node]
    report = asked.reports.get(node)
    if report is None:
        log.warning("plan round: node %d (site key %d) is not in the plan: %s", node, key,
                    _shown(asked.refused.get(node, "no reply")))
        return
    spacing = "x".join(f"{v:.3g}" for v in report["spacing-mm"]["median"])
    field_of_view = "x".join(f"{v:.0f}" for v in report["field-of-view-mm"])
    channels = ", ".join(report["channels"]) or "one undeclared"
    labels = len(report["labels"]) if report["labels"] is not None else len(report["label-fractions"])
    log.info("plan round: node %d (site key %d) as %s: %d case(s) (%d skipped), channels %s, %d label value(s), "
             "median spacing %s mm, median field of view %s mm", node, key, name, report["cases"],
             report["cases-skipped"], _ascii(channels), labels, spacing, field_of_view)


def _run_keys(config: RunConfig) -> dict[str, Any]:
    """The run's own settings for training under the plan: every key that differs from its default, less the
    plan's keys and plan-round (a run started from the file trains)."""
    defaults = RunConfig().to_run_config()
    planned = {*RUN_CONFIG_KEYS, "plan-sha256", "plan-round"}
    return {key: value for key, value in config.to_run_config().items()
            if key not in planned and value != defaults[key]}


def _check_training_config(plan: dict[str, Any], config: RunConfig) -> None:
    """The run config a training run would get from run-config.toml must be valid (e.g. the planned image size
    with this run's model-levels); a ValueError naming the key otherwise."""
    RunConfig.from_run_config({**config.to_run_config(), **plan["run-config"], "plan-round": False})


def _check_out_dir(out_dir: Path, outputs: Outputs) -> None:
    """Refuses an out-dir whose plan a run already trained under, and files plan-round did not write."""
    if (out_dir / CHECKPOINT_NAME).exists():
        raise PlanRoundFailed(
            f"run config out-dir={str(out_dir)!r} holds {CHECKPOINT_NAME}, a run trained under the plan there; a plan "
            "round never replaces it. Give the plan round a new out-dir.")
    # A plan round run again in the same out-dir replaces its own earlier plan (the ServerApp has no --overwrite);
    # never a plan.json it did not write or one edited since.
    outputs.check([PLAN_FILE, RUN_CONFIG_FILE], overwrite=True)


def _ascii(text: str) -> str:
    """A line for the run's log, which must be ASCII (a ServerApp's stdout may not encode more)."""
    return text.encode("ascii", "backslashreplace").decode("ascii")


def _shown(text: str) -> str:
    text = _ascii(" ".join(str(text).split()))  # one line: a site's text never forges another log line
    return text if len(text) <= _SHOWN else text[:_SHOWN - 3] + "..."


__all__ = ["MAX_IMAGE_SIZE", "PLAN_ROUND", "PlanRound", "PlanRoundFailed", "ask_for_fingerprints", "run_plan_round"]
