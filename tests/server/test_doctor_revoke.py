"""`fedmeta doctor` checks the bundle's release key against its pin; `revoke-site` prints steps Flower 1.41 takes."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import click
import pytest
import typer

from fedmeta.client.doctor import doctor
from fedmeta.server.provision import provision, revoke_site
from fedmeta.simulations.cli import main
from tests.common.test_release import _key_pair


def _release_check(bundle: Path):
    return next(c for c in doctor(bundle=bundle, timeout=0.5) if c.name == "release key")


def test_doctor_fails_a_bundle_whose_release_pub_was_swapped(tmp_path, capsys):
    out = provision(tmp_path / "c", server_names=["localhost"], sites=["a"]).out
    bundle = out / "sites/a"
    check = _release_check(bundle)
    assert check.status == "ok" and json.loads((bundle / "site.json").read_text())["release_key_sha256"] in check.detail
    _private, forged = _key_pair(tmp_path, "forger")
    (bundle / "release.pub").write_bytes(forged.read_bytes())
    check = _release_check(bundle)
    assert check.status == "FAIL" and "not the" in check.detail and "site.json pins" in check.detail
    assert "restore release.pub" in check.fix
    assert main(["doctor", "--bundle", str(bundle), "--timeout", "0.5"]) == 1
    assert "release key: " in capsys.readouterr().out
    (bundle / "release.pub").write_text("not a key")
    assert _release_check(bundle).status == "FAIL"
    (bundle / "release.pub").unlink()
    assert "lacks release.pub" in _release_check(bundle).detail
    info = json.loads((bundle / "site.json").read_text())
    del info["release_key_sha256"]
    (bundle / "site.json").write_text(json.dumps(info))
    assert "pins no release key" in _release_check(bundle).detail


# --------------------------------------------------------------------------------------------------
# revoke-site


def _flower_command(argv: list[str]):
    """Parses ``flwr ...`` with Flower's own CLI (typer/click) without running it; raises click.UsageError."""
    from flwr.cli.app import app

    command = typer.main.get_command(app)
    context = click.Context(command)
    assert argv[0] == "flwr"
    args = argv[1:]
    while isinstance(command, click.Group):
        command = command.get_command(context, args[0])
        assert command is not None, args[0]
        args = args[1:]
    return command.make_context(command.name, args).params


def _printed_flwr(text: str, verb: str) -> list[str]:
    start = text.index(f"flwr supernode {verb}")
    return text[start:].split(".")[0].replace("<connection>", "consortium").split()


def _fake_flwr(bin_dir: Path, node_ids: dict[str, int]) -> None:
    """A stand-in `flwr` whose `supernode register --format json` answers as Flower 1.41's does."""
    bin_dir.mkdir()
    cases = "\n".join(f'  *fedmeta-site-{name}*) echo \'{{\n  "success": true,\n  "node-id": {node}\n}}\' ;;'
                      for name, node in node_ids.items())
    (bin_dir / "flwr").write_text(f"""#!/bin/sh
echo "$@" >> "{bin_dir}/calls"
key="$(cat "$3")"
case "$key" in
{cases}
  *) echo '{{"success": false, "error-message": "Public key already in use"}}' ;;
esac
""")
    (bin_dir / "flwr").chmod(0o755)


def test_register_sites_records_node_ids_and_revoke_site_prints_a_step_flower_accepts(tmp_path, capsys):
    out = provision(tmp_path / "c", server_names=["localhost"], sites=["a", "b"]).out
    bin_dir = tmp_path / "bin"
    _fake_flwr(bin_dir, {"a": 1234567890123, "b": 42})
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    result = subprocess.run([str(out / "superlink/register-sites.sh"), "consortium"], env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "b: registered as node 42" in result.stdout
    # Every `flwr supernode register` the script runs is one Flower's parser accepts, asking for JSON.
    for call in (bin_dir / "calls").read_text().splitlines():
        params = _flower_command(["flwr", *call.split()])
        assert params["output_format"] == "json" and params["superlink"] == "consortium" and params["name"] in "ab"
    assert main(["revoke-site", "--out", str(out), "--site", "b"]) == 0
    printed = capsys.readouterr().out
    assert "flwr supernode unregister 42 <connection>" in printed
    assert _flower_command(_printed_flwr(printed, "unregister"))["node_id"] == 42
    assert json.loads((out / "registry.json").read_text())["revoked"]["b"]["node_id"] == 42
    # Run again (keys already registered): the recorded ids stay.
    subprocess.run([str(out / "superlink/register-sites.sh"), "consortium"], env=env, capture_output=True, timeout=60)
    assert (out / "superlink/node-ids/a").read_text().strip() == "1234567890123"


def test_without_a_recorded_id_revoke_site_says_how_to_find_it(tmp_path):
    out = provision(tmp_path / "c", server_names=["localhost"], sites=["a"]).out
    printed = revoke_site(out, "a")
    assert "flwr supernode unregister <node-id> <connection>" in printed
    assert "flwr supernode register" in printed and "created-at" in printed and "owner/name" not in printed
    with pytest.raises(click.UsageError):  # the template itself is not a command to paste
        _flower_command(_printed_flwr(printed, "unregister"))
    assert _flower_command(["flwr", "supernode", "list", "consortium", "--format", "json"])["output_format"] == "json"


def _listed_nodes(home, connection: str) -> list[dict]:
    from fedmeta.simulations.engines.flower_runtime import _json_payload

    result = home.flwr(["supernode", "list", connection, "--format", "json"])
    payload = _json_payload(result.stdout)
    assert payload and payload.get("success"), (result.returncode, result.stdout, result.stderr)
    return list(payload.get("nodes", []))


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="the leftover-process check reads /proc")
def test_revoke_site_steps_unregister_the_node_on_a_real_superlink(tmp_path, capsys):
    """Loopback, Flower 1.41: a TLS SuperLink with SuperNode auth; the provisioned register-sites.sh, run as is,
    records the node ids the SuperLink answers; the unregister step revoke-site prints removes that node only."""
    import time

    from fedmeta.simulations.engines.flower_runtime import _FlowerHome, _flower_bin, _free_ports
    from fedmeta.simulations.engines.processes import stop_processes
    from tests.end_to_end.test_deployment import alive, descendants

    (port,) = _free_ports(1)
    out = provision(tmp_path / "c", server_names=["127.0.0.1"], port=port, sites=["a", "b"]).out
    home = _FlowerHome(tmp_path / "flwr-home")
    assert home.env["FLWR_TELEMETRY_ENABLED"] == "0" and home.env["FLWR_DISABLE_UPDATE_CHECK"] == "1"
    connection = "consortium"
    home.write_connection(connection, address=f"127.0.0.1:{port}", root_certificates=str(out / "ca/ca.crt"))
    superlink_dir = out / "superlink"
    log_path = tmp_path / "superlink.log"
    with log_path.open("wb") as log:
        superlink = subprocess.Popen(
            [_flower_bin("flower-superlink"), "--ssl-ca-certfile", str(superlink_dir / "ca.crt"),
             "--ssl-certfile", str(superlink_dir / "server.crt"), "--ssl-keyfile", str(superlink_dir / "server.key"),
             "--enable-supernode-auth", "--host", "127.0.0.1", "--port", str(port),
             "--database", str(tmp_path / "superlink-state.db")],
            env=home.env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while True:  # until the SuperLink answers over TLS
            assert superlink.poll() is None, log_path.read_text(errors="replace")[-2000:]
            result = home.flwr(["supernode", "list", connection, "--format", "json"])
            if '"success": true' in result.stdout:
                break
            assert time.monotonic() < deadline, (result.stdout, log_path.read_text(errors="replace")[-2000:])
            time.sleep(0.3)
        assert _listed_nodes(home, connection) == []

        # The provisioned script, unmodified, with the operator's FLWR_HOME and connection name.
        result = subprocess.run([str(superlink_dir / "register-sites.sh"), connection], env=home.env,
                                stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, (result.stdout, result.stderr)
        ids = {site: (superlink_dir / "node-ids" / site).read_text().strip() for site in ("a", "b")}
        assert all(i.isdigit() for i in ids.values()) and ids["a"] != ids["b"], ids
        for site, node_id in ids.items():
            assert f"{site}: registered as node {node_id}" in result.stdout, result.stdout
        listed = {str(node["node-id"]): node for node in _listed_nodes(home, connection)}
        assert set(listed) == set(ids.values()), listed
        assert {node["status"] for node in listed.values()} == {"registered"}, listed

        assert main(["revoke-site", "--out", str(out), "--site", "b"]) == 0
        printed = capsys.readouterr().out
        step = f"flwr supernode unregister {ids['b']} <connection>"
        assert step in printed and "<connection> the SuperLink connection register-sites.sh used" in printed, printed
        # The printed step, as printed, with only <connection> filled in as the text says.
        argv = _printed_flwr(printed, "unregister")
        assert argv == ["flwr", "supernode", "unregister", ids["b"], connection], argv
        result = home.flwr(argv[1:])
        assert result.returncode == 0, (result.stdout, result.stderr)

        after = {str(node["node-id"]): node for node in _listed_nodes(home, connection)}
        assert after.get(ids["a"], {}).get("status") == "registered", after
        # Flower 1.41 keeps the row, marked unregistered (its key can no longer authenticate).
        assert after[ids["b"]]["status"] == "unregistered" and after[ids["b"]]["deleted-at"] != "N/A", after
        # Re-running the (rewritten) script registers no revoked key again, and a's key stays registered once.
        result = subprocess.run([str(superlink_dir / "register-sites.sh"), connection], env=home.env,
                                stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0 and "b:" not in result.stdout, (result.stdout, result.stderr)
        again = {str(node["node-id"]): node for node in _listed_nodes(home, connection)}
        assert [i for i, node in again.items() if node["status"] == "registered"] == [ids["a"]], again
    finally:
        spawned = descendants([superlink.pid])
        left = stop_processes({superlink.pid}, home.tag)
        try:
            superlink.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        assert left == set(), f"could not stop the SuperLink's processes {sorted(left)}"
    assert not [pid for pid in [superlink.pid, *spawned] if alive(pid)], "processes left running"
