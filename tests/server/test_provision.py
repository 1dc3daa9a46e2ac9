"""`fedmeta provision` / `revoke-site`: the consortium's CA, SuperLink certificate and site bundles."""

from __future__ import annotations

import hashlib
import json
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedmeta.server.provision import provision
from fedmeta.simulations.cli import main


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_provision_writes_the_layout_and_the_server_certificate_verifies_against_the_ca(tmp_path, capsys):
    out = tmp_path / "consortium"
    assert main(["provision", "--out", str(out), "--server-name", "localhost", "--server-name", "127.0.0.1",
                 "--site", "a", "--site", "b"]) == 0
    printed = capsys.readouterr().out
    for path in ("ca/ca.crt", "ca/ca.key", "superlink/server.crt", "superlink/server.key", "sites/a/ca.crt",
                 "sites/b/ca.crt", "sites/a/site.key", "sites/a/site.pub", "sites/a/start-site.sh",
                 "sites/a/compose.yaml", "sites/a/site.json", "registry.json", "superlink/register-sites.sh"):
        assert (out / path).is_file(), path
    for key in ("ca/ca.key", "superlink/server.key", "sites/a/site.key", "sites/b/site.key"):
        assert _mode(out / key) == 0o600, key
    assert "expires" in printed and "SuperLink certificate" in printed

    ca = x509.load_pem_x509_certificate((out / "ca/ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((out / "superlink/server.crt").read_bytes())
    server.verify_directly_issued_by(ca)  # raises if the signature or issuer does not match
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert (out / "sites/a/ca.crt").read_bytes() == (out / "ca/ca.crt").read_bytes()

    # The site key is what flower-supernode loads and `flwr supernode register` accepts (Flower's own loader).
    from flwr.cli.supernode.register import try_load_public_key

    private = serialization.load_ssh_private_key((out / "sites/a/site.key").read_bytes(), None)
    assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
    assert try_load_public_key(out / "sites/a/site.pub")
    public = serialization.load_ssh_public_key((out / "sites/a/site.pub").read_bytes())
    assert public.public_numbers() == private.public_key().public_numbers()
    # A bundle holds what the site needs and nothing of another site's or the coordinator's.
    assert sorted(p.name for p in (out / "sites/a").iterdir()) == [
        "approved-apps", "ca.crt", "compose.yaml", "release.pub", "site.json", "site.key", "site.pub", "start-site.sh"]
    assert list((out / "sites/a/approved-apps").iterdir()) == []  # until the consortium signs an app (sign-app)
    # The consortium's release key: Ed25519, private half 0600 and only in release/, public half in every bundle.
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    release_key = serialization.load_pem_private_key((out / "release/release.key").read_bytes(), None)
    assert isinstance(release_key, Ed25519PrivateKey) and (out / "release/release.key").stat().st_mode & 0o777 == 0o600
    assert (out / "sites/a/release.pub").read_bytes() == (out / "release/release.pub").read_bytes() == \
        release_key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    from fedmeta.common.release import key_fingerprint

    pinned = key_fingerprint(release_key.public_key())
    assert json.loads((out / "registry.json").read_text())["release_key_sha256"] == pinned
    assert json.loads((out / "sites/a/site.json").read_text())["release_key_sha256"] == pinned
    assert json.loads((out / "sites/a/site.json").read_text())["superlink"] == "localhost:8000"
    script = (out / "sites/a/start-site.sh").read_text()
    assert "--root-certificates" in script and "--auth-supernode-private-key" in script and "--insecure" not in script
    register = (out / "superlink/register-sites.sh").read_text()
    assert "sites/a/site.pub" in register and "sites/b/site.pub" in register


def test_running_again_adds_sites_and_keeps_every_key_unless_forced(tmp_path):
    out = tmp_path / "c"
    provision(out, server_names=["localhost"], sites=["a"])
    before = {p: p.read_bytes() for p in out.rglob("*.key")}
    result = provision(out, sites=["b"])  # a site added later: the CA and the server certificate stay
    assert {p: p.read_bytes() for p in before} == before
    assert str(out / "sites" / "b") in result.created and str(out / "ca" / "ca.crt") in result.kept
    x509.load_pem_x509_certificate((out / "sites/b/ca.crt").read_bytes())
    assert provision(out, sites=["a"]).kept  # an existing bundle is kept
    assert (out / "sites/a/site.key").read_bytes() == before[out / "sites/a/site.key"]
    with pytest.raises(FileExistsError, match="--reissue-server"):
        provision(out, server_names=["other.example.org"])
    b_key = (out / "sites/b/site.key").read_bytes()
    provision(out, server_names=["other.example.org"], force=True)  # start over: every active site is reissued
    assert (out / "sites/a/site.key").read_bytes() != before[out / "sites/a/site.key"]
    assert (out / "sites/b/site.key").read_bytes() != b_key
    assert (out / "ca/ca.key").read_bytes() != before[out / "ca/ca.key"]
    assert (out / "sites/a/ca.crt").read_bytes() == (out / "sites/b/ca.crt").read_bytes() == (out / "ca/ca.crt").read_bytes()


def _verifies(out: Path) -> bool:
    ca = x509.load_pem_x509_certificate((out / "ca/ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((out / "superlink/server.crt").read_bytes())
    server.verify_directly_issued_by(ca)
    return True


def test_sites_are_added_and_rekeyed_with_the_ca_key_offline_and_the_server_reissued_with_it(tmp_path, capsys):
    out = tmp_path / "c"
    provision(out, server_names=["localhost"], sites=["a", "b"], port=9443)
    offline = tmp_path / "vault-ca.key"
    (out / "ca/ca.key").rename(offline)
    keys = {n: (out / f"sites/{n}/site.key").read_bytes() for n in ("a", "b")}
    provision(out, sites=["c"])  # ca.key offline: adding a site needs only ca.crt, and keeps the port
    assert json.loads((out / "sites/c/site.json").read_text())["superlink"] == "localhost:9443"
    assert main(["provision", "--out", str(out), "--rekey-site", "b"]) == 0
    assert "rekeyed b" in capsys.readouterr().out
    assert (out / "sites/b/site.key").read_bytes() != keys["b"] and (out / "sites/a/site.key").read_bytes() == keys["a"]
    registry = json.loads((out / "registry.json").read_text())
    assert registry["sites"]["b"]["public_key_sha256"] == hashlib.sha256((out / "sites/b/site.pub").read_bytes()).hexdigest()
    with pytest.raises(FileNotFoundError, match="ca.key is not here"):  # signing needs the CA key
        provision(out, server_names=["coordinator.example.org"], reissue_server=True)
    with pytest.raises(ValueError, match="not a provisioned site"):
        provision(out, rekey_sites=["zz"])
    offline.rename(out / "ca/ca.key")
    ca = (out / "ca/ca.crt").read_bytes()
    server = (out / "superlink/server.crt").read_bytes()
    provision(out, server_names=["coordinator.example.org"], reissue_server=True)
    assert (out / "superlink/server.crt").read_bytes() != server and (out / "ca/ca.crt").read_bytes() == ca
    assert _verifies(out)
    # The address moved: every bundle's start files say so; keys and CA are the same.
    for name in ("a", "c"):
        assert "coordinator.example.org:9443" in (out / f"sites/{name}/start-site.sh").read_text()
        assert "coordinator.example.org:9443" in (out / f"sites/{name}/compose.yaml").read_text()
    assert (out / "sites/a/site.key").read_bytes() == keys["a"]


def test_revoking_a_site_deletes_its_key_and_unlists_it(tmp_path, capsys):
    out = tmp_path / "c"
    provision(out, server_names=["localhost"], sites=["a", "b"])
    assert main(["revoke-site", "--out", str(out), "--site", "b"]) == 0
    assert "flwr supernode unregister" in capsys.readouterr().out
    assert not (out / "sites/b/site.key").exists() and (out / "sites/b/REVOKED").exists()
    registry = json.loads((out / "registry.json").read_text())
    assert list(registry["sites"]) == ["a"] and list(registry["revoked"]) == ["b"]
    assert "sites/b/" not in (out / "superlink/register-sites.sh").read_text()
    with pytest.raises(ValueError, match="revoked"):
        provision(out, sites=["b"])
    assert main(["revoke-site", "--out", str(out), "--site", "zz"]) == 1
    assert "not provisioned" in capsys.readouterr().err


@pytest.mark.parametrize(("argv", "message"), [
    (["--site", "a"], "--server-name is required"),
    (["--server-name", "localhost", "--site", "Bad Name"], "lower-case letters"),
    (["--server-name", "localhost", "--site", "a", "--site", "a"], "repeat"),
    (["--server-name", "localhost", "--port", "70000"], "TCP port"),
    (["--server-name", "localhost", "--days", "0"], "--days 0"),
])
def test_bad_arguments_name_the_problem(tmp_path, capsys, argv, message):
    assert main(["provision", "--out", str(tmp_path / "c"), *argv]) == 1
    assert message in capsys.readouterr().err


def test_a_bad_server_name_is_refused_before_anything_is_written(tmp_path):
    out = tmp_path / "c"
    with pytest.raises(ValueError, match="DNS name"):
        provision(out, server_names=["host:9000"], sites=["a"])
    assert not (out / "ca").exists()
    provision(out, server_names=["localhost"], sites=["a"])
    ca = (out / "ca/ca.crt").read_bytes()
    with pytest.raises(ValueError, match="DNS name"):
        provision(out, server_names=["ünï.org"], force=True)
    assert (out / "ca/ca.crt").read_bytes() == ca  # a failed --force leaves the consortium as it was


def test_a_named_kept_site_follows_the_new_address_and_a_registered_site_is_never_silently_rekeyed(tmp_path):
    out = tmp_path / "c"
    provision(out, server_names=["old.example.org"], sites=["alpha", "beta"])
    alpha_fingerprint = json.loads((out / "registry.json").read_text())["sites"]["alpha"]["public_key_sha256"]
    provision(out, server_names=["new.example.org"], reissue_server=True, sites=["alpha", "gamma"])
    for name in ("alpha", "beta", "gamma"):
        assert "new.example.org:8000" in (out / f"sites/{name}/start-site.sh").read_text(), name
    import shutil

    shutil.rmtree(out / "sites/alpha")  # handed over and removed from the coordinator's disk
    result = provision(out, sites=["alpha", "beta"])
    assert any("alpha" in k and "--rekey-site" in k for k in result.kept) and not result.rekeyed
    assert json.loads((out / "registry.json").read_text())["sites"]["alpha"]["public_key_sha256"] == alpha_fingerprint


def test_a_failed_force_writes_nothing(tmp_path):
    out = tmp_path / "c"
    provision(out, server_names=["localhost"], sites=["a", "b"])
    import shutil

    shutil.rmtree(out / "sites/b")
    (out / "sites/b").write_text("not a folder")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(FileExistsError, match="nothing was written"):
        provision(out, force=True)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
