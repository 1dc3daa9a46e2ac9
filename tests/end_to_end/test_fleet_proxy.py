"""The Fleet-only proxy run for real: Debian's nginx with fedmeta's configuration in front of a secure SuperLink.

Slow: a SuperLink (TLS, SuperNode authentication, a database) on one loopback port, nginx with
`fedmeta fleet-proxy-config`'s server block on another, one registered site whose SuperNode dials the proxy
and trains a round through it; then, through the proxy, everything that is not a SuperNode's Fleet call is
refused by nginx and never reaches the SuperLink. Skips when nginx is not installed.
"""

from __future__ import annotations

import dataclasses
import http.client
import os
import shutil
import socket
import ssl
import time
import uuid
from pathlib import Path

import pytest

from fedmeta.server.fleet_proxy import FLEET_PREFIX, SELF_REGISTRATION_CALLS, FleetProxy, for_consortium, render
from fedmeta.server.provision import provision
from fedmeta.simulations.engines.flower_runtime import LocalDeployment, _free_ports
from fedmeta.simulations.experiments.presets import load_preset

REPO_ROOT = Path(__file__).resolve().parents[2]
NGINX = shutil.which("nginx", path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"]))

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(NGINX is None, reason="nginx is not installed (Debian: apt-get install nginx; .ci/run does)"),
    pytest.mark.skipif(not Path("/proc").is_dir(), reason="the deployment stops its processes through /proc"),
]


def _superlink_paths(monkeypatch, home: Path) -> dict[str, str]:
    """Every path the installed SuperLink serves on its port, and the method it serves it with (POST or GET)."""
    monkeypatch.setenv("FLWR_HOME", str(home))
    from flwr.superlink.main import create_app

    app = create_app()  # in memory: the routes, no server
    paths = {path: "POST" if "post" in methods else "GET" for path, methods in app.openapi()["paths"].items()}
    paths.update({app.docs_url: "GET", app.openapi_url: "GET", app.swagger_ui_oauth2_redirect_url: "GET"})
    return paths


# What Flower's node authentication adds to every Fleet call (the values here are not a valid signature).
SIGNED = {"flwr-public-key": "bm90LWEta2V5", "flwr-signature": "bm90LWEtc2lnbmF0dXJl", "flwr-timestamp": "0"}


def _request(port: int, path: str, ca: Path, *, method: str = "POST", body: bytes = b"",
             headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    connection = http.client.HTTPSConnection("127.0.0.1", port, context=ssl.create_default_context(cafile=str(ca)),
                                             timeout=60)
    try:
        connection.request(method, path, body=body, headers={"content-type": "application/protobuf", **(headers or {})})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def _start_nginx(deployment: LocalDeployment, proxy: FleetProxy, prefix: Path) -> int:
    """nginx in the foreground with `proxy`'s server block, started (and stopped, by PID) with the deployment."""
    prefix.mkdir(parents=True)
    (prefix / "fleet-proxy.conf").write_text(render(proxy))
    user = "user root;\n" if os.geteuid() == 0 else ""  # workers may read the test's private tmp folders
    (prefix / "nginx.conf").write_text(
        f"{user}worker_processes 1;\nerror_log {prefix}/error.log info;\nevents {{ worker_connections 64; }}\n"
        f"http {{\n    access_log {prefix}/access.log;\n"
        + "".join(f"    {kind}_temp_path {prefix}/{kind};\n"
                  for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        + f"    include {prefix}/fleet-proxy.conf;\n}}\n")
    process = deployment._spawn(f"nginx-{prefix.name}", [NGINX, "-c", str(prefix / "nginx.conf"), "-p", str(prefix),
                                                         "-g", f"daemon off; pid {prefix}/nginx.pid;"],
                                deployment._require_home().env)
    port = int(proxy.listen.rsplit(":", 1)[1])
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        assert process.poll() is None, f"nginx exited ({process.returncode}):\n{deployment.log_of(process.pid)}"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return port
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"nginx did not listen on {port} within 15 s:\n{deployment.log_of(process.pid)}")


def _wait_online(deployment: LocalDeployment, supernode, timeout_s: float = 60) -> list[dict]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert supernode.poll() is None, f"the SuperNode exited:\n{deployment.log_of(supernode.pid)[-3000:]}"
        nodes = deployment.nodes()
        if any(node.get("status") == "online" for node in nodes):
            return nodes
        time.sleep(0.5)
    raise AssertionError(f"the SuperNode did not come online through the proxy within {timeout_s:.0f} s:\n"
                         f"{deployment.log_of(supernode.pid)[-3000:]}")


def test_a_site_trains_through_the_proxy_and_nothing_else_passes_it(federation, tmp_path, monkeypatch):
    from fedmeta.common.synth import load_manifest
    from flwr.proto.message_pb2 import PushObjectRequest

    served = _superlink_paths(monkeypatch, tmp_path / "routes-home")
    refused = {path: method for path, method in served.items()
               if not path.startswith(FLEET_PREFIX) or path.rsplit("/", 1)[1] in SELF_REGISTRATION_CALLS}
    assert any(p.startswith("/v1/control/") for p in refused) and any(p.startswith("/v1/runtime/") for p in refused)
    site = Path(load_manifest(federation).train_sites[0].path)
    overrides, _driver = load_preset("smoke")
    run_config = {**overrides, "out-dir": str(tmp_path / "out"), "num-rounds": 1, "eval-every": 0, "min-sites": 1}
    # Another consortium's material: a key nobody registered, a CA the SuperLink's certificate is not from.
    rogue = provision(tmp_path / "rogue", server_names=["127.0.0.1"], sites=["rogue"]).out

    # late=[0]: the site is provisioned and registered through the SuperLink's own (operator) port, not started.
    with LocalDeployment([site], late=[0], flwr_home=tmp_path / "flwr-home") as deployment:
        operator_address = deployment.superlink_address
        ca = deployment.pki / "ca" / "ca.crt"
        proxy = for_consortium(deployment.pki, listen=f"127.0.0.1:{_free_ports(1)[0]}", upstream=operator_address)
        assert proxy.server_name == "localhost"  # provisioned for 127.0.0.1 and localhost: nginx checks DNS names only
        proxy_port = _start_nginx(deployment, proxy, tmp_path / "nginx")

        # The site's SuperNode dials the proxy (LocalDeployment starts SuperNodes at superlink_address).
        deployment.superlink_address = f"127.0.0.1:{proxy_port}"
        try:
            supernode = deployment.start_supernode(0)
        finally:
            deployment.superlink_address = operator_address
        nodes = _wait_online(deployment, supernode)
        assert [node["status"] for node in nodes] == ["online"], nodes

        # A trained round: the ServerApp's messages reach the site, and its reply comes back, through nginx.
        outcome = deployment.run(REPO_ROOT, run_config, timeout_s=120)
        assert outcome.ok and outcome.status == "finished:completed", outcome

        superlink_log = deployment.log_of(deployment.pids[0])
        probe = uuid.uuid4().hex  # a query string nginx ignores and the SuperLink's access log records
        home = deployment._require_home()
        home.write_connection("via-proxy", address=f"127.0.0.1:{proxy_port}", root_certificates=str(ca))
        with pytest.raises(RuntimeError, match="did not start a run") as submitted:
            home.run_app(REPO_ROOT, "via-proxy", run_config, timeout_s=60, extra_args=[], engine="Fleet-only proxy",
                         service_logs=[])
        assert "403 Forbidden" in str(submitted.value) and "/v1/control/start-run" in str(submitted.value)
        registered = home.flwr(["supernode", "register", str(rogue / "sites/rogue/site.pub"), "via-proxy",
                                "--format", "json"])
        assert '"success": false' in registered.stdout and "403 Forbidden" in registered.stdout, registered.stdout

        # POST passes nginx's method check, so each path meets its location's refusal; GET routes are tried as GET too.
        answers = {(path, method): _request(proxy_port, f"{path}?probe={probe}", ca, method=method, headers=SIGNED)
                   for path, served_with in refused.items() for method in {"POST", served_with}}
        wrong_method = _request(proxy_port, f"{FLEET_PREFIX}pull-messages?probe={probe}", ca, method="GET")
        # Tens of MB of a signed call pass whole: the SuperLink parses it and turns it away for its bad signature.
        large = PushObjectRequest(object_content=os.urandom(1 << 20) * 40).SerializeToString()
        passed = _request(proxy_port, f"{FLEET_PREFIX}push-object?passed={probe}", ca, body=large, headers=SIGNED)
        # An unsigned call is turned away by nginx before its body is read: the SuperLink never sees it.
        unsigned = _request(proxy_port, f"{FLEET_PREFIX}push-object?probe={probe}", ca, body=large[: 1 << 20])

        # nginx checks the SuperLink's certificate: another name, or another CA, and nothing is passed on.
        checks = {}
        for label, change in (("name", {"server_name": "coordinator.example.org"}),
                              ("ca", {"ca_certificate": str(rogue / "ca/ca.crt")})):
            port = _free_ports(1)[0]
            strict = _start_nginx(deployment, dataclasses.replace(proxy, listen=f"127.0.0.1:{port}", **change),
                                  tmp_path / f"nginx-{label}")
            checks[label] = _request(strict, f"{FLEET_PREFIX}pull-messages?unverified={probe}", ca, headers=SIGNED)
        # A body above the cap is refused by nginx (413), signed or not (cap 1 MB here, 256 MB by default).
        capped = _start_nginx(deployment, dataclasses.replace(proxy, listen=f"127.0.0.1:{_free_ports(1)[0]}",
                                                              max_body_mb=1), tmp_path / "nginx-cap")
        too_large = _request(capped, f"{FLEET_PREFIX}push-object?probe={probe}", ca, body=large[: 2 << 20],
                             headers=SIGNED)
        nodes_after = deployment.nodes()
        time.sleep(0.5)  # the SuperLink's access log line follows its answer
        superlink_log = deployment.log_of(deployment.pids[0])[len(superlink_log):]

    for (path, method), (status, body) in answers.items():
        assert status == 403 and body.startswith(b"fedmeta: ") and body.count(b"\n") == 1, (method, path, status, body)
    assert wrong_method[0] == 403 and b"POST only" in wrong_method[1], wrong_method
    assert f"probe={probe}" not in superlink_log, "a refused request reached the SuperLink"
    assert passed == (401, b'{"detail":"Invalid SuperNode authentication"}'), passed
    assert unsigned[0] == 403 and b"unsigned request" in unsigned[1], unsigned
    assert too_large[0] == 413, too_large
    assert f"/v1/fleet/push-object?passed={probe}" in superlink_log  # the log would have shown a refused one
    assert [status for status, _body in checks.values()] == [502, 502], checks
    assert f"unverified={probe}" not in superlink_log
    assert [node["status"] for node in nodes_after] == ["online"], nodes_after  # the rogue key was not registered
