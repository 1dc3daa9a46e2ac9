"""Sites that keep their own keys: `fedmeta site-keygen` at the site, `fedmeta provision --site-request` at the
coordinator, whose folder then holds no private key of that site; the old flow (the coordinator makes the key)
stays for single-operator pilots."""

from __future__ import annotations

import json
import shutil
import stat
from pathlib import Path

import pytest

from fedmeta.client.site_keys import site_keygen
from fedmeta.common.site_identity import SiteRequestError, read_site_request
from fedmeta.server.provision import provision
from fedmeta.simulations.cli import main


def _ed25519_line() -> str:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    return Ed25519PrivateKey.generate().public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                                  serialization.PublicFormat.OpenSSH).decode()


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_site_made_key_is_registered_and_no_private_key_reaches_the_coordinator(tmp_path):
    site_dir = tmp_path / "at-the-site"
    request = site_keygen("st-marys", site_dir)
    assert _mode(site_dir) == 0o700 and _mode(site_dir / "site.key") == 0o600
    out = provision(tmp_path / "consortium", server_names=["localhost"], sites=["pilot"],
                    site_requests=[request]).out
    bundle = out / "sites" / "st-marys"
    assert not (bundle / "site.key").exists()
    assert [p for p in out.rglob("site.key") if "st-marys" in str(p)] == []
    assert (bundle / "site.pub").read_bytes() == (site_dir / "site.pub").read_bytes()
    registry = json.loads((out / "registry.json").read_text())
    assert registry["sites"]["st-marys"]["private_key_held_by"] == "site"
    assert registry["sites"]["pilot"]["private_key_held_by"] == "coordinator"
    assert (out / "sites" / "pilot" / "site.key").is_file()  # the pilot flow is unchanged
    assert 'register st-marys "$HERE/sites/st-marys/site.pub"' in (out / "superlink/register-sites.sh").read_text()
    # The site copies the bundle beside its own key; doctor finds the pair (the SuperLink part is tested elsewhere).
    for item in bundle.iterdir():
        if item.is_file():
            shutil.copyfile(item, site_dir / item.name)
    from fedmeta.client.doctor import _key_check

    assert _key_check(site_dir / "site.key").status == "ok"
    # --force (a new CA) keeps the site's own key: the coordinator still makes none for it.
    provision(out, server_names=["localhost"], force=True)
    assert not (bundle / "site.key").exists()
    assert (bundle / "site.pub").read_bytes() == (site_dir / "site.pub").read_bytes()


def test_a_key_and_a_bundle_that_do_not_pair_fail_doctor(tmp_path):
    from fedmeta.client.doctor import _key_check

    site_keygen("a", tmp_path / "a")
    site_keygen("b", tmp_path / "b")
    shutil.copyfile(tmp_path / "b" / "site.pub", tmp_path / "a" / "site.pub")
    check = _key_check(tmp_path / "a" / "site.key")
    assert check.status == "FAIL" and "is not the key of" in check.detail


@pytest.mark.parametrize(("change", "said"), [
    (lambda r: r.update(public_key_sha256="0" * 64), "was edited"),
    (lambda r: r.update(site="St Marys"), "is not a site name"),
    (lambda r: r.update(public_key=_ed25519_line()), "not an EC"),
    (lambda r: r.update(format=2), "not a site request"),
], ids=["edited", "bad-name", "wrong-curve", "format"])
def test_a_bad_request_is_refused_naming_the_file(tmp_path, change, said):
    request = site_keygen("c", tmp_path / "c")
    body = json.loads(request.read_text())
    change(body)
    request.write_text(json.dumps(body))
    with pytest.raises(SiteRequestError, match=said):
        read_site_request(request)
    assert main(["provision", "--out", str(tmp_path / "consortium"), "--server-name", "localhost",
                 "--site-request", str(request)]) == 1
    assert not (tmp_path / "consortium" / "sites" / "c").exists()


def test_a_registered_site_changes_key_only_on_request(tmp_path):
    out = provision(tmp_path / "consortium", server_names=["localhost"], sites=["d"]).out
    request = site_keygen("d", tmp_path / "d")
    with pytest.raises(ValueError, match="--rekey-site d"):
        provision(out, site_requests=[request])
    provision(out, site_requests=[request], rekey_sites=["d"])
    assert not (out / "sites/d/site.key").exists()  # the coordinator's old key is gone with the bundle's
    assert (out / "sites/d/site.pub").read_bytes() == (tmp_path / "d/site.pub").read_bytes()
    with pytest.raises(ValueError, match="keeps its own key"):
        provision(out, rekey_sites=["d"])


def test_site_keygen_never_replaces_a_key(tmp_path, capsys):
    assert main(["site-keygen", "--site", "e", "--out", str(tmp_path / "e")]) == 0
    assert "sha256 " in capsys.readouterr().out
    key = (tmp_path / "e" / "site.key").read_bytes()
    assert main(["site-keygen", "--site", "e", "--out", str(tmp_path / "e")]) == 1
    assert "never replaced" in capsys.readouterr().err
    assert (tmp_path / "e" / "site.key").read_bytes() == key
