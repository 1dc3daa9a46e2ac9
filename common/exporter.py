"""A Prometheus exporter process: one collector served on ``/metrics`` until SIGTERM or SIGINT.

What `fedmeta site-metrics` (a site's ClientApp numbers) and `fedmeta server-metrics` (every run's last state)
share: each reads state files at every scrape through its own collector; serving and stopping are the same.
"""

from __future__ import annotations

import signal
import sys
import threading
from typing import Any


def serve_collector(collector: Any, port: int, address: str = "127.0.0.1") -> tuple[Any, threading.Thread]:
    """Starts the HTTP endpoint for ``collector``; returns prometheus-client's (server, thread)."""
    from prometheus_client import CollectorRegistry, start_http_server  # lazy: the commands' --help stays fast

    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return start_http_server(port, addr=address, registry=registry)


def run_exporter(command: str, collector: Any, port: int, address: str, serving: str) -> int:
    """Serves ``collector`` on ``address:port`` until SIGTERM or SIGINT; 1 (saying why) when the port is taken."""
    try:
        server, _thread = serve_collector(collector, port, address)
    except OSError as err:
        print(f"fedmeta {command}: cannot listen on {address}:{port} ({err}); pick a free port.", file=sys.stderr)
        return 1
    print(f"{serving} on http://{address}:{port}/metrics", flush=True)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    stop.wait()
    server.shutdown()
    return 0
