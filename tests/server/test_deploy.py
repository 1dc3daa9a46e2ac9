"""deploy/: what can be checked without a container engine (none runs here).

Every flag the compose files and Kubernetes manifests pass exists in the installed Flower commands'
`--help`; every metric the Grafana dashboard queries is one the ServerApp exports; every file a
compose file mounts is one `fedmeta provision` writes; the images run the same commands the loopback
deployment test runs, on the pinned Flower release, as a non-root user.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import flwr
import pytest
import yaml

from fedmeta.server.operator_metrics import METRIC_NAMES
from fedmeta.server.provision import provision

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
REPO = DEPLOY.parent


def _help_flags(command: str) -> set[str]:
    text = subprocess.run([*command.split(), "--help"], capture_output=True, text=True, timeout=60, check=False).stdout
    return set(re.findall(r"(--[a-z0-9][a-z0-9-]*)", text))


def _flags(args: list[str]) -> set[str]:
    return {arg.split("=", 1)[0] for arg in args if arg.startswith("--")}


def _compose(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


@pytest.fixture(scope="module")
def help_flags() -> dict[str, set[str]]:
    return {name: _help_flags(name) for name in ("flower-superlink", "flower-supernode", "fedmeta site-metrics",
                                                  "fedmeta server-metrics", "fedmeta site-exec")}


def test_every_flag_passed_exists_in_the_installed_flower_commands(help_flags, tmp_path):
    coordinator = _compose(DEPLOY / "coordinator/compose.yaml")["services"]["superlink"]
    site = _compose(DEPLOY / "site/compose.yaml")["services"]["supernode"]
    k8s = [doc for doc in yaml.safe_load_all((DEPLOY / "k8s/site.yaml").read_text()) if doc["kind"] == "Deployment"][0]
    bundle = provision(tmp_path / "c", server_names=["localhost"], sites=["a"]).out / "sites/a"
    bundled = _compose(bundle / "compose.yaml")["services"]["supernode"]
    script_text = (bundle / "start-site.sh").read_text()
    supernode_block = script_text[script_text.index("set -- flower-supernode"):]
    script = re.findall(r"(--[a-z0-9-]+)", supernode_block[:supernode_block.index('--node-config "$NODE_CONFIG"') + 20])
    exporter_script = re.findall(r"(--[a-z0-9-]+)", re.search(r"start_child fedmeta site-metrics (.*)", script_text).group(1))
    gate_script = re.findall(r"(--[a-z0-9-]+)", re.search(r"start_child fedmeta site-exec ((?:.*\\\n)*.*)",
                                                          script_text).group(1))
    assert "--isolation" in script and {"--runtime-api-address", "--approved-apps", "--public-key"} <= set(gate_script)
    containers = {c["name"]: c for c in k8s["spec"]["template"]["spec"]["containers"]}
    checks = [
        ("flower-superlink", coordinator["command"]),
        ("flower-supernode", site["command"]),
        ("flower-supernode", containers["supernode"]["args"]),
        ("flower-supernode", bundled["command"]),
        ("flower-supernode", script),
        ("fedmeta site-metrics", exporter_script),
        ("fedmeta site-metrics", containers["site-metrics"]["args"]),
        ("fedmeta site-exec", gate_script),
        ("fedmeta site-exec", containers["site-exec"]["args"]),
    ]
    # Every site topology runs its SuperNode without app processes of its own, beside the app gate.
    assert containers["site-exec"]["command"] == ["fedmeta", "site-exec"]
    for args in (site["command"], containers["supernode"]["args"], bundled["command"]):
        assert "--isolation=process" in args, args
    for compose in (DEPLOY / "site/compose.yaml", bundle / "compose.yaml"):
        exporter = _compose(compose)["services"]["metrics"]
        assert exporter["entrypoint"] == ["fedmeta", "site-metrics"] == containers["site-metrics"]["command"]
        checks.append(("fedmeta site-metrics", exporter["command"]))
        gate = _compose(compose)["services"]["site-exec"]
        assert gate["entrypoint"] == ["fedmeta", "site-exec"] and gate["network_mode"] == "service:supernode"
        checks.append(("fedmeta site-exec", gate["command"]))
    server_exporter = _compose(DEPLOY / "coordinator/compose.yaml")["services"]["server-metrics"]
    assert server_exporter["entrypoint"] == ["fedmeta", "server-metrics"]
    checks.append(("fedmeta server-metrics", server_exporter["command"]))
    for command, args in checks:
        unknown = _flags(args) - help_flags[command]
        assert not unknown, f"{command} has no {sorted(unknown)}"
    # Secure by default everywhere: TLS material and node authentication, never --insecure.
    assert {"--ssl-certfile", "--ssl-keyfile", "--ssl-ca-certfile", "--enable-supernode-auth"} <= _flags(coordinator["command"])
    for args in (site["command"], bundled["command"], script):
        assert {"--root-certificates", "--auth-supernode-private-key"} <= _flags(args) and "--insecure" not in _flags(args)
    assert _flags(site["command"]) == _flags(bundled["command"])  # the bundle's copy says the same


def test_the_dashboard_queries_only_metrics_the_server_exports():
    dashboard = json.loads((DEPLOY / "grafana/dashboards/fedmeta.json").read_text())
    queried = {name for panel in dashboard["panels"] for target in panel["targets"]
               for name in re.findall(r"fedmeta_[a-z_]+", target["expr"])}
    assert queried
    for name in queried:
        base = re.sub(r"_(bucket|sum|count)$", "", name)
        assert base in METRIC_NAMES, f"the dashboard queries {name}, which the ServerApp does not export"
    # Prometheus scrapes the long-lived exporter, which serves every run's state (the same names) from the runs
    # volume the SuperLink's ServerApps write their out-dirs to, in the SuperLink's image.
    scrape = yaml.safe_load((DEPLOY / "prometheus/prometheus.yml").read_text())
    assert scrape["scrape_configs"][0]["static_configs"][0]["targets"] == ["server-metrics:9100"]
    services = _compose(DEPLOY / "coordinator/compose.yaml")["services"]
    exporter, superlink = services["server-metrics"], services["superlink"]
    options = dict(zip(exporter["command"][::2], exporter["command"][1::2]))
    assert options["--port"] == "9100" and options["--dir"] == "/runs" and exporter["image"] == superlink["image"]
    runs = [v for v in superlink["volumes"] if v.endswith(":/runs")]
    assert [v.removesuffix(":ro") for v in exporter["volumes"]] == runs


def test_every_mounted_file_is_one_fedmeta_provision_writes(tmp_path):
    out = provision(tmp_path / "c", server_names=["localhost"], sites=["a"]).out
    secrets = _compose(DEPLOY / "coordinator/compose.yaml")["secrets"]
    for secret in secrets.values():
        relative = secret["file"].split("}", 1)[1].lstrip("/")  # ${CONSORTIUM}/superlink/ca.crt
        assert (out / relative).is_file(), relative
    for compose in (DEPLOY / "site/compose.yaml", out / "sites/a/compose.yaml"):
        for name, secret in _compose(compose)["secrets"].items():
            if name == "superexec.secret":  # the site makes it (start-site.sh does; compose: openssl rand), never the coordinator
                assert not (out / "sites/a" / secret["file"]).exists()
                continue
            assert (out / "sites/a" / secret["file"]).is_file(), (compose, secret)
    # The site's data is mounted read-only, where the ClientApps run: beside the app gate.
    for compose in (DEPLOY / "site/compose.yaml", out / "sites/a/compose.yaml"):
        volumes = _compose(compose)["services"]["site-exec"]["volumes"]
        assert any(v.endswith(":/data:ro") for v in volumes)
        for volume in volumes:  # the bundle's own files: release.pub and approved-apps/, which provision writes
            if volume.startswith("./"):
                assert (out / "sites/a" / volume.split(":")[0]).exists(), volume


def test_images_run_the_loopback_tests_commands_on_the_pinned_flower_as_non_root():
    runtime = (REPO / "simulations/engines/flower_runtime.py").read_text()
    for dockerfile, command in (("coordinator/Dockerfile", "flower-superlink"), ("site/Dockerfile", "flower-supernode")):
        text = (DEPLOY / dockerfile).read_text()
        assert f'ENTRYPOINT ["{command}"]' in text and f'_flower_bin("{command}")' in runtime
        version = re.search(r"ARG FLWR_VERSION=(\S+)", text).group(1)
        assert version.rsplit(".", 1)[0] == flwr.__version__.rsplit(".", 1)[0], (dockerfile, version, flwr.__version__)
        assert re.findall(r"^USER (\S+)", text, flags=re.M)[-1] == "49999"  # Flower's non-root user
        assert "TORCH_INDEX_URL" in text  # CUDA torch as a build argument


def test_only_the_fleet_api_faces_the_sites():
    """Flower 1.41 serves Fleet, Control and Runtime APIs on one port: the public port is a proxy that passes
    the Fleet calls a registered SuperNode makes, as POST, and refuses the rest; the SuperLink's own port stays
    on loopback (tests/end_to_end/test_fleet_proxy.py runs the same configuration in Debian's nginx)."""
    import inspect

    from flwr.supernode import fleet_http_client

    from fedmeta.server.fleet_proxy import FLEET_PREFIX, SELF_REGISTRATION_CALLS, SITE_FLEET_CALLS, docker_template

    services = _compose(DEPLOY / "coordinator/compose.yaml")["services"]
    assert services["superlink"]["ports"] == ["127.0.0.1:8001:8000"]
    assert services["fleet-proxy"]["ports"] == ["8000:8000"]
    published = [p for s in services.values() for p in s.get("ports", []) if not p.startswith("127.0.0.1:")]
    assert published == ["8000:8000"]
    template = (DEPLOY / "coordinator/fleet-proxy.conf.template").read_text()
    assert template == docker_template(), (
        "deploy/coordinator/fleet-proxy.conf.template is generated: python -c 'from fedmeta.server.fleet_proxy import "
        "docker_template; print(docker_template(), end=\"\")' > deploy/coordinator/fleet-proxy.conf.template")
    locations = re.findall(r"location\s+([=~]\s+)?(\S+)\s*\{([^{}]*)\}", template)
    passed = {path for exact, path, body in locations if "proxy_pass" in body and exact.strip() == "="}
    assert passed == {FLEET_PREFIX + call for call in SITE_FLEET_CALLS}
    assert all("return 403" in body for _exact, path, body in locations if "proxy_pass" not in body)
    assert len(locations) == len(passed) + 4  # self-registration, /v1/control/, /v1/runtime/, everything else
    assert re.search(r'if \(\$request_method != POST\) \{\s+return 403 "[^"\n]+\\n";', template)
    for directive in ("listen 8000 ssl", "proxy_ssl_verify on", "proxy_ssl_server_name on", "proxy_http_version 1.1",
                      "client_max_body_size 256m", "limit_conn fedmeta_superlink_per_address 32", "proxy_buffering off",
                      "proxy_request_buffering off"):
        assert re.search(r"\s+".join(map(re.escape, directive.split())) + r"\s*;", template), directive
    for header in ("flwr_public_key", "flwr_signature"):  # an unsigned Fleet call is refused before its body is read
        assert re.search(rf'if \(\$http_{header} = ""\) \{{\s+return 403 "[^"\n]+\\n";', template), header
    # The image renders the template's ${VARIABLES} from the service's environment: every one is set there.
    assert set(re.findall(r"\$\{(\w+)\}", template)) <= set(services["fleet-proxy"]["environment"])
    mounted = {v.split(":")[0].removeprefix("./") for v in services["fleet-proxy"]["volumes"]}
    assert mounted == {"fleet-proxy.conf.template"}
    # Every Fleet call the installed SuperNode can make is either passed or refused on purpose.
    used = set(re.findall(r'path="(/v1/[a-z-]+/[a-z-]+)"', inspect.getsource(fleet_http_client)))
    assert used == {FLEET_PREFIX + call for call in (*SITE_FLEET_CALLS, *SELF_REGISTRATION_CALLS)}, used


def test_the_bundles_compose_file_is_deploy_sites(tmp_path):
    """`fedmeta provision` writes deploy/site/compose.yaml into each bundle, the SuperLink's address filled in: the
    two say the same (services, hardening, health checks, volumes, secrets), so a fix to one reaches both."""
    bundle = provision(tmp_path / "c", server_names=["localhost"], sites=["a"]).out / "sites/a"
    site, bundled = _compose(DEPLOY / "site/compose.yaml"), _compose(bundle / "compose.yaml")
    address = [arg for arg in bundled["services"]["supernode"]["command"] if arg.startswith("--superlink=")]
    assert address and "${" not in address[0]
    site["services"]["supernode"]["command"] = [address[0] if arg.startswith("--superlink=") else arg
                                                for arg in site["services"]["supernode"]["command"]]
    assert bundled == site
