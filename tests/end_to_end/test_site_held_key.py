"""A site joins with a key it made itself: `fedmeta site-keygen` at the site, the coordinator registers only its
public half (`fedmeta provision --site-request`), and the site's SuperNode is admitted on loopback."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from fedmeta.client.site_keys import site_keygen
from fedmeta.server.provision import provision
from fedmeta.simulations.engines.flower_runtime import LocalDeployment

pytestmark = [pytest.mark.slow]


def test_a_site_joins_with_the_key_it_made_and_the_coordinator_never_held(smoke_federation, tmp_path):
    from fedmeta.common.synth import load_manifest

    sites = [Path(s.path) for s in load_manifest(smoke_federation).train_sites[:2]]
    with LocalDeployment(sites, late=[1], flwr_home=tmp_path / "flwr-home") as deployment:
        # At the site: its own key, kept in its own folder; only the request goes to the coordinator.
        request = site_keygen(deployment.site_name(1), tmp_path / "at-the-site")
        provision(deployment.pki, site_requests=[request], rekey_sites=[deployment.site_name(1)])
        bundle = deployment.pki / "sites" / deployment.site_name(1)
        held_by_coordinator = sorted(p.name for p in bundle.iterdir())
        deployment.register_site(1)  # register-sites.sh's step: the bundle's site.pub, the site's own public key
        shutil.copyfile(tmp_path / "at-the-site" / "site.key", bundle / "site.key")  # the site's own copy of its bundle
        supernode = deployment.start_supernode(1)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and sum(n["status"] == "online" for n in deployment.nodes()) < 2:
            assert supernode.poll() is None, deployment.log_of(supernode.pid)[-2000:]
            time.sleep(0.5)
        online = sum(node["status"] == "online" for node in deployment.nodes())
    assert "site.key" not in held_by_coordinator and "site.pub" in held_by_coordinator
    assert online == 2
