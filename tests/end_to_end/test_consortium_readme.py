"""README "Consortium", run as written on loopback: provision, sign the app, a SuperLink behind the Fleet-only nginx,
two hospitals through `start-site.sh`, a 2-round run read back as `finished:completed`; then a restarted SuperLink
still admits the registered sites and `fedmeta doctor` says in words that an unregistered key is not admitted.

Slow (about two minutes). The commands come from README.md's block; only what names this machine is substituted:
the coordinator's DNS name (localhost), its two ports (free ones), the sites' data folders, the run's out-dir and
size (2 rounds of the smoke preset). Every process is stopped by PID, found by the runtime tag they inherit.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import tomli_w

from fedmeta.simulations.engines.app_bundle import stage_app
from fedmeta.simulations.engines.flower_home import _FlowerHome
from fedmeta.simulations.engines.flower_runtime import _free_ports
from fedmeta.simulations.engines.processes import stop_processes, tagged
from fedmeta.simulations.experiments.presets import load_preset
from tests.end_to_end.test_fleet_proxy import NGINX  # where the proxy test finds Debian's nginx

REPO_ROOT = Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(NGINX is None, reason="nginx is not installed (Debian: apt-get install nginx; .ci/run does)"),
    pytest.mark.skipif(not Path("/proc").is_dir(), reason="processes are found by the tag in /proc/PID/environ"),
]


def readme_consortium_commands() -> tuple[list[str], list[str], list[str]]:
    """The README's consortium block as (coordinator before the sites join, each hospital, coordinator after)."""
    text = (REPO_ROOT / "README.md").read_text()
    start = text.index("```bash\n# 1. coordinator: the consortium's CA")
    block = text[start + len("```bash\n"):text.index("```", start + 8)]
    parts: list[list[str]] = [[], [], []]
    part, lines = 0, iter(block.splitlines())
    for line in lines:
        if line.startswith("# 6. each hospital"):
            part = 1
        elif line.startswith("# 7. coordinator"):
            part = 2
        if not line.strip() or line.startswith("#"):
            continue
        command = line
        while command.endswith("\\"):
            command = command[:-1] + next(lines).strip()
        if "<<EOF" in command:
            command += "\n" + "\n".join(iter(lambda: next(lines), "EOF")) + "\nEOF"
        parts[part].append(command)
    return parts[0], parts[1], parts[2]


def test_the_readme_consortium_path_completes_and_a_restarted_superlink_keeps_its_sites(smoke_federation, tmp_path):
    from fedmeta.common.synth import load_manifest

    coordinator, hospital, submit = readme_consortium_commands()
    assert any(c.startswith("flower-superlink") and c.endswith("&") for c in coordinator), coordinator
    sites = [Path(s.path) for s in load_manifest(smoke_federation).train_sites[:2]]
    fleet_port, control_port, *local_ports = _free_ports(4)
    checkout = stage_app(REPO_ROOT, tmp_path / "checkout")  # the files `flwr run .` bundles from a checkout
    out_dir = tmp_path / "run1"
    overrides, _driver = load_preset("smoke")
    # The run's size only (flwr takes no TOML file beside key=value pairs); the README's own keys stay as written.
    tiny = " ".join(f"{key}={tomli_w.dumps({'v': value}).split('=', 1)[1].strip()}"
                    for key, value in overrides.items() if key not in ("num-rounds", "min-sites"))

    def here(command: str, **site: str) -> str:
        command = command.replace("coordinator.example.org", "localhost")
        command = re.sub(r"\b8000\b", str(fleet_port), re.sub(r"\b8001\b", str(control_port), command))
        command = command.replace("/srv/fedmeta/run1", str(out_dir)).replace("num-rounds=50", "num-rounds=2")
        if command.startswith("flwr run"):
            command = command.replace("--stream", f"--run-config {shlex.quote(tiny)} --stream")
        if "data" in site:
            command = command.replace("/data/our-site", site["data"])
        if command.startswith("./start-site.sh"):
            command = f"LOCAL_PORT={site['local_port']} {command}"
        return command

    home = _FlowerHome(tmp_path / "flwr-home").__enter__()
    env = dict(home.env, PATH=os.pathsep.join([str(Path(shutil.which("fedmeta") or "").parent),
                                               home.env.get("PATH", ""), "/usr/sbin", "/sbin"]))
    services: list[subprocess.Popen] = []
    transcript: list[str] = []

    def sh(command: str, cwd: Path) -> subprocess.CompletedProcess[str]:
        if command.endswith("&"):  # a service: it keeps running, in its own session, until the test stops it
            log = (tmp_path / f"service-{len(services)}.log").open("wb")
            services.append(subprocess.Popen(["bash", "-c", command[:-1].strip()], cwd=cwd, env=env, stdout=log,
                                             stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                             start_new_session=True))
            time.sleep(1.0)
            return subprocess.CompletedProcess(command, 0, "", "")
        result = subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True,
                                timeout=400, stdin=subprocess.DEVNULL)
        transcript.append(f"$ {command}\n{result.stdout[-3000:]}{result.stderr[-3000:]}")
        assert result.returncode == 0, "\n".join(transcript[-3:])
        return result

    try:
        for command in coordinator:
            sh(here(command), checkout)
            if command.startswith("flower-superlink"):
                _wait_for_port(control_port, services[-1], tmp_path)
        consortium = checkout / "consortium"
        bundles = [consortium / "sites" / name for name in ("st-marys", "riverside")]
        for bundle, data, port in zip(bundles, sites, local_ports, strict=True):
            for command in hospital:
                result = sh(here(command, data=str(data), local_port=str(port)), bundle)
                if command.startswith("fedmeta doctor"):
                    assert "site key registered" in result.stdout and "all " in result.stdout, result.stdout
        sites_started = services[-2:]
        for command in submit:
            sh(here(command), checkout)
        listed = json.loads(home.flwr(["list", "consortium", "--format", "json"]).stdout)
        statuses = [run["status"] for run in listed["runs"]]
        assert statuses == ["finished:completed"], listed
        assert (out_dir / "checkpoint.pt").is_file()

        # A site's SIGTERM stops its SuperNode (which tells the SuperLink it leaves), its app gate and what they
        # started; then the SuperLink restarts.
        for process in sites_started:
            os.killpg(process.pid, signal.SIGTERM)
            assert process.wait(timeout=30) == 128 + signal.SIGTERM
        superlink = next(p for p in services if "flower-superlink" in p.args[-1])

        assert stop_processes({superlink.pid}, None) == set()
        superlink.wait(timeout=10)
        sh(superlink.args[-1] + " &", checkout)
        _wait_for_port(control_port, services[-1], tmp_path)
        for bundle in bundles:  # the restarted SuperLink still admits both registered keys, through the proxy
            result = sh(f"fedmeta doctor --bundle {bundle}", checkout)
            assert re.search(r"^ok +site key registered: the SuperLink admits", result.stdout, re.M), result.stdout
        # A site provisioned later and never registered is told so in words, before its SuperNode starts.
        sh(here("fedmeta provision --out consortium --site latecomer"), checkout)
        refused = subprocess.run(["fedmeta", "doctor", "--bundle", str(consortium / "sites" / "latecomer")],
                                 cwd=checkout, env=env, capture_output=True, text=True, timeout=60)
        assert refused.returncode == 1 and "does not admit this site's key" in refused.stdout, refused.stdout
    finally:
        pid_file = checkout / "consortium" / "fleet-proxy" / "nginx.pid"
        roots = {p.pid for p in services} | ({int(pid_file.read_text())} if pid_file.is_file() else set())
        survivors = stop_processes(roots, home.tag)
        for process in services:
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        home.__exit__(None, None, None)
    assert survivors == set() and tagged(home.tag) == set()


def _wait_for_port(port: int, process: subprocess.Popen, tmp_path: Path, timeout_s: float = 60) -> None:
    import socket

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, f"{process.args} exited: {process.returncode}"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.3)
    raise AssertionError(f"nothing listens on {port} after {timeout_s} s ({process.args})")
