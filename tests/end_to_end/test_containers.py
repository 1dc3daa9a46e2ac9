"""The coordinator and site images built and run for real: deploy/smoke.sh in a container engine.

Minutes: it builds the wheelhouse and five images, starts the coordinator's compose stack and two site
bundles' stacks, trains two rounds of the smoke preset through the fleet-proxy and checks that Prometheus
scrapes the coordinator's server-metrics and a site's exporter. Marked `containers` (and `slow`); skips,
saying why, where no container engine answers (`docker info` fails), as on CI.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
SMOKE = REPO_ROOT / "deploy" / "smoke.sh"


def _engine_answers() -> str | None:
    """None when `docker info` succeeds within seconds; else why the containers cannot run here."""
    docker = shutil.which("docker")
    if docker is None:
        return "no docker client on PATH (no container engine here)"
    if shutil.which("docker-compose") is None:
        return "docker-compose is not installed (Debian: apt-get install docker-compose)"
    try:
        info = subprocess.run([docker, "info"], capture_output=True, text=True, timeout=15, check=False)
    except subprocess.TimeoutExpired:
        return "`docker info` did not answer within 15 s"
    if info.returncode != 0:
        return f"no container engine answers: `docker info` exited {info.returncode}: {info.stderr.strip()[:200]}"
    return None


@pytest.mark.containers
@pytest.mark.slow
def test_smoke_script_builds_the_images_trains_two_rounds_and_prometheus_scrapes_both_exporters():
    reason = _engine_answers()
    if reason is not None:
        pytest.skip(reason)
    bin_dir = str(Path(sys.executable).parent)  # this environment's fedmeta and flwr, as the script expects
    env = dict(os.environ, PATH=bin_dir + os.pathsep + os.environ.get("PATH", ""))
    result = subprocess.run(["bash", str(SMOKE)], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                            timeout=1800, check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    assert "finished:completed" in output
    assert "Prometheus /api/v1/targets: fedmeta-server=up fedmeta-site=up" in output
    assert "smoke test passed" in output
