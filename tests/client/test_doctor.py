"""`fedmeta doctor`: a site's pre-flight check against a real TLS server on loopback."""

from __future__ import annotations

import http.server
import json
import os
import ssl
import threading

import pytest

from fedmeta.client.doctor import doctor
from fedmeta.server.provision import provision
from fedmeta.simulations.cli import main
from fedmeta.simulations.engines.flower_runtime import _free_ports


@pytest.fixture
def consortium(tmp_path):
    port = _free_ports(1)[0]
    return provision(tmp_path / "c", server_names=["localhost", "127.0.0.1"], sites=["a"], port=port).out, port


@pytest.fixture
def tls_server(consortium):
    """An HTTPS server with the SuperLink's provisioned certificate, on the bundle's port."""
    out, port = consortium
    server = http.server.HTTPServer(("127.0.0.1", port), http.server.BaseHTTPRequestHandler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(out / "superlink/server.crt", out / "superlink/server.key")
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def by_name(checks):
    return {c.name: c for c in checks}


def test_a_good_bundle_passes_every_check(consortium, tls_server, smoke_federation, capsys):
    out, _ = consortium
    site = next(p for p in sorted(smoke_federation.iterdir()) if (p / "dataset.json").exists())
    assert main(["doctor", "--bundle", str(out / "sites/a"), "--data", str(site)]) == 0
    printed = capsys.readouterr().out
    assert "checks passed" in printed
    checks = by_name(doctor(bundle=out / "sites/a", data=site))
    assert {checks[n].status for n in ("bundle", "private key", "CA certificate", "SuperLink over TLS", "clock", "data")} == {"ok"}
    assert checks["GPU"].status in ("ok", "note")  # a CPU-only site is fine, only slower


def test_each_problem_fails_with_its_fix(consortium, tls_server, tmp_path, capsys):
    out, port = consortium
    bundle = out / "sites/a"
    os.chmod(bundle / "site.key", 0o644)
    checks = by_name(doctor(bundle=bundle))
    assert checks["private key"].status == "FAIL" and "chmod 600" in checks["private key"].fix
    os.chmod(bundle / "site.key", 0o600)
    # A SuperLink whose certificate another CA signed: refused.
    other = provision(tmp_path / "other", server_names=["localhost"], sites=["x"]).out
    (bundle / "ca.crt").write_bytes((other / "ca/ca.crt").read_bytes())
    checks = by_name(doctor(bundle=bundle))
    assert checks["SuperLink over TLS"].status == "FAIL" and "does not vouch" in checks["SuperLink over TLS"].detail
    (bundle / "ca.crt").write_bytes((out / "ca/ca.crt").read_bytes())
    # Nobody listening at the address in site.json.
    info = json.loads((bundle / "site.json").read_text())
    info["superlink"] = f"localhost:{_free_ports(1)[0]}"
    (bundle / "site.json").write_text(json.dumps(info))
    checks = by_name(doctor(bundle=bundle, timeout=2))
    assert checks["SuperLink over TLS"].status == "FAIL" and "cannot reach" in checks["SuperLink over TLS"].detail
    assert main(["doctor", "--bundle", str(bundle), "--timeout", "2"]) == 1
    assert "fix:" in capsys.readouterr().out
    (bundle / "site.key").unlink()
    assert by_name(doctor(bundle=bundle))["bundle"].status == "FAIL"
    assert main(["doctor"]) == 2


def test_a_check_that_raises_is_a_fail_line_not_a_traceback(consortium, monkeypatch):
    import fedmeta.client.doctor as doctor_module

    out, _ = consortium
    bundle = out / "sites/a"
    # A good certificate followed by a broken PEM block: refused with a FAIL line.
    with (bundle / "ca.crt").open("a") as handle:
        handle.write("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    assert by_name(doctor(bundle=bundle, timeout=2))["CA certificate"].status == "FAIL"

    def broken():
        raise RuntimeError("the driver library is missing")

    monkeypatch.setattr(doctor_module, "_gpu_check", broken)
    gpu = by_name(doctor(bundle=bundle, timeout=2))["GPU"]
    assert gpu.status == "FAIL" and "could not be checked: RuntimeError" in gpu.detail
