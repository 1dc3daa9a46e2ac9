#!/usr/bin/env bash
# deploy/smoke.sh: the coordinator and site images built and run for real, on one machine, offline of any
# image registry. From the repository root, with fedmeta and flwr on PATH (the project's virtual environment):
#   bash deploy/smoke.sh
# It builds a wheelhouse (deploy/.wheelhouse: fedmeta from this checkout, flwr, CPU torch, every dependency),
# the SuperLink and SuperNode images from it only (pip --no-index) on BASE_IMAGE, and images of Debian's nginx
# and Prometheus (deploy/smoke/nginx, deploy/smoke/prometheus); provisions a consortium with sites a and b in a
# temporary folder, signs the app, starts deploy/coordinator/compose.yaml (SuperLink with TLS and node
# authentication, fleet-proxy, server-metrics, Prometheus) and each site bundle's compose.yaml (SuperNode with
# --isolation process, its site-exec gate, its metrics exporter), with the layers in deploy/smoke/ (a socat
# forward stands in for the network between site and coordinator); registers
# the sites, runs 2 rounds of the smoke preset through the Control API on 127.0.0.1:8001 until `flwr list`
# says finished:completed, checks that Prometheus scrapes server-metrics and site a's exporter, prints the
# wall time and the image sizes, and tears everything down (also on failure or Ctrl-C).
# Environment: BASE_IMAGE (default local/debian-bookworm-python:3.11, what /work/shared/tools/container-engine.sh
# builds; Flower's own images where Docker Hub answers: leave the Dockerfiles' defaults with BASE_IMAGE=flower),
# TORCH_INDEX_URL (an extra index for torch, e.g. CUDA wheels), KEEP_WORK=1 (keep the temporary folder),
# SMOKE_TIMEOUT_S (the run's limit, default 600). Host ports used: 8000, 8001, 9090, 9100-9102.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SMOKE_DIR=$REPO/deploy/smoke
BASE_IMAGE=${BASE_IMAGE:-local/debian-bookworm-python:3.11}
TORCH_VERSION=2.13.0
TIMEOUT_S=${SMOKE_TIMEOUT_S:-600}
SITES=(a b)
PROJECT=fedmeta-smoke
export SMOKE_DIR SMOKE_SUPERLINK_IMAGE=$PROJECT/superlink SMOKE_SUPERNODE_IMAGE=$PROJECT/supernode \
  SMOKE_FLEET_PROXY_IMAGE=$PROJECT/fleet-proxy SMOKE_PROMETHEUS_IMAGE=$PROJECT/prometheus SMOKE_SOCAT_IMAGE=$PROJECT/socat \
  SMOKE_COORDINATOR_NETWORK=$PROJECT-coordinator_default
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 COMPOSE_HTTP_TIMEOUT=300

say() { printf '[smoke %4ds] %s\n' "$((SECONDS))" "$*"; }
die() { say "FAILED: $*" >&2; exit 1; }

# Debian's docker client matches Debian's daemon (API 1.41); docker-compose 1.29 talks to the daemon itself.
DOCKER=$(command -v docker || true)
deb_docker=$(dpkg -L docker.io 2>/dev/null | grep '/bin/docker$' | head -1 || true)
[ -n "$deb_docker" ] && DOCKER=$deb_docker
[ -n "$DOCKER" ] && "$DOCKER" info >/dev/null 2>&1 || die "no container engine answers (docker info failed)"
command -v docker-compose >/dev/null || die "docker-compose not found (Debian: apt-get install docker-compose)"
for tool in fedmeta flwr; do command -v "$tool" >/dev/null || die "$tool not on PATH: activate the project's venv"; done
PYTHON=$(dirname "$(command -v fedmeta)")/python
"$DOCKER" image inspect "$BASE_IMAGE" >/dev/null 2>&1 || [ "$BASE_IMAGE" = flower ] \
  || die "base image $BASE_IMAGE is missing: run /work/shared/tools/container-engine.sh (or set BASE_IMAGE)"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/fedmeta-smoke.XXXXXX")
CONSORTIUM=$WORK/consortium
export FLWR_HOME=$WORK/flwr-home
compose_coordinator() {
  CONSORTIUM=$CONSORTIUM SERVER_NAME=localhost RUNS_DIR=$WORK/runs \
    docker-compose -p "$PROJECT-coordinator" -f "$REPO/deploy/coordinator/compose.yaml" \
    -f "$SMOKE_DIR/coordinator.override.yaml" "$@"
}
compose_site() {  # SITE INDEX compose-args...
  local site=$1 index=$2; shift 2
  # SITE_EXEC_CPUS: the bundle asks 4 CPUs for the ClientApps; Docker refuses more than the machine has.
  SMOKE_SITE=$site DATA_DIR=${DATA_DIRS[$index]:-/nonexistent} METRICS_PORT=$((9101 + index)) \
    SITE_EXEC_CPUS=${SITE_EXEC_CPUS:-$(( $(nproc) < 4 ? $(nproc) : 4 ))} \
    docker-compose -p "$PROJECT-$site" -f "$CONSORTIUM/sites/$site/compose.yaml" -f "$SMOKE_DIR/site.override.yaml" "$@"
}
DATA_DIRS=()
STARTED=()
cleanup() {
  local status=$?
  trap - EXIT INT TERM
  if [ $status -ne 0 ] && [ ${#STARTED[@]} -gt 0 ]; then
    say "logs of the containers (last 25 lines each):"
    for stack in "${STARTED[@]}"; do
      if [ "$stack" = coordinator ]; then compose_coordinator logs --no-color --tail=25 2>&1 || true
      else compose_site "${stack%%:*}" "${stack#*:}" logs --no-color --tail=25 2>&1 || true; fi
    done
  fi
  for ((i = ${#STARTED[@]} - 1; i >= 0; i--)); do  # the sites first: they hold the coordinator's network
    stack=${STARTED[$i]}
    if [ "$stack" = coordinator ]; then compose_coordinator down -v --remove-orphans >/dev/null 2>&1 || true
    else compose_site "${stack%%:*}" "${stack#*:}" down -v --remove-orphans >/dev/null 2>&1 || true; fi
  done
  if [ ${#STARTED[@]} -gt 0 ]; then
    left=$({ "$DOCKER" ps -aq --filter "name=$PROJECT-"; "$DOCKER" network ls -q --filter "name=$PROJECT-";
             "$DOCKER" volume ls -q --filter "name=$PROJECT-"; } | wc -l)
    if [ "$left" -eq 0 ]; then say "containers, networks and volumes removed"
    else say "WARNING: $left containers, networks or volumes named $PROJECT-* are left (docker ps -a)"; [ $status -ne 0 ] || status=1; fi
  fi
  if [ "${KEEP_WORK:-0}" = 1 ]; then say "kept $WORK"; else rm -rf "$WORK"; fi
  [ $status -eq 0 ] || say "smoke test failed (exit $status)"
  exit $status
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# 1. The wheelhouse: this checkout's files (tracked and new, not ignored) as a wheel, and every dependency.
say "wheelhouse: deploy/.wheelhouse (fedmeta, flwr, torch $TORCH_VERSION and dependencies)"
mkdir -p "$WORK/src" "$REPO/deploy/.wheelhouse"
(cd "$REPO" && git ls-files -co --exclude-standard -z | tar --null -T - -cf -) | tar -C "$WORK/src" -xf -
rm -f "$REPO"/deploy/.wheelhouse/fedmeta-*.whl
[ -z "${PIP_CERT:-}" ] && [ -f /etc/ssl/certs/ca-certificates.crt ] && export PIP_CERT=/etc/ssl/certs/ca-certificates.crt
"$PYTHON" -m pip wheel --quiet --disable-pip-version-check --wheel-dir "$REPO/deploy/.wheelhouse" \
  ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} "$WORK/src" "torch==$TORCH_VERSION" > "$WORK/pip.log" 2>&1 \
  || { grep -v "is ignored: it is neither" "$WORK/pip.log" | tail -20; die "pip wheel failed"; }
ls "$REPO"/deploy/.wheelhouse/fedmeta-*.whl >/dev/null 2>&1 || die "pip wheel wrote no fedmeta wheel"

# 2. The images: fedmeta's from the wheelhouse only; nginx and Prometheus from Debian's packages.
build() {  # TAG CONTEXT DOCKERFILE
  say "build $1"
  local base=()
  [ "$BASE_IMAGE" != flower ] && base=(--build-arg "BASE_IMAGE=$BASE_IMAGE")
  [ "$BASE_IMAGE" = flower ] && [ "$2" != "$REPO" ] && base=(--build-arg "BASE_IMAGE=local/debian-bookworm-python:3.11")
  DOCKER_BUILDKIT=1 "$DOCKER" build --quiet "${base[@]}" -f "$3" -t "$1" "$2" >/dev/null
}
build "$SMOKE_SUPERLINK_IMAGE" "$REPO" "$REPO/deploy/coordinator/Dockerfile"
build "$SMOKE_SUPERNODE_IMAGE" "$REPO" "$REPO/deploy/site/Dockerfile"
build "$SMOKE_FLEET_PROXY_IMAGE" "$SMOKE_DIR/nginx" "$SMOKE_DIR/nginx/Dockerfile"
build "$SMOKE_PROMETHEUS_IMAGE" "$SMOKE_DIR/prometheus" "$SMOKE_DIR/prometheus/Dockerfile"
build "$SMOKE_SOCAT_IMAGE" "$SMOKE_DIR/socat" "$SMOKE_DIR/socat/Dockerfile"

# 3. The federation's data, the consortium, the signed app.
say "smoke federation, consortium (sites ${SITES[*]}), signed app"
"$PYTHON" - "$WORK/federation" > "$WORK/data-dirs" <<'EOF'
import sys
from pathlib import Path
from fedmeta.common.synth import generate_federation, load_manifest
root = generate_federation(Path(sys.argv[1]) / "smoke", "smoke", seed=0)
for site in load_manifest(root).train_sites[:2]:
    print(Path(site.path).resolve())
EOF
mapfile -t DATA_DIRS < "$WORK/data-dirs"
[ ${#DATA_DIRS[@]} -eq 2 ] || die "the smoke federation has fewer than 2 training sites"
fedmeta provision --out "$CONSORTIUM" --server-name localhost --server-name 127.0.0.1 \
  $(printf -- '--site %s ' "${SITES[@]}") >/dev/null
# The app `flwr run` submits: a copy of the checkout, so that the bundle signed is the bundle sent.
mkdir -p "$WORK/app" && tar -C "$WORK/src" -cf - . | tar -C "$WORK/app" -xf -
fedmeta sign-app "$WORK/app" --key "$CONSORTIUM/release/release.key" --consortium "$CONSORTIUM" >/dev/null
# The images run as uid 49999: the keys they read stay 0600, owned by that uid; the runs folder too.
mkdir -p "$WORK/runs"
chown 49999:49999 "$WORK/runs" "$CONSORTIUM/superlink/server.key"
for site in "${SITES[@]}"; do
  (umask 077; openssl rand -hex 32 > "$CONSORTIUM/sites/$site/superexec.secret")
  chown 49999:49999 "$CONSORTIUM/sites/$site/site.key" "$CONSORTIUM/sites/$site/superexec.secret"
done

# 4. The coordinator.
say "coordinator: superlink, fleet-proxy, server-metrics, prometheus"
STARTED+=(coordinator)
compose_coordinator up -d --no-build superlink fleet-proxy server-metrics prometheus 2>&1 | sed 's/^/  /'
mkdir -p "$FLWR_HOME"
cat > "$FLWR_HOME/config.toml" <<EOF
[superlink]
default = "smoke"

[superlink.smoke]
address = "127.0.0.1:8001"
root-certificates = "$CONSORTIUM/ca/ca.crt"
EOF
flwr_json() {  # flwr args...: its JSON answer (flwr may print lines before it), or nothing
  flwr "$@" --format json 2>/dev/null | "$PYTHON" -c 'import sys; t = sys.stdin.read(); i = t.find("{"); print(t[i:] if i >= 0 else "")'
}
json_get() {  # PYTHON-EXPRESSION over j, the JSON on stdin; prints its value, or nothing if unreadable
  "$PYTHON" -c "import json, sys
try:
    j = json.load(sys.stdin)
    print($1)
except Exception:
    pass"
}
deadline=$((SECONDS + 120))
until [ "$(flwr_json supernode list smoke | json_get 'j.get("success", False)')" = True ]; do
  [ $SECONDS -lt $deadline ] || die "the SuperLink's Control API on 127.0.0.1:8001 did not answer within 120 s"
  sleep 2
done
say "SuperLink answers on 127.0.0.1:8001 (TLS, consortium CA); registering the sites' keys"
sh "$CONSORTIUM/superlink/register-sites.sh" smoke | sed 's/^/  /'

# 5. The sites.
for index in "${!SITES[@]}"; do
  site=${SITES[$index]}
  say "site $site: supernode (--isolation process), site-exec, metrics, fleet-forward; data ${DATA_DIRS[$index]}"
  STARTED+=("$site:$index")
  compose_site "$site" "$index" up -d --no-build 2>&1 | sed 's/^/  /'
done
deadline=$((SECONDS + 180))
until [ "$(flwr_json supernode list smoke | json_get 'sum(n.get("status") == "online" for n in j.get("nodes", []))')" = "${#SITES[@]}" ]; do
  [ $SECONDS -lt $deadline ] || die "the sites' SuperNodes did not come online within 180 s"
  sleep 2
done
say "${#SITES[@]} SuperNodes online"

# 6. Two rounds of the smoke preset through the Control API.
"$PYTHON" - "$WORK/run-config.toml" <<'EOF'
import sys
import tomli_w
from fedmeta.simulations.experiments.presets import load_preset
overrides, _driver = load_preset("smoke")
overrides.update({"num-rounds": 2, "eval-every": 0, "min-sites": 2, "out-dir": "/runs/smoke"})
open(sys.argv[1], "wb").write(tomli_w.dumps(overrides).encode())
EOF
say "flwr run: $(tr '\n' ' ' < "$WORK/run-config.toml")"
timeout "$TIMEOUT_S" flwr run "$WORK/app" smoke --run-config "$WORK/run-config.toml" --stream > "$WORK/run.log" 2>&1 || true
tail -n 15 "$WORK/run.log" | sed 's/^/  | /'
run_id=$(grep -o 'Successfully started run [0-9]*' "$WORK/run.log" | grep -o '[0-9]*$' || true)
[ -n "$run_id" ] || die "flwr run started no run"
deadline=$((SECONDS + 120))
while :; do
  status=$(flwr_json list smoke --run-id "$run_id" | json_get 'j["runs"][0]["status"]')
  case $status in finished:*) break ;; esac
  [ $SECONDS -lt $deadline ] || die "run $run_id did not finish (status ${status:-unknown})"
  sleep 2
done
say "run $run_id: $status (flwr list smoke --format json)"
[ "$status" = finished:completed ] || die "run $run_id ended as $status"

# 7. Prometheus scrapes the coordinator's server-metrics and site a's exporter (deploy/smoke/prometheus.yml).
deadline=$((SECONDS + 60))
while :; do
  health=$(curl -fsS http://127.0.0.1:9090/api/v1/targets 2>/dev/null | json_get \
    '" ".join(sorted(t["labels"]["job"] + "=" + t["health"] for t in j["data"]["activeTargets"]))')
  [ "$health" = "fedmeta-server=up fedmeta-site=up" ] && break
  [ $SECONDS -lt $deadline ] || die "Prometheus targets not both up: ${health:-no answer}"
  sleep 2
done
say "Prometheus /api/v1/targets: $health"
curl -fsS http://127.0.0.1:9100/metrics | grep -v '^#' | grep -m 3 'run="smoke"' | sed 's/^/  server-metrics: /' || true

# 8. What it cost.
say "images:"
for image in "$SMOKE_SUPERLINK_IMAGE" "$SMOKE_SUPERNODE_IMAGE" "$SMOKE_FLEET_PROXY_IMAGE" "$SMOKE_PROMETHEUS_IMAGE" \
  "$SMOKE_SOCAT_IMAGE"; do
  printf '  %-28s %6d MB\n' "$image" "$(( $("$DOCKER" image inspect -f '{{.Size}}' "$image") / 1000000 ))"
done
say "smoke test passed: wall time ${SECONDS} s"
