"""fedmeta's ClientApp: a hospital site. Its images never leave; only parameter-shaped arrays and
scalar metrics do.

- ``query``: answers whether this site trains or is held out (a 0/1 flag) and its stable order key.
- ``train``: the site's part of the round, ``fedmeta.common.federated_round.site_update``: seeded
  episodes from its patients, then their meta-gradient.
- ``evaluate``: k-shot adaptation from θ and Dice on the site's other patients, through
  ``fedmeta.common.adaptation.adaptation_curve`` — the same inner step the training uses.
- ``query.fingerprint`` (a plan round, run config ``plan-round``): a training site's aggregate statistics
  (``fedmeta.common.fingerprint``, docs/planning.md), checked here as the coordinator will check them.

A handler that fails replies with an Error naming only the exception type; the details (which may
name files or patients) stay in the site's own log.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from pathlib import Path

import torch
from flwr.app import ConfigRecord, Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode

from fedmeta.client import secure_aggregation
from fedmeta.client.floor import floor_problem
from fedmeta.client.privacy import private_reply
from fedmeta.client.site import SiteCache, SiteRef, resolve_site
from fedmeta.client.site_metrics import METRICS_DIR_KEY, record_message
from fedmeta.common.config import RunConfig
from fedmeta.common.data import site_seed
from fedmeta.common.devices import pick_device
from fedmeta.common.federated_round import site_evaluation, site_update
from fedmeta.common.fingerprint import encode_fingerprint, site_fingerprint
from fedmeta.common.protocol import (
    CONFIG_RECORD, EVAL_SEED_KEY, FEDMETA_VERSION_KEY, FINGERPRINT_ACTION, FINGERPRINT_KEY, FINGERPRINT_RECORD,
    GRADS_RECORD, MASKED_RECORD, METRICS_RECORD,
    NUM_EXAMPLES, PARAMS_RECORD, PROTOCOL_VERSION, PROTOCOL_VERSION_KEY, QUERY_LOSS_AFTER, QUERY_LOSS_BEFORE,
    ROLE_HELDOUT, ROLE_METRIC, ROLE_TRAIN, ROUND_KEY, ROUND_SEED_KEY, SECAGG_KEYS_ACTION,
    SECAGG_RECORD, SECAGG_REFUSED, SECAGG_SHARES_ACTION, SECAGG_UNMASK_ACTION, SECONDS, SITE_KEY_METRIC,
    SUPPORT_LOSS_AFTER, SUPPORT_LOSS_BEFORE, TRAIN_SLICES, dice_key,
    fedmeta_version, worst_patient_key,
)
from fedmeta.common.read_limits import ReadLimits
from fedmeta.common.records import from_array_record, split_params, to_array_record, to_metric_record

log = logging.getLogger("fedmeta.client")


def site_reply_errors(handler):
    """Turns an exception into an Error reply that names its type only (a version mismatch: both versions);
    the traceback is logged here."""

    @functools.wraps(handler)
    def wrapper(message: Message, context: Context) -> Message:
        began = time.perf_counter()
        try:
            reply = handler(message, context)
        except VersionMismatch as err:  # versions are no secret: the server's operator needs both
            log.error("%s refused on node %s: %s", handler.__name__, context.node_id, err)
            reason = str(err)
        except FingerprintRefused as err:  # its own words, written to name no file or value of the site
            log.error("%s refused on node %s: %s", handler.__name__, context.node_id, err)
            reason = str(err)
        except secure_aggregation.SecAggError as err:  # names node ids and counts, never the site's data
            log.error("%s refused on node %s: %s", handler.__name__, context.node_id, err)
            reason = f"{SECAGG_REFUSED}: {err}"
        except Exception as err:  # the federation must hear of it, without the site's file names
            log.exception("%s failed on node %s", handler.__name__, context.node_id)
            reason = f"{handler.__name__} failed at the site with {type(err).__name__}; details are in the site's log"
        else:
            _record(context, handler.__name__, True, time.perf_counter() - began)
            return reply
        _record(context, handler.__name__, False, time.perf_counter() - began)
        return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=message)

    return wrapper


def _record(context: Context, kind: str, ok: bool, seconds: float) -> None:
    """The site's own metrics (node config metrics-dir; ``fedmeta.client.site_metrics``)."""
    if not context.node_config.get(METRICS_DIR_KEY):
        return
    episodes, device = 0, ""
    try:
        config = RunConfig.from_run_config(context.run_config)
        episodes = config.episodes_per_site if kind == "train" and ok else 0
        device = str(pick_device(config.device, "run config device")) if kind != "query" else ""
    except (ValueError, RuntimeError) as err:  # a run config the handler already refused (and its reply named)
        log.warning("site metrics of %s on node %s have no episodes or device: %s", kind, context.node_id, err)
    record_message(context.node_config, kind, ok=ok, seconds=seconds, episodes=episodes, device=device)


# Loaded sites and built models, for the life of this process. A module global on purpose: Flower's
# Simulation Engine pickles the ClientApp into its Ray actors on every call, so state held by the app
# object (or a closure) would arrive empty each time; a module's globals live as long as the actor.
# Tests reset it with ``sites.clear()``.
sites = SiteCache()
# The app Flower loads (pyproject: clientapp = "fedmeta.client.app:app").
app = ClientApp()


@app.query()
@site_reply_errors
def query(message: Message, context: Context) -> Message:
    check_versions(message)
    config = RunConfig.from_run_config(context.run_config)
    ref = resolve_site(context.node_config, config, _fedmeta_home())
    metrics = to_metric_record(
        {ROLE_METRIC: int(ref.role == ROLE_HELDOUT), SITE_KEY_METRIC: ref.key, PROTOCOL_VERSION_KEY: PROTOCOL_VERSION}
    )
    return Message(RecordDict({METRICS_RECORD: metrics}), reply_to=message)


@app.query(FINGERPRINT_ACTION)
@site_reply_errors
def fingerprint(message: Message, context: Context) -> Message:
    """The site's fingerprint, for the plan round: declared aggregates only, as one bytes value of strict JSON."""
    check_versions(message)
    ref = resolve_site(context.node_config, RunConfig.from_run_config(context.run_config), _fedmeta_home())
    if ref.role != ROLE_TRAIN:
        raise PermissionError("a held-out site is never fingerprinted: a new hospital's data never shapes the plan")
    if ref.materialise is not None:  # a lazy simulated site renders its folder before its data is first read
        ref.materialise()
    report = site_fingerprint(ref.data_dir, limits=ReadLimits.from_environment())
    try:
        data = encode_fingerprint(report)  # the coordinator's own check: a site never sends what it would refuse
    except ValueError as err:  # the details may quote the site's dataset.json: they stay in its log
        log.error("the fingerprint of %s is refused by the coordinator's check, so it is not sent: %s", ref.data_dir,
                  err)
        raise FingerprintRefused(
            "the site's fingerprint fails the coordinator's check (a value in its dataset.json or scans is out of "
            "range), so the site does not send it; the site's log names the field, and `fedmeta check-data` its "
            "scans' problems") from None
    return Message(RecordDict({FINGERPRINT_RECORD: ConfigRecord({FINGERPRINT_KEY: data})}), reply_to=message)


@app.train()
@site_reply_errors
def train(message: Message, context: Context) -> Message:
    began = time.perf_counter()
    config, ref, device = _setup(message, context)
    if ref.role != ROLE_TRAIN:
        raise PermissionError("a held-out site never trains: it plays the new hospital")
    _check_floor(config, context)
    site = sites.site(ref, config, ReadLimits.from_environment())
    model = sites.model(config, device)
    params, step_sizes = _received_params(message, config, device)
    round_config = message.content.config_records[CONFIG_RECORD]
    round_seed = int(round_config[ROUND_SEED_KEY])
    seed = secure_aggregation.episode_seed(message, context, site_seed(round_seed, site.name))
    grads, stats = site_update(
        model, params, step_sizes, site, config, n_episodes=config.episodes_per_site,
        seed=seed, server_round=int(round_config[ROUND_KEY]), device=device,
    )
    grads = private_reply(message, context, config, grads, seed)  # local DP's clip and noise; else grads unchanged
    metrics = {
        NUM_EXAMPLES: int(stats["num_examples"]),
        SUPPORT_LOSS_BEFORE: stats["support_loss_before"],
        SUPPORT_LOSS_AFTER: stats["support_loss_after"],
        QUERY_LOSS_BEFORE: stats["query_loss_before"],
        QUERY_LOSS_AFTER: stats["query_loss_after"],
        SECONDS: time.perf_counter() - began,
    }
    if config.weighting == "data":  # the site's weight (FedAvg's n_k); not sent when the server has no use for it
        metrics[TRAIN_SLICES] = site.num_slices
    if config.secure_aggregation != "none" and SECAGG_RECORD not in message.content.config_records:
        raise PermissionError("the run uses secure aggregation but this train message skips it; refusing to send "
                              "an unmasked reply")
    if SECAGG_RECORD in message.content.config_records:  # secure aggregation: the server sees only masked integers
        records = {MASKED_RECORD: secure_aggregation.masked_reply(message, context, config, grads, seed)}
    else:
        records = {GRADS_RECORD: to_array_record(grads)}
    return Message(RecordDict({**records, METRICS_RECORD: to_metric_record(metrics)}), reply_to=message)


# SecAgg+'s stages around the train message (fedmeta.client.secure_aggregation): key exchange, shares, unmasking.
@app.train(SECAGG_KEYS_ACTION)
@site_reply_errors
def secagg_keys(message: Message, context: Context) -> Message:
    _training_site(message, context)
    return secure_aggregation.keys(message, context)


@app.train(SECAGG_SHARES_ACTION)
@site_reply_errors
def secagg_shares(message: Message, context: Context) -> Message:
    return secure_aggregation.shares(message, context, _training_site(message, context))


@app.train(SECAGG_UNMASK_ACTION)
@site_reply_errors
def secagg_unmask(message: Message, context: Context) -> Message:
    return secure_aggregation.unmask(message, context, _training_site(message, context))


def _training_site(message: Message, context: Context) -> RunConfig:
    config, ref, _device = _setup(message, context)
    if ref.role != ROLE_TRAIN:
        raise PermissionError("a held-out site never trains: it plays the new hospital")
    if config.secure_aggregation == "none":
        raise PermissionError("the run config has secure-aggregation='none'; this site takes no part in SecAgg")
    _check_floor(config, context)
    return config


def _check_floor(config: RunConfig, context: Context) -> None:
    """Refuses a run below the site's own privacy floor (its node config: ``fedmeta.client.floor``)."""
    problem = floor_problem(config, context.node_config)
    if problem:
        raise secure_aggregation.SecAggError(f"the run is below this site's privacy floor (node config): {problem}")


@app.evaluate()
@site_reply_errors
def evaluate(message: Message, context: Context) -> Message:
    began = time.perf_counter()
    config, ref, device = _setup(message, context)
    site = sites.site(ref, config, ReadLimits.from_environment())  # the operator's limits, read at the app's edge
    model = sites.model(config, device)
    params, step_sizes = _received_params(message, config, device)
    eval_seed = int(message.content.config_records[CONFIG_RECORD][EVAL_SEED_KEY])
    curve, patients = site_evaluation(model, params, step_sizes, site, config, seed=eval_seed, device=device)
    # Per-patient Dice in the site's own labels: the mean over patients and the worst patient only
    # (patient ids stay at the site).
    metrics = {dice_key(steps): float(result["dice"]) for steps, result in curve.items()}
    metrics.update({worst_patient_key(steps): float(result["worst_patient_dice"]) for steps, result in curve.items()})
    metrics[NUM_EXAMPLES] = patients
    metrics[SECONDS] = time.perf_counter() - began
    return Message(RecordDict({METRICS_RECORD: to_metric_record(metrics)}), reply_to=message)


class VersionMismatch(ValueError):
    """The server speaks another wire protocol: the reply names both versions."""


class FingerprintRefused(ValueError):
    """The site's own fingerprint fails the coordinator's check: it is not sent, and the reply says why."""


def check_versions(message: Message) -> None:
    """Refuses a message of another wire-protocol version, naming both sides' protocol and release."""
    record = message.content.config_records.get(CONFIG_RECORD) if message.has_content() else None
    theirs = record.get(PROTOCOL_VERSION_KEY) if record is not None else None
    if theirs != PROTOCOL_VERSION:
        release = record.get(FEDMETA_VERSION_KEY, "unknown") if record is not None else "unknown"
        raise VersionMismatch(
            f"version mismatch: the server runs fedmeta {release} (protocol {theirs}), this site fedmeta "
            f"{fedmeta_version()} (protocol {PROTOCOL_VERSION}); install the same fedmeta release at both."
        )


def _setup(message: Message, context: Context) -> tuple[RunConfig, SiteRef, torch.device]:
    check_versions(message)
    config = RunConfig.from_run_config(context.run_config)
    ref = resolve_site(context.node_config, config, _fedmeta_home())
    return config, ref, pick_device(config.device, "run config device")


def _fedmeta_home() -> Path | None:
    """``$FEDMETA_HOME``: where a deployed site keeps what it keeps between runs (its order key); None: the
    default, ``~/.cache/fedmeta``. Read per message, here at the app's edge only."""
    return Path(home) if (home := os.environ.get("FEDMETA_HOME")) else None


def _received_params(message: Message, config: RunConfig, device: torch.device):
    params, step_sizes = split_params(from_array_record(message.content.array_records[PARAMS_RECORD], device))
    if config.algorithm_object.learns_step_sizes and step_sizes is None:
        raise ValueError(f"algorithm {config.algorithm} needs the server's step sizes (lr.<name> arrays); none arrived")
    return params, step_sizes
