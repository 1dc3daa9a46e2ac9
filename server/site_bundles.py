"""A site's bundle (its key, the CA, its start script and compose file, the release key it verifies with) and
the SuperLink's script that registers every site's key (the layout: ``fedmeta.server.provision``)."""

from __future__ import annotations

import json
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedmeta.common.outputs import PRIVATE_FOLDER_MODE, make_folder, refuse_links
from fedmeta.server.certificates import CURVE
from fedmeta.server.consortium_files import write_file

SITE_IMAGE = "fedmeta/supernode:0.1.0"


def site_bundle(out: Path, name: str, address: str) -> bytes:
    """Writes a site's bundle ``out/sites/<name>``; returns its OpenSSH public key."""
    bundle = out / "sites" / name
    key = ec.generate_private_key(CURVE)
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    public += f" fedmeta-site-{name}\n".encode()
    make_folder(bundle, PRIVATE_FOLDER_MODE, within=out)
    refuse_links(bundle / "REVOKED", out)
    (bundle / "REVOKED").unlink(missing_ok=True)
    write_file(bundle / "site.key", private, 0o600, out=out)
    write_file(bundle / "site.pub", public, 0o644, out=out)
    write_file(bundle / "ca.crt", (out / "ca" / "ca.crt").read_bytes(), 0o644, out=out)
    write_bundle_files(out, name, address)
    return public


def write_bundle_files(out: Path, name: str, address: str) -> None:
    """The non-secret files of the bundle ``out/sites/<name>``, which name the address the site dials."""
    bundle = out / "sites" / name
    write_file(bundle / "site.json", (json.dumps({"site": name, "superlink": address, "ca": "ca.crt",
                                                  "private_key": "site.key", "public_key": "site.pub"},
                                                 indent=2) + "\n").encode(), 0o644, out=out)
    write_file(bundle / "start-site.sh", START_SCRIPT.format(address=address).encode(), 0o755, out=out)
    write_file(bundle / "compose.yaml", SITE_COMPOSE.format(address=address, image=SITE_IMAGE, site=name).encode(),
               0o644, out=out)


NODE_IDS = "node-ids"  # OUT/superlink/node-ids/<site>: the node id the SuperLink gave the site's key


def write_register_script(path: Path, out: Path, registry: dict) -> None:
    # Flower 1.41's `flwr supernode list` shows neither a node's name nor its key (every owner is "none"), so the
    # node id `flwr supernode register --format json` answers is the only handle `unregister` can take: kept here.
    lines = ["#!/bin/sh",
             "# Registers every active site's public key with the running SuperLink (run on the coordinator) and",
             f"# records the node id the SuperLink gives each in superlink/{NODE_IDS}/<site> (fedmeta revoke-site",
             "# prints `flwr supernode unregister <node id>` with it).",
             "# CONNECTION: the name of the SuperLink connection in $FLWR_HOME/config.toml (README).",
             "set -eu", 'CONNECTION="${1:?usage: register-sites.sh CONNECTION}"',
             'HERE="$(cd "$(dirname "$0")/.." && pwd)"',
             f'IDS="$HERE/superlink/{NODE_IDS}"',
             'mkdir -p "$IDS"',
             "register() {  # SITE PUBLIC_KEY",
             '  if reply="$(flwr supernode register "$2" "$CONNECTION" --name "$1" --format json)" &&',
             '     id="$(printf \'%s\' "$reply" | python3 -c \'import json, sys; r = json.load(sys.stdin); '
             'print(r.get("node-id", "") if r.get("success") else "")\')" && [ -n "$id" ]; then',
             '    printf \'%s\\n\' "$id" > "$IDS/$1"',
             '    echo "$1: registered as node $id"',
             "  else  # re-runnable: a key registered before is refused by the SuperLink; say so and go on",
             '    echo "$1: not registered now (already registered? recorded node id: $(cat "$IDS/$1" 2>/dev/null || '
             'echo none))"',
             "  fi",
             "}"]
    for name in sorted(registry.get("sites", {})):
        lines.append(f'register {name} "$HERE/sites/{name}/site.pub"')
    write_file(path, ("\n".join(lines) + "\n").encode(), 0o755, out=out)


def recorded_node_id(out: Path, site: str) -> int | None:
    """The node id register-sites.sh recorded for ``site``'s key, or None."""
    try:
        text = (Path(out) / "superlink" / NODE_IDS / site).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def unregister_step(out: Path, site: str) -> str:
    """The command that removes ``site``'s node from the running SuperLink (Flower 1.41), or how to find its id."""
    node_id = recorded_node_id(out, site)
    if node_id is not None:
        return f"flwr supernode unregister {node_id} <connection>"
    return (f"flwr supernode unregister <node-id> <connection>, where <node-id> is the number `flwr supernode register` "
            f"answered for sites/{site}/site.pub; none was recorded in {Path(out) / 'superlink' / NODE_IDS / site} (the "
            "key was registered by hand or before register-sites.sh recorded ids). Flower 1.41's `flwr supernode list "
            "<connection> --format json` shows no names or keys (every owner is \"none\"): its node is the one whose "
            "created-at is when its key was registered")


START_SCRIPT = """#!/bin/sh
# Joins this hospital to the consortium: TLS against the consortium CA, authenticated by this site's key.
# Usage: ./start-site.sh DATA_DIR   (the site's MSD-layout folder; check it first: fedmeta doctor / check-data)
# METRICS_PORT=9101 ./start-site.sh DATA_DIR also serves the site's own metrics (episodes, seconds per
# episode, device, memory) on 127.0.0.1:9101/metrics via `fedmeta site-metrics` (METRICS_DIR: where the
# ClientApp records them, default ./metrics beside this script).
set -eu
HERE="$(cd "$(dirname "$0")" && pwd)"
DATA_DIR="$(cd "${{1:?usage: start-site.sh DATA_DIR}}" && pwd)"
NODE_CONFIG="data-dir=\\"$DATA_DIR\\""
if [ -n "${{METRICS_PORT:-}}" ]; then
  METRICS_DIR="${{METRICS_DIR:-$HERE/metrics}}"
  NODE_CONFIG="$NODE_CONFIG metrics-dir=\\"$METRICS_DIR\\""
fi
set -- flower-supernode \\
  --superlink {address} \\
  --root-certificates "$HERE/ca.crt" \\
  --auth-supernode-private-key "$HERE/site.key" \\
  --node-config "$NODE_CONFIG"
if [ -z "${{METRICS_PORT:-}}" ]; then
  exec "$@"  # the SuperNode takes this process: a supervisor's signals reach it
fi
fedmeta site-metrics --dir "$METRICS_DIR" --port "$METRICS_PORT" &
EXPORTER=$!
"$@" &
SUPERNODE=$!
trap 'kill "$SUPERNODE" "$EXPORTER" 2>/dev/null || true' INT TERM
STATUS=0
wait "$SUPERNODE" || STATUS=$?
kill "$SUPERNODE" "$EXPORTER" 2>/dev/null || true
wait "$SUPERNODE" 2>/dev/null || true
exit "$STATUS"
"""

SITE_COMPOSE = """# One hospital's SuperNode. Start: docker compose up -d  (DATA_DIR: the site's MSD-layout folder).
# The site's own metrics (episodes, seconds per episode, device, memory): 127.0.0.1:${{METRICS_PORT:-9101}}/metrics.
services:
  supernode:
    image: {image}
    restart: unless-stopped
    command:
      - --superlink={address}
      - --root-certificates=/run/secrets/ca.crt
      - --auth-supernode-private-key=/run/secrets/site.key
      - --node-config=data-dir="/data" metrics-dir="/metrics"
    volumes:
      - ${{DATA_DIR:?set DATA_DIR to the site's data folder}}:/data:ro
      - metrics:/metrics
      - state:/state  # the site's random order key (FEDMETA_HOME): kept across restarts
    secrets:  # the image runs as Flower's uid 49999: `sudo chown 49999 site.key` keeps it 0600 and readable
      - ca.crt
      - site.key
    environment:
      FLWR_TELEMETRY_ENABLED: "0"
      FEDMETA_HOME: /state
  metrics:
    image: {image}
    restart: unless-stopped
    entrypoint: ["fedmeta", "site-metrics"]
    command: ["--dir=/metrics", "--port=9101", "--address=0.0.0.0"]
    volumes:
      - metrics:/metrics:ro
    ports:
      - "127.0.0.1:${{METRICS_PORT:-9101}}:9101"
volumes:
  metrics:
  state:
secrets:
  ca.crt:
    file: ./ca.crt
  site.key:
    file: ./site.key
"""


__all__ = ["NODE_IDS", "SITE_IMAGE", "recorded_node_id", "site_bundle", "unregister_step", "write_bundle_files",
           "write_register_script"]
