"""A site bundle's start-site.sh (``fedmeta.server.site_bundles``) supervises what it starts: a signal stops the
SuperNode, the metrics exporter and whatever they started; a SuperNode that ends by itself takes the exporter
with it and hands the script its status; two sites on one host dial two local ports.

Each test provisions a real bundle and runs its script with stand-ins for ``flower-supernode`` and ``fedmeta``
first on PATH: shell scripts that record their arguments and the pids of themselves, a child and a grandchild
(as the SuperNode starts its SuperExec and ClientApps), and then wait, so no SuperLink is needed. Linux only
(reads process states from /proc).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from fedmeta.server.provision import provision

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from /proc")

# What a stand-in records: its argv (one per line), then the pids of a child, a shell child, that shell's child and
# itself. SHIM_IGNORE_TERM: it and its children ignore SIGTERM (only SIGKILL ends them). SHIM_EXIT_FILE (the
# SuperNode's): it exits with the status written there, leaving its child and grandchild behind.
SHIM = """#!/bin/sh
[ -z "${SHIM_IGNORE_TERM:-}" ] || trap '' TERM
# SHIM_SLOW_EXIT: a clean shutdown that takes a moment (a SuperNode telling the SuperLink it leaves) and records
# that it finished; the first SIGTERM restores the default action, as Flower's handler does, so a second one kills.
[ -z "${SHIM_SLOW_EXIT:-}" ] || trap 'trap - TERM; sleep 1; echo done > "$SHIM_RECORD/$(basename "$0").clean"; exit 0' TERM
name="$(basename "$0")"
case "$name" in fedmeta) record="$SHIM_RECORD/$name-$1" ;; *) record="$SHIM_RECORD/$name" ;; esac
printf '%s\\n' "$@" > "$record.argv"
sleep 300 &
echo $! >> "$record.pids"
sh -c 'sleep 300 & echo $! >> "$1"; wait' sh "$record.pids" &
echo $! >> "$record.pids"
echo $$ >> "$record.pids"
if [ "$name" = flower-supernode ] && [ -n "${SHIM_EXIT_FILE:-}" ]; then
  while [ ! -s "$SHIM_EXIT_FILE" ]; do sleep 0.1; done
  exit "$(cat "$SHIM_EXIT_FILE")"
fi
wait
"""
PIDS_EACH = 4  # a stand-in, its child, its shell child and that shell's child
SITE = ["flower-supernode", "fedmeta-site-exec"]  # always: the SuperNode and its app gate
STARTED = [*SITE, "fedmeta-site-metrics"]  # with METRICS_PORT


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> Path:
    """Two sites' bundles from the real provision code: OUT/sites/a and OUT/sites/b."""
    return provision(tmp_path_factory.mktemp("consortium") / "c", server_names=["localhost"], sites=["a", "b"]).out


class Site:
    """One run of a bundle's start-site.sh with the stand-ins, recording into its own folder."""

    def __init__(self, bundle: Path, tmp_path: Path, request: pytest.FixtureRequest, **env: str):
        self.bundle, self.record = bundle, tmp_path / f"record-{bundle.name}"
        self.record.mkdir()
        bin_dir = tmp_path / "bin"
        if not bin_dir.is_dir():
            bin_dir.mkdir()
            for name in ("flower-supernode", "fedmeta"):
                (bin_dir / name).write_text(SHIM)
                (bin_dir / name).chmod(0o755)
        data = tmp_path / "data"
        data.mkdir(exist_ok=True)
        environ = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SHIM_RECORD": str(self.record), **env}
        for name in ("LOCAL_PORT", "METRICS_PORT", "STOP_GRACE_S"):  # only what the test sets
            if name not in env:
                environ.pop(name, None)
        self.log = tmp_path / f"start-site-{bundle.name}.log"
        with self.log.open("wb") as log:
            # Its own session, as a supervisor starts it: the SIGINT case signals its group as Ctrl-C would.
            self.process = subprocess.Popen([str(bundle / "start-site.sh"), str(data)], env=environ, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)
        request.addfinalizer(self.kill_leftovers)

    def pids(self, name: str) -> list[int]:
        path = self.record / f"{name}.pids"
        return [int(line) for line in path.read_text().split()] if path.exists() else []

    def argv(self, name: str) -> list[str]:
        return (self.record / f"{name}.argv").read_text().splitlines()

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_started(self, names: list[str], timeout_s: float = 20.0) -> list[int]:
        """Every pid the stand-ins ``names`` recorded, once each recorded all of its own."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if all(len(self.pids(name)) == PIDS_EACH for name in names):
                return [pid for name in names for pid in self.pids(name)]
            if self.process.poll() is not None:
                pytest.fail(f"start-site.sh exited ({self.process.returncode}) before starting {names}:\n"
                            f"{self.output()}")
            time.sleep(0.05)
        pytest.fail(f"{names} not started within {timeout_s:.0f} s:\n{self.output()}")

    def exit_code(self, timeout_s: float = 20.0) -> int:
        try:
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            pytest.fail(f"start-site.sh still running {timeout_s:.0f} s later:\n{self.output()}")

    def kill_leftovers(self) -> None:
        for pid in [self.process.pid, *(pid for name in STARTED for pid in self.pids(name))]:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        if self.process.poll() is None:
            self.process.wait()


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs: an exited process whose parent has not reaped it yet (a zombie) does not."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def _left_running(pids: list[int], within_s: float = 5.0) -> list[int]:
    deadline = time.monotonic() + within_s
    while (left := [pid for pid in pids if _alive(pid)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


@pytest.mark.parametrize(("signum", "to_group", "code", "metrics"), [
    (signal.SIGTERM, False, 143, True),  # a supervisor's or `kill`'s stop
    (signal.SIGTERM, False, 143, False),  # no exporter: the SuperNode alone
    (signal.SIGINT, True, 130, True),  # Ctrl-C in a terminal: the script's whole foreground group
    (signal.SIGHUP, False, 129, True),  # the terminal or ssh session closed
], ids=["sigterm", "sigterm-no-metrics", "sigint-group", "sighup"])
def test_a_signal_stops_the_supernode_the_exporter_and_what_they_started(bundles, tmp_path, request, signum,
                                                                          to_group, code, metrics):
    if signum == signal.SIGHUP and signal.getsignal(signal.SIGHUP) == signal.SIG_IGN:
        pytest.skip("SIGHUP is ignored in this process (started with nohup), and so in the script it starts")
    site = Site(bundles / "sites/a", tmp_path, request, **({"METRICS_PORT": "9101"} if metrics else {}))
    names = STARTED if metrics else SITE
    pids = site.wait_started(names)
    assert site.process.pid not in pids  # the script stays, supervising
    if to_group:
        os.killpg(site.process.pid, signum)
    else:
        site.process.send_signal(signum)
    assert site.exit_code() == code, site.output()
    assert not _left_running(pids), f"left running after {signal.Signals(signum).name}: {_left_running(pids, 0)}"
    argv = site.argv("flower-supernode")
    assert argv[argv.index("--port") + 1] == "9094"  # the SuperNode's local port, by default
    assert argv[argv.index("--isolation") + 1] == "process"  # it starts no app itself: its gate does
    gate = site.argv("fedmeta-site-exec")
    assert gate[gate.index("--runtime-api-address") + 1] == "127.0.0.1:9094"
    assert gate[gate.index("--approved-apps") + 1] == str(site.bundle / "approved-apps")
    assert gate[gate.index("--public-key") + 1] == str(site.bundle / "release.pub")
    if metrics:
        assert site.argv("fedmeta-site-metrics")[:2] == ["site-metrics", "--dir"]
        assert site.argv("fedmeta-site-metrics")[-2:] == ["--port", "9101"]


def test_a_supernode_that_ends_by_itself_takes_the_exporter_and_leftovers_with_it(bundles, tmp_path, request):
    exit_file = tmp_path / "supernode-exit"
    site = Site(bundles / "sites/a", tmp_path, request, METRICS_PORT="9101", SHIM_EXIT_FILE=str(exit_file))
    pids = site.wait_started(STARTED)
    exit_file.write_text("3\n")  # the SuperNode exits 3, its child and grandchild still running
    assert site.exit_code() == 3, site.output()
    assert "flower-supernode ended (status 3); stopping the rest" in site.output()
    assert not _left_running(pids), f"left running after the SuperNode ended: {_left_running(pids, 0)}"


def test_the_supernode_hands_its_tasks_only_to_its_gate(bundles, tmp_path, request):
    """Both get the site's own secret (made on first start, 0600): Flower's SuperNode then hands its tasks only to a
    process that signs with it, so no other local process can take a task and run an unapproved app."""
    site = Site(bundles / "sites/b", tmp_path, request)
    site.wait_started(SITE)
    secret = site.bundle / "superexec.secret"
    assert secret.stat().st_mode & 0o777 == 0o600 and len(secret.read_text()) == 64
    for name in SITE:
        argv = site.argv(name)
        assert argv[argv.index("--superexec-auth-secret-file") + 1] == str(secret), (name, argv)
    site.process.send_signal(signal.SIGTERM)
    assert site.exit_code() == 143


def test_a_local_port_in_use_is_refused_before_anything_starts(bundles, tmp_path, request):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        site = Site(bundles / "sites/a", tmp_path, request, LOCAL_PORT=str(taken.getsockname()[1]))
        assert site.exit_code() == 2
    assert "already listens on 127.0.0.1" in site.output() and not site.pids("flower-supernode")


def test_a_supernode_the_superlink_does_not_admit_is_explained_in_words(bundles, tmp_path, request):
    exit_file = tmp_path / "supernode-exit"
    site = Site(bundles / "sites/a", tmp_path, request, SHIM_EXIT_FILE=str(exit_file))
    site.wait_started(SITE)
    exit_file.write_text("305\n")  # Flower 1.41's exit code when the SuperLink refuses to activate the node
    assert site.exit_code() == 305 % 256, site.output()  # a process status keeps 8 bits
    assert "most often its key is not registered" in site.output()
    assert f"fedmeta doctor --bundle {site.bundle}" in site.output()


def test_each_process_gets_one_sigterm_so_a_clean_shutdown_is_not_cut_short(bundles, tmp_path, request):
    """Flower's processes restore the default SIGTERM action once their handler runs: a second SIGTERM during the
    SuperNode's clean exit killed it before it told the SuperLink it left, which then refused its key as "already
    online" for a minute."""
    site = Site(bundles / "sites/a", tmp_path, request, SHIM_SLOW_EXIT="1")
    pids = site.wait_started(["flower-supernode"])
    site.process.send_signal(signal.SIGTERM)
    assert site.exit_code() == 143, site.output()
    assert (site.record / "flower-supernode.clean").is_file(), "a second SIGTERM cut the SuperNode's clean exit short"
    assert not _left_running(pids)


def test_processes_that_ignore_sigterm_are_killed_after_the_grace_period(bundles, tmp_path, request):
    site = Site(bundles / "sites/a", tmp_path, request, METRICS_PORT="9101", STOP_GRACE_S="1", SHIM_IGNORE_TERM="1")
    pids = site.wait_started(STARTED)
    site.process.send_signal(signal.SIGTERM)
    assert site.exit_code() == 143, site.output()
    assert "still running 1 s after SIGTERM; killing them" in site.output()
    assert not _left_running(pids), f"left running after SIGKILL: {_left_running(pids, 0)}"


def test_two_sites_on_one_host_give_their_supernodes_different_local_ports(bundles, tmp_path, request):
    sites = {port: Site(bundles / f"sites/{name}", tmp_path, request, LOCAL_PORT=port)
             for name, port in (("a", "9095"), ("b", "9096"))}
    pids = [pid for site in sites.values() for pid in site.wait_started(SITE)]
    for port, site in sites.items():
        argv = site.argv("flower-supernode")
        assert argv[argv.index("--port") + 1] == port, argv
        gate = site.argv("fedmeta-site-exec")
        assert gate[gate.index("--runtime-api-address") + 1] == f"127.0.0.1:{port}", gate
        assert argv[argv.index("--superlink") + 1] == "localhost:8000"
        assert argv[argv.index("--auth-supernode-private-key") + 1] == str(site.bundle / "site.key")
    for site in sites.values():
        site.process.send_signal(signal.SIGTERM)
        assert site.exit_code() == 143, site.output()
    assert not _left_running(pids)


@pytest.mark.parametrize(("env", "said"), [
    ({"LOCAL_PORT": "70000"}, "LOCAL_PORT=70000 is not a TCP port"),
    ({"LOCAL_PORT": "9o95"}, "LOCAL_PORT=9o95 is not a TCP port"),
    ({"METRICS_PORT": "0"}, "METRICS_PORT=0 is not a TCP port"),
    ({"LOCAL_PORT": "9101", "METRICS_PORT": "9101"}, "LOCAL_PORT and METRICS_PORT are both 9101"),
    ({"STOP_GRACE_S": "soon"}, "STOP_GRACE_S=soon is not a whole number"),
], ids=["too-high", "not-a-number", "zero", "same-port", "grace"])
def test_a_bad_setting_is_refused_by_name_before_anything_starts(bundles, tmp_path, request, env, said):
    site = Site(bundles / "sites/a", tmp_path, request, **env)
    assert site.exit_code() == 2
    assert said in site.output() and not site.pids("flower-supernode")


def test_the_supernode_installs_no_app_dependencies_at_run_time(bundles):
    """Flower 1.41's SuperNode has only --allow-runtime-dependency-installation, off by default; the script never
    gives it. A Flower that turns it on by default, or adds a flag to turn it off, fails here: pass that flag."""
    from flwr.supernode.cli.flower_supernode import _parse_args_run_supernode

    parser = _parse_args_run_supernode()
    assert parser.parse_args([]).runtime_dependency_install is False
    flags = {flag for action in parser._actions for flag in action.option_strings}
    assert "--allow-runtime-dependency-installation" in flags
    assert "--disable-runtime-dependency-installation" not in flags
    code = [line for line in (bundles / "sites/a/start-site.sh").read_text().splitlines() if not line.startswith("#")]
    assert not [line for line in code if "runtime-dependency" in line]
