"""A site's bundle (its key, the CA, its start script and compose file, the release key it verifies with) and
the SuperLink's script that registers every site's key (the layout: ``fedmeta.server.provision``)."""

from __future__ import annotations

import json
from pathlib import Path

from fedmeta.common.outputs import PRIVATE_FILE_MODE, PRIVATE_FOLDER_MODE, make_folder, refuse_links
from fedmeta.common.site_identity import new_site_key
from fedmeta.server.consortium_files import write_file

SITE_IMAGE = "fedmeta/supernode:0.1.0"


def site_bundle(out: Path, name: str, address: str, public_key: bytes | None = None) -> bytes:
    """Writes a site's bundle ``out/sites/<name>``; returns its OpenSSH public key.

    With ``public_key`` (from the site's own request, ``fedmeta site-keygen``) the bundle holds that public key and
    no private key: the site keeps its own. Without, the coordinator makes the key pair (a single operator's pilot).
    """
    bundle = out / "sites" / name
    make_folder(bundle, PRIVATE_FOLDER_MODE, within=out)
    for stale in ("REVOKED", "site.key"):
        refuse_links(bundle / stale, out)
    (bundle / "REVOKED").unlink(missing_ok=True)
    if public_key is None:
        private, public = new_site_key(name)
        write_file(bundle / "site.key", private, PRIVATE_FILE_MODE, out=out)
    else:
        public = public_key
        (bundle / "site.key").unlink(missing_ok=True)  # a key the coordinator made before: the site's own replaces it
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
    # replace, not format: the script is bash, full of braces
    write_file(bundle / "start-site.sh", START_SCRIPT.replace("{address}", address).encode(), 0o755, out=out)
    approved = bundle / "approved-apps"  # the consortium's signed apps (fedmeta sign-app --consortium)
    approved.mkdir(exist_ok=True)
    approved.chmod(0o755)  # whatever the umask: only the site's owner may add files here
    compose = SITE_COMPOSE.format(address=address, image=SITE_IMAGE, site=name,
                                  supernode_health=grpc_healthcheck(9097), site_exec_health=grpc_healthcheck(9098))
    write_file(bundle / "compose.yaml", compose.encode(), 0o644, out=out)


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


START_SCRIPT = r"""#!/usr/bin/env bash
# Joins this hospital to the consortium: TLS against the consortium CA, authenticated by this site's key.
# Usage: ./start-site.sh DATA_DIR   (the site's MSD-layout folder; check it first: fedmeta doctor / check-data)
# Settings, from the environment:
#   LOCAL_PORT=9095    the SuperNode's local port on 127.0.0.1 (Flower's Runtime API, which the SuperNode's own
#                      SuperExec and ClientApp processes dial; default 9094). Two sites on one host: one each.
#   METRICS_PORT=9101  also serves the site's own metrics (episodes, seconds per episode, device, memory) on
#                      127.0.0.1:9101/metrics via `fedmeta site-metrics` (METRICS_DIR: where the ClientApp
#                      records them, default ./metrics beside this script).
#   STOP_GRACE_S=10    seconds the processes get to end after SIGTERM before they are killed.
# The script stays in the foreground and supervises what it starts, each in a process group of its own.
# SIGTERM, SIGINT (Ctrl-C) or SIGHUP stops them all, with whatever they started (the SuperNode's SuperExec and
# ClientApps), then the script exits 128 + the signal's number; when one of them ends by itself, the others are
# stopped and the script exits with its status (a supervisor such as systemd restarts the whole site).
# The SuperNode never installs an app's dependencies at run time: Flower 1.41 does so only when given
# --allow-runtime-dependency-installation, which this script does not give.
# Only the consortium's app runs here: the SuperNode starts no app process itself (--isolation process); its app
# gate, `fedmeta site-exec`, starts a ClientApp only for an app bundle signed in ./approved-apps/ with the
# consortium's release key (./release.pub), and refuses any other before any of its code is unpacked.
set -u
HERE="$(cd "$(dirname "$0")" && pwd)"
DATA_DIR="$(cd "${1:?usage: start-site.sh DATA_DIR}" && pwd)" || exit 2
LOCAL_PORT="${LOCAL_PORT:-9094}"
METRICS_PORT="${METRICS_PORT:-}"
STOP_GRACE_S="${STOP_GRACE_S:-10}"

refuse() { echo "start-site.sh: $*" >&2; exit 2; }
is_port() { case "$1" in "" | *[!0-9]* | 0*) return 1 ;; esac; [ "${#1}" -le 5 ] && [ "$1" -le 65535 ]; }
is_port "$LOCAL_PORT" || refuse "LOCAL_PORT=$LOCAL_PORT is not a TCP port (1-65535)"
[ -z "$METRICS_PORT" ] || is_port "$METRICS_PORT" || refuse "METRICS_PORT=$METRICS_PORT is not a TCP port (1-65535)"
[ "$METRICS_PORT" != "$LOCAL_PORT" ] || refuse "LOCAL_PORT and METRICS_PORT are both $LOCAL_PORT; give each its own"
case "$STOP_GRACE_S" in "" | *[!0-9]*) refuse "STOP_GRACE_S=$STOP_GRACE_S is not a whole number of seconds" ;; esac

CHILD_PIDS=() CHILD_NAMES=() STOP_SIGNAL="" TERM_SENT=""
pids() { echo ${CHILD_PIDS[@]+"${CHILD_PIDS[@]}"}; }  # (bash before 4.4 calls an empty array unbound)
start_child() {  # COMMAND [ARG...]: in the background, in a process group of its own that its children share
  set -m  # job control, on only while it forks: bash gives a background job its own process group
  "$@" </dev/null &
  set +m
  CHILD_PIDS+=("$!")
  case "${2:-}" in "" | -*) CHILD_NAMES+=("$1") ;; *) CHILD_NAMES+=("$1 $2") ;; esac
}
signal_children() {  # SIGNAL: to each child's process group, which holds what the child started
  local pid
  for pid in $(pids); do kill "-$1" -- "-$pid" 2>/dev/null || kill "-$1" "$pid" 2>/dev/null; done
}
any_alive() {
  local pid
  for pid in $(pids); do kill -0 -- "-$pid" 2>/dev/null || kill -0 "$pid" 2>/dev/null && return 0; done
  return 1
}
stop_children() {  # SIGTERM to every group; SIGKILL to what is left after STOP_GRACE_S seconds
  local tenths=0
  # Once only: Flower's processes take the first SIGTERM to shut down cleanly (a SuperNode tells the SuperLink it
  # leaves) and restore the default action, so a second one would kill them mid-way.
  [ -n "$TERM_SENT" ] || signal_children TERM
  while any_alive && [ "$tenths" -lt $((STOP_GRACE_S * 10)) ]; do sleep 0.1; tenths=$((tenths + 1)); done
  if any_alive; then
    echo "start-site.sh: still running ${STOP_GRACE_S} s after SIGTERM; killing them" >&2
    signal_children KILL
  fi
  wait 2>/dev/null
}
on_signal() {  # NUMBER: the main loop below stops everything and exits 128 + NUMBER
  [ -n "$STOP_SIGNAL" ] || STOP_SIGNAL="$1"
  [ -n "$TERM_SENT" ] || signal_children TERM  # now: the loop may be waiting for a child to end
  TERM_SENT=1
}
trap 'on_signal 1' HUP
trap 'on_signal 2' INT
trap 'on_signal 15' TERM

NODE_CONFIG="data-dir=\"$DATA_DIR\""
if [ -n "$METRICS_PORT" ]; then
  METRICS_DIR="${METRICS_DIR:-$HERE/metrics}"
  NODE_CONFIG="$NODE_CONFIG metrics-dir=\"$METRICS_DIR\""
fi
if (exec 3<>"/dev/tcp/127.0.0.1/$LOCAL_PORT") 2>/dev/null; then
  refuse "something already listens on 127.0.0.1:$LOCAL_PORT (another site's SuperNode?); give this site its own LOCAL_PORT"
fi
# The SuperNode hands its tasks only to a process holding this secret: its app gate. Made here, on first start; it
# never leaves the site.
SECRET="$HERE/superexec.secret"
if [ ! -s "$SECRET" ]; then
  (umask 077 && od -An -N32 -tx1 /dev/urandom | tr -d ' \n' > "$SECRET") || refuse "cannot write $SECRET"
fi
mkdir -p -m 755 "$HERE/approved-apps"
set -- flower-supernode \
  --superlink {address} \
  --root-certificates "$HERE/ca.crt" \
  --auth-supernode-private-key "$HERE/site.key" \
  --port "$LOCAL_PORT" \
  --isolation process \
  --superexec-auth-secret-file "$SECRET" \
  --node-config "$NODE_CONFIG"
# The processes the site runs, one start_child line each.
start_child "$@"
start_child fedmeta site-exec --runtime-api-address "127.0.0.1:$LOCAL_PORT" \
  --approved-apps "$HERE/approved-apps" --public-key "$HERE/release.pub" --superexec-auth-secret-file "$SECRET"
[ -z "$METRICS_PORT" ] || start_child fedmeta site-metrics --dir "$METRICS_DIR" --port "$METRICS_PORT"

if [ "${BASH_VERSINFO[0]}" -gt 4 ] || { [ "${BASH_VERSINFO[0]}" -eq 4 ] && [ "${BASH_VERSINFO[1]}" -ge 3 ]; }; then
  wait_any() { wait -n 2>/dev/null; }  # returns when a child ends or a signal arrives
else
  wait_any() { sleep 1 & wait "$!"; }  # bash before 4.3 has no wait -n: look once a second
fi
ENDED="" STATUS=0 LAST_STATUS=127
while [ -z "$STOP_SIGNAL" ]; do
  for i in "${!CHILD_PIDS[@]}"; do
    if ! kill -0 "${CHILD_PIDS[$i]}" 2>/dev/null; then
      wait "${CHILD_PIDS[$i]}"
      STATUS=$?
      [ "$STATUS" -ne 127 ] || STATUS="$LAST_STATUS"  # bash already handed it to wait -n
      ENDED="${CHILD_NAMES[$i]}"
      break 2
    fi
  done
  wait_any
  LAST_STATUS=$?
done
if [ -n "$STOP_SIGNAL" ]; then
  STATUS=$((128 + STOP_SIGNAL))
else
  echo "start-site.sh: $ENDED ended (status $STATUS); stopping the rest" >&2
  # Flower's SUPERNODE_CONNECTION_ERROR, exit code 305: a process status keeps its low 8 bits, 49
  if [ "$STATUS" -eq $((305 % 256)) ] && [ "${ENDED%% *}" = flower-supernode ]; then
    echo "start-site.sh: the SuperLink did not admit this site: most often its key is not registered (or was" \
         "revoked); run 'fedmeta doctor --bundle $HERE' to see which check fails" >&2
  fi
fi
stop_children
exit "$STATUS"
"""

def grpc_healthcheck(port: int) -> str:
    """A compose healthcheck asking gRPC health (no TLS) on the container's loopback ``port``, with python and
    grpc_health (a dependency of flwr) inside the image: the SuperNode's and its app gate's alike."""
    return (f"""    healthcheck:
      test: ["CMD", "python", "-c", "import sys, grpc; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g;
        r = g.HealthStub(grpc.insecure_channel('127.0.0.1:{port}')).Check(h.HealthCheckRequest(), timeout=5);
        sys.exit(r.status != h.HealthCheckResponse.SERVING)"]
      interval: 30s
      timeout: 10s
      retries: 3
      start_period: 30s""")


SITE_COMPOSE = """# One hospital's SuperNode. Start: docker compose up -d  (DATA_DIR: the site's MSD-layout folder).
# The site's own metrics (episodes, seconds per episode, device, memory): 127.0.0.1:${{METRICS_PORT:-9101}}/metrics.
# Hardened: every service has a healthcheck, a read-only root filesystem (tmpfs where it writes), no new
# privileges, no capabilities, and memory and CPU limits: `mem_limit` and `cpus`, which docker compose v2 and
# docker-compose 1.29 (Debian's) both honour in this format (no `version:` key; 1.29 applies
# `deploy.resources.limits` only with --compatibility). The ClientApps train in site-exec: SITE_EXEC_MEMORY and
# SITE_EXEC_CPUS fit its limits to the site's machine.
# Health: the SuperNode and its app gate serve gRPC health, without TLS, on the loopback they share (127.0.0.1:9097
# and 127.0.0.1:9098, --health-server-address), which a `python -c` with grpc_health (a dependency of flwr) asks;
# the metrics exporter answers /metrics over HTTP.
services:
  supernode:
    image: {image}
    restart: unless-stopped
    command:
      - --superlink={address}
      - --root-certificates=/run/secrets/ca.crt
      - --auth-supernode-private-key=/run/secrets/site.key
      # its local port (Flower's Runtime API), on the container's own loopback: LOCAL_PORT matters with host networking
      - --port=${{LOCAL_PORT:-9094}}
      - --isolation=process  # it starts no app itself: the site-exec service below does, approved apps only
      - --superexec-auth-secret-file=/run/secrets/superexec.secret
      - --node-config=data-dir="/data" metrics-dir="/metrics"
      - --health-server-address=127.0.0.1:9097  # gRPC health without TLS, for the healthcheck only: loopback
    secrets:  # the image runs as Flower's uid 49999: `sudo chown 49999 site.key` keeps it 0600 and readable
      - ca.crt
      - site.key
      - superexec.secret
    environment:
      FLWR_TELEMETRY_ENABLED: "0"
      FLWR_HOME: /flwr-home  # Flower's own files (it writes none it needs to keep): tmpfs under a read-only root
    read_only: true
    tmpfs: [/tmp, /flwr-home]
    security_opt: [no-new-privileges:true]
    cap_drop: [ALL]
    mem_limit: 1g
    cpus: 1
{supernode_health}
  site-exec:  # the site's app gate: the ClientApps run here, for app bundles the consortium signed only
    image: {image}
    restart: unless-stopped
    network_mode: "service:supernode"  # the SuperNode's loopback, where its Runtime API listens
    depends_on:
      supernode: {{condition: service_healthy}}
    entrypoint: ["fedmeta", "site-exec"]
    command: ["--runtime-api-address=127.0.0.1:${{LOCAL_PORT:-9094}}", "--approved-apps=/approved-apps",
              "--public-key=/release/release.pub", "--superexec-auth-secret-file=/run/secrets/superexec.secret",
              "--health-server-address=127.0.0.1:9098"]  # gRPC health, on the loopback it shares with the SuperNode
    secrets:
      - superexec.secret
    volumes:
      - ${{DATA_DIR:?set DATA_DIR to the site's data folder}}:/data:ro
      - metrics:/metrics
      - state:/state  # the site's random order key (FEDMETA_HOME): kept across restarts
      - ./approved-apps:/approved-apps:ro  # the bundle's signed app approvals (fedmeta sign-app)
      - ./release.pub:/release/release.pub:ro
    environment:
      FLWR_TELEMETRY_ENABLED: "0"
      FEDMETA_HOME: /state
      FLWR_HOME: /flwr-home  # where Flower unpacks each approved app bundle (FAB) its ClientApps run from
    read_only: true
    tmpfs: [/tmp, /flwr-home]
    security_opt: [no-new-privileges:true]
    cap_drop: [ALL]
    mem_limit: ${{SITE_EXEC_MEMORY:-8g}}
    cpus: ${{SITE_EXEC_CPUS:-2}}  # Docker refuses more than the machine has: raise it on a larger one
{site_exec_health}
  metrics:  # the site's own metrics (episodes, seconds per episode, device, memory) for its IT team
    image: {image}
    restart: unless-stopped
    entrypoint: ["fedmeta", "site-metrics"]
    command: ["--dir=/metrics", "--port=9101", "--address=0.0.0.0"]
    volumes:
      - metrics:/metrics:ro
    ports:
      - "127.0.0.1:${{METRICS_PORT:-9101}}:9101"
    read_only: true
    tmpfs: [/tmp]
    security_opt: [no-new-privileges:true]
    cap_drop: [ALL]
    mem_limit: 256m
    cpus: 0.5
    healthcheck:
      test: ["CMD", "python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9101/metrics', timeout=5)"]
      interval: 30s
      timeout: 10s
      retries: 3
      start_period: 20s
volumes:
  metrics:
  state:
secrets:
  ca.crt:
    file: ./ca.crt
  site.key:
    file: ./site.key
  superexec.secret:  # the SuperNode and its app gate share it; make it once: (umask 077; openssl rand -hex 32 > superexec.secret)
    file: ./superexec.secret
"""


__all__ = ["NODE_IDS", "SITE_IMAGE", "recorded_node_id", "site_bundle", "unregister_step", "write_bundle_files",
           "write_register_script"]
