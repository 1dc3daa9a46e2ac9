"""deploy/: every service and container is hardened, checked statically (no container engine runs here).

Each compose file (the coordinator's, the site's, and the one ``fedmeta provision`` writes into a bundle) and the
Kubernetes manifest: a health check for every long-running service, a read-only root with a writable /tmp (and
FLWR_HOME where Flower writes), no new privileges, no capabilities, resource limits; in Kubernetes also probes,
requests, and the pod's RuntimeDefault seccomp profile. A failure names the file, the service and the item. The
health checks themselves are run against Flower's health server and fedmeta's exporters.
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from fedmeta.server.provision import provision
from tests.server.test_deploy import DEPLOY, _compose, _flags, help_flags  # noqa: F401  (help_flags: a fixture)

K8S = DEPLOY / "k8s/site.yaml"
FLOWER_IMAGES = {"fedmeta/superlink:0.1.0": "flower-superlink", "fedmeta/supernode:0.1.0": "flower-supernode"}
HEALTH_FLAG = "--health-server-address"
LOOPBACK = "127.0.0.1:"


@pytest.fixture(scope="module")
def compose_files(tmp_path_factory) -> dict[str, Path]:
    bundle = provision(tmp_path_factory.mktemp("consortium") / "c", server_names=["localhost"], sites=["a"]).out
    return {"deploy/coordinator/compose.yaml": DEPLOY / "coordinator/compose.yaml",
            "deploy/site/compose.yaml": DEPLOY / "site/compose.yaml",
            "bundle compose.yaml (fedmeta provision)": bundle / "sites/a/compose.yaml"}


def _command(service: dict) -> str:
    """The program a compose service runs: its entrypoint, else its image's (fedmeta's images run Flower's)."""
    if "entrypoint" in service:
        return " ".join(service["entrypoint"])
    return FLOWER_IMAGES.get(service["image"], service["image"])


def _option(args: list[str], flag: str) -> str | None:
    for i, arg in enumerate(args):
        if arg == flag:
            return args[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def _dialled(check: list[str]) -> set[str]:
    """The host:port addresses a check command dials."""
    return set(re.findall(r"(?:https?://|')(\d+\.\d+\.\d+\.\d+:\d+)", " ".join(check)))


def _health_problems(name: str, args: list[str], check: list[str] | None) -> list[str]:
    """A Flower process serves gRPC health on loopback, and its check dials that address; an exporter's check dials
    its --port."""
    problems = []
    dialled = _dialled(check or [])
    health = _option(args, HEALTH_FLAG)
    if name in ("flower-superlink", "flower-supernode", "fedmeta site-exec"):
        if health is None or not health.startswith(LOOPBACK):
            problems.append(f"passes no {HEALTH_FLAG} on loopback ({health})")
        elif dialled != {health}:
            problems.append(f"health check dials {sorted(dialled)}, not its {HEALTH_FLAG} {health}")
    elif name in ("fedmeta site-metrics", "fedmeta server-metrics"):
        port = _option(args, "--port")
        if not any(address.endswith(f":{port}") for address in dialled) and check and "httpGet" not in check:
            problems.append(f"health check dials {sorted(dialled)}, not its --port {port}")
    return problems


def compose_problems(path: Path) -> list[str]:
    problems = []
    for name, service in _compose(path)["services"].items():
        found = []
        check = service.get("healthcheck", {})
        test = check.get("test")
        runs = isinstance(test, list) and test[:1] in (["CMD"], ["CMD-SHELL"]) and len(test) > 1
        if not runs or check.get("disable"):
            found.append("healthcheck: no test command")
        found += [f"healthcheck: no {key}" for key in ("interval", "timeout", "retries", "start_period")
                  if key not in check]
        if service.get("read_only") is not True:
            found.append("read_only is not true")
        tmpfs = [entry.split(":", 1)[0] for entry in service.get("tmpfs", [])]  # "/tmp:uid=49999" mounts /tmp
        if "/tmp" not in tmpfs:
            found.append("no tmpfs for /tmp")
        flwr_home = service.get("environment", {}).get("FLWR_HOME")
        if _command(service) in ("flower-superlink", "flower-supernode", "fedmeta site-exec") and flwr_home not in tmpfs:
            found.append(f"FLWR_HOME ({flwr_home}) is not a tmpfs (Flower writes there; the root is read-only)")
        if "no-new-privileges:true" not in service.get("security_opt", []):
            found.append("security_opt has no no-new-privileges:true")
        if service.get("cap_drop") != ["ALL"] or service.get("cap_add"):
            found.append(f"cap_drop is {service.get('cap_drop')}, cap_add {service.get('cap_add')}: want [ALL] and none")
        found += [f"no {key} (resource limit)" for key in ("mem_limit", "cpus") if key not in service]
        if "deploy" in service:  # docker-compose 1.29 would ignore it without --compatibility: say the limits once
            found.append("deploy: limits are mem_limit and cpus in this format")
        found += _health_problems(_command(service), service.get("command", []), test)
        problems += [f"{path}: service {name}: {item}" for item in found]
    return problems


def _deployment() -> dict:
    return next(doc for doc in yaml.safe_load_all(K8S.read_text()) if doc and doc["kind"] == "Deployment")


def k8s_problems() -> list[str]:
    pod = _deployment()["spec"]["template"]["spec"]
    problems = []
    if pod.get("securityContext", {}).get("seccompProfile") != {"type": "RuntimeDefault"}:
        problems.append(f"{K8S}: pod: securityContext.seccompProfile is not {{type: RuntimeDefault}}")
    if pod.get("securityContext", {}).get("runAsNonRoot") is not True:
        problems.append(f"{K8S}: pod: securityContext.runAsNonRoot is not true")
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    for container in pod["containers"]:
        found = []
        context = container.get("securityContext", {})
        for key, want in (("readOnlyRootFilesystem", True), ("allowPrivilegeEscalation", False), ("runAsNonRoot", True)):
            if context.get(key) is not want:
                found.append(f"securityContext.{key} is not {str(want).lower()}")
        if context.get("capabilities", {}).get("drop") != ["ALL"] or context.get("capabilities", {}).get("add"):
            found.append(f"securityContext.capabilities is {context.get('capabilities')}, not {{drop: [ALL]}}")
        if context.get("privileged"):
            found.append("privileged")
        resources = container.get("resources", {})
        found += [f"resources.{kind} has no {what}" for kind in ("requests", "limits") for what in ("cpu", "memory")
                  if what not in resources.get(kind, {})]
        mounts = {mount["mountPath"]: mount["name"] for mount in container.get("volumeMounts", [])}
        env = {item["name"]: item.get("value") for item in container.get("env", [])}
        writable = ["/tmp"] + ([env["FLWR_HOME"]] if "FLWR_HOME" in env else [])
        if container["name"] in ("supernode", "site-exec") and "FLWR_HOME" not in env:
            found.append("no FLWR_HOME (Flower writes to ~/.flwr under a read-only root)")
        for path in writable:
            if "emptyDir" not in volumes.get(mounts.get(path), {}):
                found.append(f"{path} is not an emptyDir mount (the root is read-only)")
        found += [f"volumeMount {name} names no volume" for name in mounts.values() if name not in volumes]
        name = " ".join(container.get("command", [])) or FLOWER_IMAGES[container["image"]]
        for probe in ("livenessProbe", "readinessProbe"):
            handler = {"exec", "grpc", "tcpSocket", "httpGet"} & set(container.get(probe, {}))
            if not handler:
                found.append(f"no {probe}")
                continue
            check = container[probe].get("exec", {}).get("command", ["httpGet"] if "httpGet" in handler else [])
            found += [f"{probe}: {problem}" for problem in _health_problems(name, container.get("args", []), check)]
        problems += [f"{K8S}: container {container['name']}: {item}" for item in found]
    return problems


def test_every_compose_service_is_hardened(compose_files):
    problems = [problem for path in compose_files.values() for problem in compose_problems(path)]
    assert not problems, "\n".join(problems)


def test_every_kubernetes_container_is_hardened():
    problems = k8s_problems()
    assert not problems, "\n".join(problems)


def test_the_checks_find_what_is_missing(tmp_path):
    """The checks above could fail: a service and a container stripped of each item are reported, item by item."""
    services = _compose(DEPLOY / "site/compose.yaml")
    bare = services["services"]["supernode"]
    for key in ("healthcheck", "read_only", "security_opt", "cap_drop", "mem_limit", "cpus", "tmpfs"):
        del bare[key]
    bare["command"] = [arg for arg in bare["command"] if not arg.startswith(HEALTH_FLAG)]
    (tmp_path / "compose.yaml").write_text(yaml.safe_dump(services))
    found = [problem for problem in compose_problems(tmp_path / "compose.yaml") if "service supernode:" in problem]
    for item in ("healthcheck: no test command", "read_only", "no tmpfs for /tmp", "FLWR_HOME", "no-new-privileges",
                 "cap_drop", "no mem_limit", "no cpus", f"passes no {HEALTH_FLAG}"):
        assert any(item in problem for problem in found), (item, found)
    assert all(str(tmp_path / "compose.yaml") in problem for problem in found)


def test_the_kubernetes_site_is_configured_not_hard_coded():
    """The coordinator's address comes from the fedmeta-site-config ConfigMap, the data from a claim the site binds."""
    docs = [doc for doc in yaml.safe_load_all(K8S.read_text()) if doc]
    containers = {c["name"]: c for c in _deployment()["spec"]["template"]["spec"]["containers"]}
    supernode = containers["supernode"]
    assert "--superlink=$(SUPERLINK)" in supernode["args"]
    superlink = next(item for item in supernode["env"] if item["name"] == "SUPERLINK")
    assert superlink["valueFrom"]["configMapKeyRef"] == {"name": "fedmeta-site-config", "key": "SUPERLINK"}
    assert "kubectl create configmap fedmeta-site-config --from-literal=SUPERLINK=" in K8S.read_text()
    assert not [doc["kind"] for doc in docs if doc["kind"] == "PersistentVolume"], "the data volume is the site's own"
    assert not re.search(r"example\.org", yaml.safe_dump(docs)), "an address is hard-coded"
    claim = next(doc for doc in docs
                 if doc["kind"] == "PersistentVolumeClaim" and doc["metadata"]["name"] == "fedmeta-site-data")
    assert claim["spec"]["accessModes"] == ["ReadOnlyMany"]


def test_every_health_flag_passed_exists_in_the_installed_commands(help_flags, compose_files):  # noqa: F811
    passed = []
    for path in compose_files.values():
        for service in _compose(path)["services"].values():
            if HEALTH_FLAG in _flags(service.get("command", [])):
                passed.append((_command(service), service["command"]))
    for container in _deployment()["spec"]["template"]["spec"]["containers"]:
        if HEALTH_FLAG in _flags(container.get("args", [])):
            name = " ".join(container.get("command", [])) or FLOWER_IMAGES[container["image"]]
            passed.append((name, container["args"]))
    assert {name for name, _args in passed} == {"flower-superlink", "flower-supernode", "fedmeta site-exec"}
    assert len(passed) == 7  # superlink; supernode and site-exec in the site's compose, the bundle's and Kubernetes
    for name, args in passed:
        unknown = _flags(args) - help_flags[name]
        assert not unknown, f"{name} has no {sorted(unknown)}"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _all_checks(compose_files) -> list[tuple[str, list[str]]]:
    checks = []
    for label, path in compose_files.items():
        for name, service in _compose(path)["services"].items():
            test = service["healthcheck"]["test"]
            if test[1] == "python":
                checks.append((f"{label}: {name}", test[1:]))
    for container in _deployment()["spec"]["template"]["spec"]["containers"]:
        if "exec" in container["livenessProbe"]:
            checks.append((f"k8s: {container['name']}", container["livenessProbe"]["exec"]["command"]))
    return checks


def _run_check(command: list[str], address: str) -> int:
    (dialled,) = _dialled(command)
    command = [sys.executable, *command[1:-1], command[-1].replace(dialled, address)]
    return subprocess.run(command, capture_output=True, timeout=60, check=False).returncode


def test_the_grpc_health_checks_ask_flowers_health_server(compose_files):
    from flwr.supercore.grpc_health import run_health_server_grpc_no_tls

    grpc_checks = [(where, check) for where, check in _all_checks(compose_files) if "grpc_health" in check[-1]]
    assert len(grpc_checks) == 7
    address = f"127.0.0.1:{_free_port()}"
    server = run_health_server_grpc_no_tls(address)
    try:
        for where, check in grpc_checks:
            assert _run_check(check, address) == 0, where
    finally:
        server.stop(None)
    for where, check in grpc_checks[:1]:  # nothing listening: the check fails
        assert _run_check(check, address) != 0, where


@pytest.mark.parametrize("exporter", ["site-metrics", "server-metrics"])
def test_the_exporters_health_checks_ask_their_metrics(exporter, compose_files, tmp_path):
    checks = [(where, check) for where, check in _all_checks(compose_files) if "urllib" in check[-1]]
    assert len(checks) == 3  # server-metrics; site-metrics in the site's compose and the bundle's
    port = _free_port()
    fedmeta = shutil.which("fedmeta") or pytest.skip("the fedmeta command is not installed")
    process = subprocess.Popen([fedmeta, exporter, "--dir", str(tmp_path), "--port", str(port), "--address", "127.0.0.1"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while _run_check(checks[0][1], f"127.0.0.1:{port}") != 0:
            assert process.poll() is None and time.monotonic() < deadline, process.stdout.read() if process.stdout else ""
            time.sleep(0.2)
        for where, check in checks:
            assert _run_check(check, f"127.0.0.1:{port}") == 0, where
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.mark.skipif(not shutil.which("docker-compose"), reason="docker-compose is not installed")
def test_docker_compose_accepts_every_file(compose_files):
    """docker-compose 1.29 (Debian's) validates each file against its schema and keeps the limits it honours."""
    env = {"PATH": "/usr/bin:/bin", "CONSORTIUM": "/nonexistent", "SERVER_NAME": "coordinator.example.org",
           "DATA_DIR": "/nonexistent", "SUPERLINK": "coordinator.example.org:8000"}
    for label, path in compose_files.items():
        result = subprocess.run(["docker-compose", "-f", str(path), "config"], capture_output=True, text=True,
                                env=env, timeout=60, check=False)
        assert result.returncode == 0, (label, result.stderr)
        resolved = yaml.safe_load(result.stdout)["services"]
        for name, service in resolved.items():
            assert "mem_limit" in service and "cpus" in service and "healthcheck" in service, (label, name)
