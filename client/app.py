"""fedmeta's ClientApp: a hospital site. Its images never leave; only parameter-shaped arrays and
scalar metrics do.

- ``query``: answers whether this site trains or is held out (a 0/1 flag) and its stable order key.
- ``train``: samples episodes from the site's patients and replies with ``common.meta.meta_gradient``.
- ``evaluate``: k-shot adaptation from θ and Dice on the site's other patients, through
  ``common.evaluation.adaptation_curve`` — the same inner step the training uses.

A handler that fails replies with an Error naming only the exception type; the details (which may
name files or patients) stay in the site's own log.
"""

from __future__ import annotations

import functools
import logging
import time

import torch
from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode

from common.config import RunConfig
from common.data import adaptation_split, sample_episodes, site_seed
from common.evaluation import adaptation_curve
from common.losses import DiceCELoss, one_hot
from common.meta import meta_gradient
from common.model import head_parameter_names
from common.records import from_array_record, split_params, to_array_record, to_metric_record
from client.site import SiteCache, SiteRef, evaluation_subset, pick_device, resolve_site

log = logging.getLogger("fedmeta.client")

# Record names on the wire, shared by convention with server/strategy.py.
PARAMS_RECORD = "arrays"
CONFIG_RECORD = "config"
GRADS_RECORD = "meta-grads"
METRICS_RECORD = "metrics"

app = ClientApp()
sites = SiteCache()  # the app's per-process cache of loaded sites and models


def site_reply_errors(handler):
    """Turns an exception into an Error reply that names its type only; the traceback is logged here."""

    @functools.wraps(handler)
    def wrapper(message: Message, context: Context) -> Message:
        try:
            return handler(message, context)
        except Exception as err:  # the federation must hear of it, without the site's file names
            log.exception("%s failed on node %s", handler.__name__, context.node_id)
            reason = f"{handler.__name__} failed at the site with {type(err).__name__}; details are in the site's log"
            return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=message)

    return wrapper


@app.query()
@site_reply_errors
def query(message: Message, context: Context) -> Message:
    config = RunConfig.from_run_config(context.run_config)
    ref = resolve_site(context.node_config, config)
    metrics = to_metric_record({"heldout": int(ref.role == "heldout"), "site-key": ref.key})
    return Message(RecordDict({METRICS_RECORD: metrics}), reply_to=message)


@app.train()
@site_reply_errors
def train(message: Message, context: Context) -> Message:
    began = time.perf_counter()
    config, ref, device = _setup(context)
    if ref.role != "train":
        raise PermissionError("a held-out site never trains: it plays the new hospital")
    site = sites.site(ref, config)
    model = sites.model(config, device)
    params, step_sizes = _received_params(message, config, device)
    round_seed = int(message.content.config_records[CONFIG_RECORD]["round-seed"])

    raw = sample_episodes(site, config.episodes_per_site, config.k_shot, config.q_query, seed=site_seed(round_seed, site.name))
    episodes = [
        (sx.to(device), _target(sy, config, device), qx.to(device), _target(qy, config, device))
        for sx, sy, qx, qy in raw
    ]
    grads, stats = meta_gradient(
        model,
        params,
        episodes,
        algorithm=config.algorithm,
        inner_steps=config.inner_steps,
        inner_lr=step_sizes if config.algorithm == "metasgd" else config.inner_lr,
        loss_fn=DiceCELoss(config.num_classes),
        inner_params=head_parameter_names(model) if config.algorithm == "anil" else None,
        proximal_mu=config.proximal_mu if config.algorithm == "fedprox" else 0.0,
    )
    metrics = {
        "num-examples": int(stats["num_examples"]),
        "support-loss-before": stats["support_loss_before"],
        "support-loss-after": stats["support_loss_after"],
        "query-loss-before": stats["query_loss_before"],
        "query-loss-after": stats["query_loss_after"],
        "seconds": time.perf_counter() - began,
    }
    content = RecordDict({GRADS_RECORD: to_array_record(grads), METRICS_RECORD: to_metric_record(metrics)})
    return Message(content, reply_to=message)


@app.evaluate()
@site_reply_errors
def evaluate(message: Message, context: Context) -> Message:
    began = time.perf_counter()
    config, ref, device = _setup(context)
    site = sites.site(ref, config)
    model = sites.model(config, device)
    params, step_sizes = _received_params(message, config, device)
    eval_seed = int(message.content.config_records[CONFIG_RECORD]["eval-seed"])

    support_x, support_y, eval_x, eval_y = adaptation_split(site, config.eval_k_shot, seed=eval_seed)
    eval_x, eval_y = evaluation_subset(eval_x, eval_y, config.eval_max_images, seed=eval_seed)
    curve = adaptation_curve(
        model,
        params,
        support_x.to(device),
        support_y.to(device),
        eval_x.to(device),
        eval_y.to(device),
        steps=list(config.adaptation_steps),
        inner_lr=step_sizes if config.algorithm == "metasgd" else config.inner_lr,
        loss_fn=DiceCELoss(config.num_classes),
        num_classes=config.num_classes,
        inner_params=head_parameter_names(model) if config.algorithm == "anil" else None,
        batch_size=config.eval_batch_size,
    )
    metrics = {f"dice-step-{steps}": float(result["dice"]) for steps, result in curve.items()}
    metrics["num-examples"] = int(len(eval_x))
    metrics["seconds"] = time.perf_counter() - began
    return Message(RecordDict({METRICS_RECORD: to_metric_record(metrics)}), reply_to=message)


def _setup(context: Context) -> tuple[RunConfig, SiteRef, torch.device]:
    config = RunConfig.from_run_config(context.run_config)
    return config, resolve_site(context.node_config, config), pick_device(config)


def _received_params(message: Message, config: RunConfig, device: torch.device):
    params, step_sizes = split_params(from_array_record(message.content.array_records[PARAMS_RECORD], device))
    if config.algorithm == "metasgd" and step_sizes is None:
        raise ValueError("algorithm metasgd needs the server's step sizes (lr.<name> arrays); none arrived")
    return params, step_sizes


def _target(labels: torch.Tensor, config: RunConfig, device: torch.device) -> torch.Tensor:
    return one_hot(labels, config.num_classes).to(device)
