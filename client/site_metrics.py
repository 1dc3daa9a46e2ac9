"""A site's own metrics for its IT team: what its ClientApp did, served on the site's port.

Flower 1.41 handles every message in a fresh ClientApp process, so no process of the app lives long
enough to serve ``/metrics``. Each ClientApp process therefore folds its numbers (messages by type
and outcome, seconds, episodes, device, peak memory) into one small JSON state file in the site's
metrics folder — node config ``metrics-dir`` — under a file lock, and ``fedmeta site-metrics --dir
DIR --port PORT``, started beside the SuperNode (the bundle's ``start-site.sh`` with
``METRICS_PORT``, or the site compose file), renders that file in Prometheus' format at every
scrape. Nothing here leaves the site; a failure to record is logged and never fails a round.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import math
import os
import resource
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from fedmeta.common.exporter import run_exporter, serve_collector

log = logging.getLogger("fedmeta.client")

METRICS_DIR_KEY = "metrics-dir"  # node config: the folder the ClientApp records into
STATE_NAME = "site-metrics.json"
_KINDS = ("query", "train", "evaluate")

# The exported series (as a scrape shows them); deploy/ dashboards query only these.
SITE_METRIC_NAMES = (
    "fedmeta_site_messages_total",
    "fedmeta_site_message_duration_seconds",
    "fedmeta_site_episodes_total",
    "fedmeta_site_episode_duration_seconds",
    "fedmeta_site_device_info",
    "fedmeta_site_peak_memory_bytes",
    "fedmeta_site_last_message_timestamp_seconds",
)


# -- the ClientApp side: record ------------------------------------------------------------------


def record_message(node_config: Mapping[str, Any], kind: str, *, ok: bool, seconds: float, episodes: int = 0,
                   device: str = "") -> None:
    """Adds one handled message to the site's state file, when the node config names a metrics folder."""
    folder = node_config.get(METRICS_DIR_KEY)
    if not folder:
        return
    try:
        with _locked_state(Path(str(folder))) as state:
            key = f"{kind}/{'ok' if ok else 'error'}"
            state["messages"][key] = state["messages"].get(key, 0) + 1
            duration = state["message_seconds"].setdefault(kind, [0.0, 0])
            duration[0] += seconds
            duration[1] += 1
            if episodes:
                state["episodes"] += episodes
                state["episode_seconds"] += seconds
            if device:
                state["device"] = device
                state["device_name"] = _device_name(device)
            for memory_kind, value in _peak_memory(device).items():
                state["peak_memory_bytes"][memory_kind] = max(value, state["peak_memory_bytes"].get(memory_kind, 0))
            state["last_message"] = time.time()
    except Exception as err:  # noqa: BLE001 - the site's metrics must never fail its round
        log.warning("site metrics: cannot record into %s (%s: %s)", folder, type(err).__name__, err)


def _empty_state() -> dict[str, Any]:
    return {"messages": {}, "message_seconds": {}, "episodes": 0, "episode_seconds": 0.0, "device": "",
            "device_name": "", "peak_memory_bytes": {}, "last_message": 0.0}


@contextlib.contextmanager
def _locked_state(folder: Path) -> Iterator[dict[str, Any]]:
    """Read-modify-write of the state file under an exclusive lock; written atomically (rename)."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            state = read_state(folder)
            yield state
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=".site-metrics-", suffix=".tmp")
            try:
                with os.fdopen(fd, "w") as handle:
                    json.dump(state, handle, allow_nan=False)
                os.replace(tmp, folder / STATE_NAME)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


_MOST = 1e15  # far above any count or second total a site reaches; keeps every value a plain finite float


def _number(value: Any, *, integer: bool = False) -> float | int | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(value, int) and abs(value) > _MOST:  # a 400-digit integer would overflow a float later
        return None
    if not math.isfinite(value) or not 0 <= value <= _MOST or (integer and value != int(value)):
        return None
    return int(value) if integer else float(value)


def read_state(folder: Path) -> dict[str, Any]:
    """The recorded state, every entry checked (a file that is missing, unreadable or tampered with
    yields what is valid in it, and nothing else: recording and scraping never fail on it)."""
    state = _empty_state()
    try:
        loaded = json.loads((Path(folder) / STATE_NAME).read_text(), parse_constant=lambda _: None)
    except (OSError, ValueError, RecursionError):
        return state
    if not isinstance(loaded, dict):
        return state
    for key, count in (loaded.get("messages") or {}).items() if isinstance(loaded.get("messages"), dict) else ():
        kind, _, outcome = str(key).partition("/")
        if kind in _KINDS and outcome in ("ok", "error") and _number(count, integer=True) is not None:
            state["messages"][key] = _number(count, integer=True)
    seconds = loaded.get("message_seconds")
    for kind, pair in (seconds.items() if isinstance(seconds, dict) else ()):
        if (kind in _KINDS and isinstance(pair, list) and len(pair) == 2 and _number(pair[0]) is not None
                and _number(pair[1], integer=True) is not None):
            state["message_seconds"][kind] = [_number(pair[0]), _number(pair[1], integer=True)]
    for key, integer in (("episodes", True), ("episode_seconds", False), ("last_message", False)):
        value = _number(loaded.get(key), integer=integer)
        if value is not None:
            state[key] = value
    for key in ("device", "device_name"):
        if isinstance(loaded.get(key), str):
            state[key] = loaded[key][:100]
    memory = loaded.get("peak_memory_bytes")
    for kind, value in (memory.items() if isinstance(memory, dict) else ()):
        if kind in ("rss", "cuda") and _number(value, integer=True) is not None:
            state["peak_memory_bytes"][kind] = _number(value, integer=True)
    return state


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        import torch  # +0.75 s on `fedmeta site-metrics --help` (python -X importtime); the ClientApp has it already

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(torch.device(device))
    return "cpu"


def _peak_memory(device: str) -> dict[str, int]:
    # ru_maxrss is KiB on Linux: the ClientApp process's peak resident memory.
    peaks = {"rss": int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024}
    if device.startswith("cuda"):
        import torch  # lazy: see _device_name

        if torch.cuda.is_available():
            peaks["cuda"] = int(torch.cuda.max_memory_allocated(torch.device(device)))
    return peaks


# -- the exporter side: serve ---------------------------------------------------------------------


class SiteMetricsCollector:
    """A prometheus-client collector that reads the state file at every scrape."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def collect(self):
        # prometheus_client: +8 ms on the ClientApp's import, +28 ms on `fedmeta site-metrics --help`; only the
        # exporter serves it.
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, SummaryMetricFamily

        state = read_state(self.folder)
        messages = CounterMetricFamily("fedmeta_site_messages", "Messages this site's ClientApp handled",
                                       labels=["type", "outcome"])
        for key, count in sorted(state["messages"].items()):
            kind, _, outcome = key.partition("/")
            messages.add_metric([kind, outcome], count)
        yield messages
        durations = SummaryMetricFamily("fedmeta_site_message_duration_seconds",
                                        "Seconds the ClientApp spent on a message, by type", labels=["type"])
        for kind, (total, count) in sorted(state["message_seconds"].items()):
            durations.add_metric([kind], count_value=count, sum_value=total)
        yield durations
        yield CounterMetricFamily("fedmeta_site_episodes", "Meta-training episodes run at this site",
                                  value=state["episodes"])
        episodes = SummaryMetricFamily("fedmeta_site_episode_duration_seconds",
                                       "Seconds per meta-training episode (train messages' time over their episodes)")
        episodes.add_metric([], count_value=state["episodes"], sum_value=state["episode_seconds"])
        yield episodes
        device = GaugeMetricFamily("fedmeta_site_device_info", "The device the ClientApp computed on",
                                   labels=["device", "name"])
        if state["device"]:
            device.add_metric([state["device"], state["device_name"]], 1)
        yield device
        memory = GaugeMetricFamily("fedmeta_site_peak_memory_bytes",
                                   "Peak memory of a ClientApp process (rss) and on the GPU (cuda)", labels=["kind"])
        for kind, value in sorted(state["peak_memory_bytes"].items()):
            memory.add_metric([kind], value)
        yield memory
        yield GaugeMetricFamily("fedmeta_site_last_message_timestamp_seconds",
                                "Unix time the ClientApp last finished a message", value=state["last_message"])


def serve(folder: Path, port: int, address: str = "127.0.0.1") -> tuple[Any, threading.Thread]:
    """Starts the HTTP endpoint for ``folder``'s state; returns prometheus-client's (server, thread)."""
    return serve_collector(SiteMetricsCollector(folder), port, address)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "site-metrics",
        help="serve this site's ClientApp metrics (episodes, seconds, device, memory) for Prometheus",
        description="Serve /metrics for a site: what its ClientApp processes recorded into --dir, the folder its "
                    "SuperNode's node config names as metrics-dir. Runs until stopped.",
    )
    parser.add_argument("--dir", type=Path, required=True, help="the site's metrics folder (node config metrics-dir)")
    parser.add_argument("--port", type=int, required=True, help="TCP port for /metrics, e.g. 9101")
    parser.add_argument("--address", default="127.0.0.1",
                        help="interface to listen on (default 127.0.0.1; 0.0.0.0 when Prometheus runs elsewhere)")
    parser.set_defaults(handler=_cmd_site_metrics)


def _cmd_site_metrics(args: argparse.Namespace) -> int:
    if not 1 <= args.port <= 65535:
        print(f"fedmeta site-metrics: --port {args.port} is not a TCP port (1-65535).", file=sys.stderr)
        return 2
    if args.dir.exists() and not args.dir.is_dir():
        print(f"fedmeta site-metrics: --dir {args.dir} is a file; give the folder the node config names as "
              "metrics-dir.", file=sys.stderr)
        return 2
    try:
        args.dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        print(f"fedmeta site-metrics: cannot create --dir {args.dir} ({err}).", file=sys.stderr)
        return 2
    return run_exporter("site-metrics", SiteMetricsCollector(args.dir), args.port, args.address, f"site metrics from {args.dir}")


__all__ = ["METRICS_DIR_KEY", "SITE_METRIC_NAMES", "SiteMetricsCollector", "read_state", "record_message", "serve"]
