"""`fedmeta fleet-proxy-config`: the Fleet-only proxy's nginx configuration for a consortium's folder.

tests/end_to_end/test_fleet_proxy.py runs what it writes in Debian's nginx; tests/server/test_deploy.py checks
the coordinator compose file's template is the same configuration.
"""

from __future__ import annotations

import pytest

from fedmeta.server.fleet_proxy import FleetProxy, for_consortium, render
from fedmeta.server.provision import provision
from fedmeta.simulations.cli import main

GOOD = dict(certificate="/c/server.crt", certificate_key="/c/server.key", ca_certificate="/c/ca.crt", listen="8000",
            upstream="127.0.0.1:8001", server_name="coordinator.example.org")


@pytest.mark.parametrize("changes, named", [
    ({"certificate": "consortium/superlink/server.crt"}, "certificate"),
    ({"certificate_key": "/c/my key"}, "certificate_key"),
    ({"ca_certificate": "/c/ca.crt;include /etc/passwd"}, "ca_certificate"),
    ({"listen": "eight-thousand"}, "listen"),
    ({"listen": "0.0.0.0:70000"}, "listen"),
    ({"upstream": "superlink"}, "upstream"),
    ({"upstream": "127.0.0.1:0"}, "upstream"),
    ({"upstream": "127.0.0.1:8001; return 200"}, "upstream"),
    ({"server_name": "coordinator.example.org:8000"}, "server_name"),
    ({"server_name": "a b"}, "server_name"),
])
def test_bad_arguments_are_refused_naming_the_argument(changes, named):
    with pytest.raises(ValueError, match=f"^{named} "):
        FleetProxy(**{**GOOD, **changes})


@pytest.mark.parametrize("listen", ["8000", "0.0.0.0:8000", "[::]:8443", "coordinator.example.org:443"])
def test_listen_takes_a_port_or_an_address_and_port(listen):
    assert f"listen {listen} ssl;" in render(FleetProxy(**{**GOOD, "listen": listen}))


@pytest.mark.parametrize("server_names, expected", [
    (["coordinator.example.org", "127.0.0.1"], "coordinator.example.org"),
    (["127.0.0.1", "localhost"], "localhost"),  # nginx matches no IP address where the certificate has a DNS name
    (["10.0.0.5", "127.0.0.1"], "10.0.0.5"),    # no DNS name at all: the common name, the first address, counts
])
def test_the_consortiums_proxy_checks_the_superlink_for_a_name_nginx_can_match(tmp_path, server_names, expected):
    out = provision(tmp_path / "c", server_names=server_names, sites=["a"], port=9443).out
    proxy = for_consortium(out, upstream="127.0.0.1:9001")
    assert proxy.server_name == expected
    assert proxy.listen == "9443"  # the port the site bundles dial
    assert proxy.certificate == str((out / "superlink/server.crt").resolve())
    assert proxy.ca_certificate == str((out / "superlink/ca.crt").resolve())
    config = render(proxy)
    assert f"proxy_ssl_name         {expected};" in config and "server 127.0.0.1:9001;" in config


def test_a_name_nginx_could_not_match_is_refused_before_nginx_reports_a_502(tmp_path):
    out = provision(tmp_path / "c", server_names=["coordinator.example.org", "127.0.0.1"], sites=["a"]).out
    with pytest.raises(ValueError, match=r"--server-name '127\.0\.0\.1'.*\['coordinator\.example\.org'\]"):
        for_consortium(out, server_name="127.0.0.1")
    wildcard = provision(tmp_path / "w", server_names=["*.example.org"], sites=["a"]).out
    with pytest.raises(ValueError, match="only wildcard names"):
        for_consortium(wildcard)
    assert for_consortium(wildcard, server_name="coordinator.example.org").server_name == "coordinator.example.org"
    with pytest.raises(ValueError, match="--server-name 'a.b.example.org'"):
        for_consortium(wildcard, server_name="a.b.example.org")


def test_the_command_writes_the_configuration_or_says_what_is_missing(tmp_path, capsys):
    out = provision(tmp_path / "c", server_names=["coordinator.example.org"], sites=["a"]).out
    written = tmp_path / "fleet-proxy.conf"
    assert main(["fleet-proxy-config", "--consortium", str(out), "--listen", "0.0.0.0:8000", "--out",
                 str(written)]) == 0
    assert written.read_text() == render(for_consortium(out, listen="0.0.0.0:8000"))
    assert main(["fleet-proxy-config", "--consortium", str(tmp_path / "nowhere")]) == 1
    assert "nowhere/superlink/server.crt is missing" in capsys.readouterr().err
