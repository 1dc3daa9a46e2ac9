"""The coordinator's metrics between runs too: every run's last state, served by one long-lived exporter.

The ServerApp serves ``/metrics`` only while its run goes on (run config ``metrics-port``), so a
Prometheus that scrapes it sees the target down between runs and loses each run's last values. So
every ServerApp also writes its series (``fedmeta.server.operator_metrics``) to
``server-metrics.prom`` in its out-dir — at its start, before and after every round, at its end —
and ``fedmeta server-metrics --dir RUNS --port PORT`` serves the last state of every run found under
``RUNS``, each series labelled ``run`` with the out-dir's path below ``RUNS``. Between runs the gauges
hold their last values and ``fedmeta_run_active`` is 0.

Why this file, and not a folder named in the run config or the runs' metrics.jsonl: out-dir is the
one folder every run must have and the coordinator's runs volume already holds it, so no run can
forget to be watched, and a resumed run continues its own file. metrics.jsonl does not say whether
a run is still going or how it ended, grows with every round, and carries per-site detail no
dashboard needs; the state file holds exactly the series the ServerApp's own endpoint serves, so
the dashboards query the same names either way. It is OpenMetrics text, replaced atomically (a new
file, then a rename) and ending in ``# EOF``, so a cut or corrupt file is told from a whole one:
it is skipped and counted (``fedmeta_server_unreadable_state_files``), never served in part.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fedmeta.common.exporter import run_exporter, serve_collector

log = logging.getLogger("fedmeta.server")

STATE_NAME = "server-metrics.prom"  # in each run's out-dir
RUN_LABEL = "run"
MAX_DEPTH = 4  # folders below --dir searched for out-dirs (runs/<consortium>/<experiment>/<seed> at most)
MAX_STATE_BYTES = 1 << 20  # a ServerApp's state is a few kB; anything larger is not one

# The exporter's own series (every other series is a run's, as the ServerApp wrote it).
EXPORTER_METRIC_NAMES = ("fedmeta_server_runs", "fedmeta_server_unreadable_state_files")


# -- the ServerApp side: write ----------------------------------------------------------------------


def write_state(path: Path, text: bytes) -> None:
    """Replaces the state file at ``path`` atomically with ``text`` (OpenMetrics, ending in ``# EOF``)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(text)
        os.chmod(tmp, 0o644)  # read by the exporter, which may run as another user
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# -- the exporter side: read and serve --------------------------------------------------------------


def state_files(root: Path) -> list[Path]:
    """Every run's state file under ``root`` (``root`` itself included), at most MAX_DEPTH folders down,
    hidden folders and symbolic links to folders skipped."""
    root = Path(root)
    found = []
    for folder, dirs, files in os.walk(root):  # unreadable folders are skipped, links not followed
        depth = len(Path(folder).relative_to(root).parts)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")) if depth < MAX_DEPTH else []
        if STATE_NAME in files:
            found.append(Path(folder) / STATE_NAME)
    return found


def read_state(path: Path) -> list[Any]:
    """The metric families of one run's state file; ValueError or OSError when it is not a whole one."""
    from prometheus_client.openmetrics.parser import text_string_to_metric_families  # lazy: see ServerMetricsCollector

    with open(path, "rb") as handle:
        data = handle.read(MAX_STATE_BYTES + 1)
    if len(data) > MAX_STATE_BYTES:
        raise ValueError(f"larger than {MAX_STATE_BYTES} bytes")
    families = list(text_string_to_metric_families(data.decode("utf-8")))  # ValueError without its # EOF
    for family in families:
        if not family.name.startswith("fedmeta_") or family.name.startswith("fedmeta_server_"):
            raise ValueError(f"holds {family.name!r}, not a ServerApp series")
    return families


def run_name(root: Path, path: Path) -> str:
    """The ``run`` label of a state file: its out-dir below ``root`` ("." for ``root`` itself)."""
    return path.parent.relative_to(root).as_posix()


class ServerMetricsCollector:
    """A prometheus-client collector that reads every run's state file under ``root`` at each scrape."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self._warned: dict[Path, tuple[float, str]] = {}  # unreadable file -> (mtime, problem): each said once

    def collect(self) -> Iterator[Any]:
        # prometheus_client, imported here, is all `fedmeta server-metrics` loads beyond the standard library.
        from prometheus_client.core import GaugeMetricFamily, Metric

        merged: dict[str, Any] = {}
        runs = unreadable = 0
        for path in state_files(self.root):
            try:
                families = read_state(path)
            except (OSError, ValueError, UnicodeDecodeError) as err:
                unreadable += 1
                self._warn(path, str(err))
                continue
            runs += 1
            self._warned.pop(path, None)
            run = run_name(self.root, path)
            for family in families:
                into = merged.setdefault(family.name, Metric(family.name, family.documentation, family.type,
                                                             family.unit))
                if into.type != family.type:  # another fedmeta release's series under the same name: keep the first
                    continue
                into.samples.extend(s._replace(labels={**s.labels, RUN_LABEL: run}) for s in family.samples)
        yield from merged.values()
        yield GaugeMetricFamily("fedmeta_server_runs", "Runs whose state file the exporter read at this scrape",
                                value=runs)
        yield GaugeMetricFamily("fedmeta_server_unreadable_state_files",
                                "State files skipped at this scrape: cut, corrupt or not a ServerApp's",
                                value=unreadable)

    def _warn(self, path: Path, problem: str) -> None:
        try:
            mtime = path.stat().st_mtime
        except OSError:
            mtime = 0.0
        if self._warned.get(path) != (mtime, problem):
            self._warned[path] = (mtime, problem)
            log.warning("server metrics: skipped %s (%s); its run is not served until the ServerApp writes it again",
                        path, problem[:200])


def serve(root: Path, port: int, address: str = "127.0.0.1") -> tuple[Any, threading.Thread]:
    """Starts the HTTP endpoint for the runs under ``root``; returns prometheus-client's (server, thread)."""
    return serve_collector(ServerMetricsCollector(root), port, address)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "server-metrics",
        help="serve every run's last state (round, sites answered and dropped, epsilon, run active) for "
             "Prometheus, between runs too",
        description="Serve /metrics for the coordinator: the last state every ServerApp wrote to "
                    f"{STATE_NAME} in its out-dir, for every out-dir under --dir, labelled run=<out-dir below "
                    "--dir>. Keeps serving between runs. Runs until stopped.",
    )
    parser.add_argument("--dir", type=Path, required=True,
                        help="the folder the runs' out-dirs are in (the coordinator's runs volume, e.g. /runs)")
    parser.add_argument("--port", type=int, required=True, help="TCP port for /metrics, e.g. 9100")
    parser.add_argument("--address", default="127.0.0.1",
                        help="interface to listen on (default 127.0.0.1; 0.0.0.0 when Prometheus runs elsewhere)")
    parser.set_defaults(handler=_cmd_server_metrics)


def _cmd_server_metrics(args: argparse.Namespace) -> int:
    if not 1 <= args.port <= 65535:
        print(f"fedmeta server-metrics: --port {args.port} is not a TCP port (1-65535).", file=sys.stderr)
        return 2
    if not args.dir.is_dir():
        print(f"fedmeta server-metrics: --dir {args.dir} is not a folder; give the folder the runs' out-dirs are in "
              "(the coordinator's runs volume).", file=sys.stderr)
        return 2
    logging.basicConfig(format="fedmeta server-metrics: %(message)s")  # the skipped files' warnings, on stderr
    return run_exporter("server-metrics", ServerMetricsCollector(args.dir), args.port, args.address, f"server metrics of the runs under {args.dir}")


__all__ = ["EXPORTER_METRIC_NAMES", "STATE_NAME", "ServerMetricsCollector", "read_state", "serve", "state_files",
           "write_state"]
