"""Run fedmeta's Flower apps on Flower's own engines, from Python, and leave nothing running.

Two engines, both driven through the real `flwr` CLI so that what a test exercises is what a
consortium runs:

- `run_simulation_engine` / `SimulationEngine`: Flower's Simulation Engine (Ray) via `flwr run`
  against a local SuperLink that `flwr` starts in the background (one run, or several runs
  sharing that SuperLink).
- `LocalDeployment`: Flower's Deployment Engine on loopback — one `flower-superlink` and N
  `flower-supernode`s, each with its own `data-dir` — and `flwr run` against it.

Flower 1.41 facts this module is built around (see shared/FIELD.md §4):
- federations (SuperLink connections) live in `$FLWR_HOME/config.toml`, so every call gets a
  private FLWR_HOME and never touches the user's `~/.flwr`;
- `flwr run` exits 0 even when the run failed: the outcome is read back with
  `flwr list --run-id N --format json`;
- `flwr run` against a `:local:` connection starts a detached SuperLink (and, through it, a
  SuperExec, `flwr-simulation` and a Ray cluster) that outlives the CLI; it listens on fixed
  ports unless FLWR_LOCAL_SUPERLINK_HTTP_API_PORT / FLWR_LOCAL_CONTROL_API_PORT are set, so two
  runs on one machine would silently share one SuperLink — each call here picks free ports;
- the SuperLink installs an app's dependencies with `uv sync` unless told not to; this machine
  (and a hospital's) has no internet and the environment already holds them, so it is disabled.

Every process started here, directly or by Flower, carries a tag in its environment
(`FEDMETA_RUNTIME_TAG`); on exit the whole tree is frozen, terminated, then killed, and the tag
is swept for orphans. Linux (/proc) is needed for that sweep; elsewhere only the process tree
reachable through `ps` is stopped.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import tomli_w

from fedmeta.common.config import RunConfig
from fedmeta.common.protocol import DATA_DIR_KEY, ROLE_KEY
from fedmeta.simulations.engines.processes import TAG_VAR, stop_processes

__all__ = ["LocalDeployment", "RunOutcome", "SimulationEngine", "run_simulation_engine", "source_app_dir",
           "stage_app"]

RunConfigValue = bool | int | float | str

log = logging.getLogger("fedmeta.runtime")

_STARTED_RUN = re.compile(r"Successfully started run (\d+)")
_CONFIG_KEY = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")
_LOG_TAIL_LINES = 80
_GRACE_S = 10.0


@dataclass
class RunOutcome:
    """What a Flower run ended as, read back from the SuperLink (not from `flwr run`'s exit code).

    `status` is the SuperLink's status string, e.g. "finished:completed", "finished:failed",
    "finished:stopped"; `log` is the run's streamed log (ServerApp output and, in simulation,
    the ClientApps').
    """

    run_id: int
    status: str
    ok: bool
    log: str


# --------------------------------------------------------------------------------------------
# Simulation Engine
# --------------------------------------------------------------------------------------------


def run_simulation_engine(
    app_dir: Path,
    run_config: Mapping[str, RunConfigValue],
    *,
    num_supernodes: int,
    num_cpus_per_client: float = 1.0,
    num_gpus_per_client: float = 0.0,
    timeout_s: float = 1800,
    flwr_home: Path | None = None,
) -> RunOutcome:
    """Run the Flower app in `app_dir` on Flower's Simulation Engine (Ray) and wait for its end.

    Args:
        app_dir: folder holding the app's pyproject.toml with [tool.flwr.app.components].
        run_config: overrides of keys in the app's [tool.flwr.app.config] (scalars only).
        num_supernodes: simulated sites; each gets node_config {"partition-id", "num-partitions"}.
        num_cpus_per_client / num_gpus_per_client: Ray resources per ClientApp; Flower's default
            of 2 CPUs would run one site at a time on a 2-core machine.
        timeout_s: wall-clock limit for the whole run; on expiry the run is stopped.
        flwr_home: FLWR_HOME to use (kept afterwards, for inspection); a temporary one otherwise.

    One run in its own `SimulationEngine` (see there for what the run does and raises). Every process
    the run started is stopped before this returns or raises.
    """
    # Checked here as well as in engine.run: a refused call must not create or touch FLWR_HOME first.
    _check_app_dir(app_dir)
    _checked_run_config(run_config)
    _check_run_arguments(num_supernodes, timeout_s)
    with SimulationEngine(flwr_home, num_cpus_per_client=num_cpus_per_client,
                          num_gpus_per_client=num_gpus_per_client) as engine:
        return engine.run(app_dir, run_config, num_supernodes=num_supernodes, timeout_s=timeout_s)


class SimulationEngine:
    """Flower's Simulation Engine (Ray) behind one local SuperLink, for one run or several in a row.

    The first `run` starts the SuperLink (through `flwr run` against a `:local:` connection on
    private ports); later runs reuse it, as Flower's CLI does when it finds one healthy, so a
    meta run and its baseline pay for one SuperLink and SuperExec, not two. Each run still gets its
    own `flwr-simulation` process and Ray cluster: Flower 1.41 starts those per run.

        with SimulationEngine() as engine:
            engine.run(app_dir, meta_config, num_supernodes=10)
            engine.run(app_dir, baseline_config, num_supernodes=10)

    On exit every process it started (the SuperLink, SuperExec, and anything a run left) is stopped.
    """

    def __init__(self, flwr_home: Path | None = None, *, num_cpus_per_client: float = 1.0,
                 num_gpus_per_client: float = 0.0) -> None:
        if num_cpus_per_client < 1 or not float(num_cpus_per_client).is_integer():
            raise ValueError(
                f"num_cpus_per_client must be a whole number >= 1 (Flower 1.41 reserves whole "
                f"CPUs per ClientApp), got {num_cpus_per_client!r}."
            )
        if num_gpus_per_client < 0:
            raise ValueError(f"num_gpus_per_client must be >= 0, got {num_gpus_per_client!r}.")
        self.num_cpus_per_client = int(num_cpus_per_client)
        self.num_gpus_per_client = float(num_gpus_per_client)
        self._home_arg = flwr_home
        self._home: _FlowerHome | None = None

    @property
    def flwr_home(self) -> Path:
        return self._require_home().path

    def __enter__(self) -> SimulationEngine:
        home = _FlowerHome(self._home_arg).__enter__()
        try:
            http_port, control_port = _free_ports(2)
            home.env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"] = str(http_port)
            home.env["FLWR_LOCAL_CONTROL_API_PORT"] = str(control_port)
            home.write_connection("local-sim", address=":local:")
        except BaseException:
            home.__exit__(None, None, None)
            raise
        self._home = home
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        home, self._home = self._home, None
        if home is None:
            return
        try:
            # The local SuperLink was detached by `flwr`; it and everything below it carry our
            # tag, so the sweep finds them even though they are not our children.
            survivors = stop_processes(set(), home.tag)
        finally:
            home.__exit__(None, None, None)
        if survivors:
            message = (
                f"Could not stop Flower processes {sorted(survivors)} started for the "
                f"simulation in {home.path}; stop them by hand (kill -9 PID)."
            )
            if exc is None:
                raise RuntimeError(message)
            # The run already failed: keep its error (the one the user needs), log this one.
            log.error(message)

    def run(self, app_dir: Path, run_config: Mapping[str, RunConfigValue], *, num_supernodes: int,
            timeout_s: float = 1800) -> RunOutcome:
        """`flwr run` the app in `app_dir` with `num_supernodes` simulated sites; wait for its end.

        ``round-deadline`` is set to ``round-timeout``: every sampled site is waited for, so which
        sites a round aggregates does not depend on Ray's timing. Returns the RunOutcome of a run
        that finished as completed; raises RuntimeError with the status and the tail of the log
        otherwise (the SuperLink stays up for the next run; leaving the `with` stops it).
        """
        home = self._require_home()
        app_dir = _check_app_dir(app_dir)
        _checked_run_config(run_config)
        _check_run_arguments(num_supernodes, timeout_s)
        # A simulation waits for every sampled site (a round closes at round-deadline only in deployments):
        # on Ray, which sites finish first depends on timing, and a run must repeat bit for bit.
        run_config = {**run_config, "round-deadline": run_config.get("round-timeout", RunConfig().round_timeout)}
        federation_config = (
            f"num-supernodes={num_supernodes} "
            f"client-resources-num-cpus={self.num_cpus_per_client} "
            f"client-resources-num-gpus={self.num_gpus_per_client}"
        )
        return home.run_app(
            app_dir,
            "local-sim",
            run_config,
            timeout_s=timeout_s,
            extra_args=["--federation-config", federation_config],
            engine="Simulation Engine",
            service_logs=[home.path / "local-superlink" / "superlink.log"],
        )

    def _require_home(self) -> _FlowerHome:
        if self._home is None:
            raise RuntimeError("SimulationEngine is not running; use it as `with SimulationEngine(...)`.")
        return self._home


def _check_run_arguments(num_supernodes: int, timeout_s: float) -> None:
    if isinstance(num_supernodes, bool) or not isinstance(num_supernodes, int) or num_supernodes < 1:
        raise ValueError(f"num_supernodes must be a positive int, got {num_supernodes!r}.")
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be positive, got {timeout_s!r}.")


# --------------------------------------------------------------------------------------------
# Deployment Engine on loopback
# --------------------------------------------------------------------------------------------


class LocalDeployment:
    """A real Flower Deployment Engine on loopback: one SuperLink and one SuperNode per site.

    Secure as a consortium runs it: `fedmeta provision` material made in its FLWR_HOME (a CA, the
    SuperLink's certificate for 127.0.0.1, one EC key per site), TLS on the SuperLink, SuperNode
    authentication on, every site's key registered with `flwr supernode register` before its
    SuperNode starts. ``insecure_no_tls=True`` drops all of it (plain HTTP, any node may join): only
    for comparing against the secure path. Each SuperNode gets `--node-config data-dir="<its folder>"` (and
    `role="<role>"` when `roles` is given, e.g. "train" or "heldout"), its own local port and its
    own FLWR_HOME, as separate hospitals would. Sites listed in ``late`` are provisioned and
    registered but not started: the caller starts them mid-run with ``start_supernode(index)``.

        with LocalDeployment([site_a, site_b]) as deployment:
            outcome = deployment.run(repo_root, {"num-rounds": 2})

    On exit every process it started (and their children: SuperExecs, ServerApp and ClientApp
    processes) is stopped by PID — SIGTERM, then SIGKILL after a grace period.
    """

    def __init__(
        self,
        data_dirs: Iterable[Path],
        *,
        roles: Sequence[str] | None = None,
        flwr_home: Path | None = None,
        startup_timeout_s: float = 60.0,
        insecure_no_tls: bool = False,
        late: Iterable[int] = (),
    ) -> None:
        self.data_dirs = [Path(d).expanduser().resolve() for d in data_dirs]
        self.late = sorted(set(int(i) for i in late))
        if any(not 0 <= i < len(self.data_dirs) for i in self.late):
            raise ValueError(f"late={self.late} names sites outside 0..{len(self.data_dirs) - 1}.")
        if not self.data_dirs:
            raise ValueError("LocalDeployment needs at least one site data-dir, got none.")
        self.roles = list(roles) if roles is not None else None
        if self.roles is not None:
            if len(self.roles) != len(self.data_dirs):
                raise ValueError(
                    f"roles has {len(self.roles)} entries for {len(self.data_dirs)} data-dirs; "
                    "give one role per site, in the same order."
                )
            for role in self.roles:
                if not isinstance(role, str) or not re.fullmatch(r"[A-Za-z0-9_-]+", role):
                    raise ValueError(f"role {role!r} must be a plain word such as 'train' or 'heldout'.")
        for data_dir in self.data_dirs:
            if not data_dir.is_dir():
                raise FileNotFoundError(
                    f"Site data-dir {data_dir} does not exist or is not a folder; pass the "
                    "folder holding the site's dataset.json."
                )
            if '"' in str(data_dir) or "\\" in str(data_dir):
                raise ValueError(
                    f"Site data-dir {data_dir} contains a quote or backslash, which "
                    "flower-supernode's --node-config cannot carry; move or link the folder."
                )
        self.startup_timeout_s = startup_timeout_s
        self.insecure_no_tls = insecure_no_tls
        self.pki: Path | None = None  # the provisioned material (secure mode)
        self._home_arg = flwr_home
        self._home: _FlowerHome | None = None
        self._processes: list[subprocess.Popen[bytes]] = []
        self._log_files: list[Path] = []
        self.superlink_address = ""
        self.pids: list[int] = []

    # -- lifecycle -----------------------------------------------------------------------------

    def __enter__(self) -> LocalDeployment:
        self._home = _FlowerHome(self._home_arg).__enter__()
        try:
            self._start()
        except BaseException:
            self._stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop()

    def site_name(self, index: int) -> str:
        return f"site-{index}"

    def _start(self) -> None:
        home = self._require_home()
        superlink_port, *node_ports = _free_ports(1 + len(self.data_dirs))
        self.superlink_address = f"127.0.0.1:{superlink_port}"
        if self.insecure_no_tls:
            security = ["--insecure"]
        else:
            from fedmeta.server.provision import provision

            self.pki = home.path / "pki"
            provision(self.pki, server_names=["127.0.0.1", "localhost"], port=superlink_port,
                      sites=[self.site_name(i) for i in range(len(self.data_dirs))])
            superlink_dir = self.pki / "superlink"
            security = ["--ssl-ca-certfile", str(superlink_dir / "ca.crt"), "--ssl-certfile",
                        str(superlink_dir / "server.crt"), "--ssl-keyfile", str(superlink_dir / "server.key"),
                        "--enable-supernode-auth"]
        self._spawn(
            "superlink",
            [
                _flower_bin("flower-superlink"),
                *security,
                "--host",
                "127.0.0.1",
                "--port",
                str(superlink_port),
                "--database",
                str(home.path / "superlink-state.db"),
            ],
            home.env,
        )
        if self.insecure_no_tls:
            home.write_connection("local-deployment", address=self.superlink_address, insecure=True)
        else:
            home.write_connection("local-deployment", address=self.superlink_address,
                                  root_certificates=str(self.pki / "ca" / "ca.crt"))
            self._wait_for_superlink()
            for index in range(len(self.data_dirs)):
                self.register_site(index)
        self._node_ports = node_ports
        for index in range(len(self.data_dirs)):
            if index not in self.late:
                self.start_supernode(index)
        self._wait_for_nodes()

    def register_site(self, index: int, public_key: Path | None = None) -> None:
        """`flwr supernode register` a site's public key (default: its provisioned one)."""
        home = self._require_home()
        key = public_key or self._require_pki() / "sites" / self.site_name(index) / "site.pub"
        result = home.flwr(["supernode", "register", str(key), "local-deployment", "--name", self.site_name(index)])
        if result.returncode != 0:
            raise RuntimeError(f"flwr supernode register {key} failed ({result.returncode}):\n{result.stdout}{result.stderr}")

    def start_supernode(self, index: int, *, private_key: Path | None = None, root_certificates: Path | None = None,
                        port: int | None = None) -> subprocess.Popen[bytes]:
        """Starts site ``index``'s SuperNode (the provisioned key and CA unless others are given)."""
        home = self._require_home()
        data_dir = self.data_dirs[index] if index < len(self.data_dirs) else self.data_dirs[0]
        node_port = port if port is not None else self._node_ports[index]
        node_config = f'{DATA_DIR_KEY}="{data_dir}"'
        if self.roles is not None and index < len(self.roles):
            node_config += f' {ROLE_KEY}="{self.roles[index]}"'
        if self.insecure_no_tls:
            security = ["--insecure"]
        else:
            bundle = self._require_pki() / "sites" / self.site_name(index)
            security = ["--root-certificates", str(root_certificates or bundle / "ca.crt"),
                        "--auth-supernode-private-key", str(private_key or bundle / "site.key")]
        # Separate FLWR_HOMEs: each SuperNode installs the app bundle on its own, like a
        # hospital would, instead of racing the others to unpack into one folder.
        node_env = dict(home.env, FLWR_HOME=str(home.path / f"supernode-{index}"),
                        FEDMETA_HOME=str(home.path / f"supernode-{index}" / "fedmeta"))  # its site key, its own
        return self._spawn(
            f"supernode-{index}",
            [
                _flower_bin("flower-supernode"),
                *security,
                "--superlink",
                self.superlink_address,
                "--port",
                str(node_port),
                "--node-config",
                node_config,
            ],
            node_env,
        )

    def nodes(self) -> list[dict]:
        """The SuperLink's node list (`flwr supernode list --format json`): ids, names, status."""
        payload = _json_payload(self._require_home().flwr(["supernode", "list", "local-deployment", "--format", "json"]).stdout)
        if not payload or not payload.get("success"):
            raise RuntimeError(f"flwr supernode list failed at {self.superlink_address}: {payload}")
        return list(payload.get("nodes", []))

    def log_of(self, pid: int) -> str:
        """The log of a process this deployment started (it stays readable after the deployment stops)."""
        for process, path in zip(self._processes, self._log_files, strict=True):
            if process.pid == pid:
                return path.read_text(errors="replace") if path.exists() else ""
        raise KeyError(f"process {pid} was not started by this deployment")

    def _require_pki(self) -> Path:
        if self.pki is None:
            raise RuntimeError("this LocalDeployment runs with insecure_no_tls=True: it has no keys or certificates.")
        return self.pki

    def _wait_for_superlink(self) -> None:
        """Until the SuperLink answers `flwr supernode list` over TLS (registration needs it up)."""
        home = self._require_home()
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            process = self._processes[0]
            if process.poll() is not None:
                raise RuntimeError(f"flower-superlink exited with code {process.returncode} while starting; its log "
                                   f"ends with:\n{_tail(self._log_files[0])}")
            payload = _json_payload(home.flwr(["supernode", "list", "local-deployment", "--format", "json"]).stdout)
            if payload and payload.get("success"):
                return
            time.sleep(0.5)
        raise RuntimeError(f"the SuperLink at {self.superlink_address} did not answer over TLS within "
                           f"{self.startup_timeout_s:.0f} s; its log ends with:\n{_tail(self._log_files[0])}")

    def _spawn(self, name: str, command: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        home = self._require_home()
        log_path = home.path / "logs" / f"{name}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("wb") as log_file:
            process = subprocess.Popen(  # noqa: S603 - fixed argv, no shell
                command,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                # Own session: a Ctrl-C in the caller's terminal reaches us, and we stop the
                # Flower processes in order, rather than the terminal killing them mid-write.
                start_new_session=True,
            )
        self._processes.append(process)
        self._log_files.append(log_path)
        self.pids.append(process.pid)
        return process

    def _wait_for_nodes(self) -> None:
        home = self._require_home()
        deadline = time.monotonic() + self.startup_timeout_s
        online = 0
        while time.monotonic() < deadline:
            for process, log_path in zip(self._processes, self._log_files, strict=True):
                if process.poll() is not None:
                    raise RuntimeError(
                        f"{Path(process.args[0]).name} exited with code {process.returncode} "
                        f"while the local deployment was starting; its log ends with:\n"
                        f"{_tail(log_path)}"
                    )
            result = home.flwr(["supernode", "list", "local-deployment", "--format", "json"])
            payload = _json_payload(result.stdout)
            if payload and payload.get("success"):
                online = sum(node.get("status") == "online" for node in payload.get("nodes", []))
                if online >= len(self.data_dirs) - len(self.late):
                    return
            time.sleep(0.5)
        logs = "\n".join(f"--- {path.name} ---\n{_tail(path, 15)}" for path in self._log_files)
        raise RuntimeError(
            f"Only {online} of {len(self.data_dirs) - len(self.late)} SuperNodes came online at "
            f"{self.superlink_address} within {self.startup_timeout_s:.0f} s; raise "
            f"startup_timeout_s on a slow machine. The processes' logs end with:\n{logs}"
        )

    def _stop(self) -> None:
        home = self._home
        if home is None:
            return
        try:
            survivors = stop_processes({process.pid for process in self._processes}, home.tag)
            for process in self._processes:
                # Reap our direct children so they do not linger as zombies.
                try:
                    process.wait(timeout=1)
                except subprocess.TimeoutExpired:
                    pass
            if survivors:
                raise RuntimeError(
                    f"Could not stop Flower processes {sorted(survivors)} of the local "
                    f"deployment in {home.path}; stop them by hand (kill -9 PID)."
                )
        finally:
            self._processes.clear()
            self._home = None
            home.__exit__(None, None, None)

    # -- runs ----------------------------------------------------------------------------------

    def run(
        self,
        app_dir: Path,
        run_config: Mapping[str, RunConfigValue],
        timeout_s: float = 1800,
    ) -> RunOutcome:
        """Submit the app in `app_dir` with `flwr run` and wait until the run finished.

        Returns the RunOutcome of a completed run; raises RuntimeError with the status and the
        tail of the log otherwise (the deployment stays up: the caller's `with` ends it).
        """
        home = self._require_home()
        return home.run_app(
            _check_app_dir(app_dir),
            "local-deployment",
            run_config,
            timeout_s=timeout_s,
            extra_args=[],
            engine="Deployment Engine",
            service_logs=self._log_files,
        )

    def _require_home(self) -> _FlowerHome:
        if self._home is None:
            raise RuntimeError("LocalDeployment is not running; use it as `with LocalDeployment(...)`.")
        return self._home


# --------------------------------------------------------------------------------------------
# Shared machinery: a private FLWR_HOME and the `flwr` CLI inside it
# --------------------------------------------------------------------------------------------


class _FlowerHome:
    """A private FLWR_HOME, the environment for every process started in it, and `flwr` calls."""

    def __init__(self, path: Path | None) -> None:
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self.kept = path is not None  # a temporary home, logs included, is deleted on exit
        if path is None:
            # Short prefix: Ray puts Unix sockets under paths derived from its temp dir.
            self._tmp = tempfile.TemporaryDirectory(prefix="fedmeta-flwr-")
            path = Path(self._tmp.name)
        self.path = Path(path).expanduser().resolve()
        self.path.mkdir(parents=True, exist_ok=True)
        self.tag = uuid.uuid4().hex
        bin_dir = str(Path(sys.executable).parent)
        self.env = dict(os.environ)
        self.env.update(
            {
                "FLWR_HOME": str(self.path),
                "FLWR_TELEMETRY_ENABLED": "0",
                "FLWR_DISABLE_UPDATE_CHECK": "1",
                "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
                # Ray on a small machine (the Simulation Engine; ignored by the Deployment Engine):
                # Ray prestarts one idle worker per CPU for the first driver, but Flower's actors
                # run in their own runtime_env (PYTHONPATH) and never use them, so on 2 cores they
                # only compete with the actors importing torch; no usage-stats reporting either.
                "RAY_prestart_worker_first_driver": "0",
                "RAY_enable_worker_prestart": "0",
                "RAY_USAGE_STATS_ENABLED": "0",
                # `flwr` launches `flower-superlink` by name: make it this environment's.
                "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
                TAG_VAR: self.tag,
            }
        )
        self._connections: dict[str, dict[str, str | bool]] = {}
        self._runs = 0

    def __enter__(self) -> _FlowerHome:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def write_connection(self, name: str, *, address: str, insecure: bool | None = None,
                         root_certificates: str | None = None) -> None:
        connection: dict[str, str | bool] = {"address": address}
        if insecure is not None:
            connection["insecure"] = insecure
        if root_certificates is not None:
            connection["root-certificates"] = root_certificates
        self._connections[name] = connection
        config = {"superlink": {"default": name, **self._connections}}
        (self.path / "config.toml").write_text(tomli_w.dumps(config), encoding="utf-8")

    def flwr(self, args: list[str], timeout_s: float = 60.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(  # noqa: S603 - fixed argv, no shell
            [_flower_bin("flwr"), *args],
            env=self.env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )

    def run_app(
        self,
        app_dir: Path,
        connection: str,
        run_config: Mapping[str, RunConfigValue],
        *,
        timeout_s: float,
        extra_args: list[str],
        engine: str,
        service_logs: list[Path],
    ) -> RunOutcome:
        """`flwr run --stream`, then the real status from the SuperLink; raise unless completed."""
        self._runs += 1
        # `flwr run` walks every file under the app folder before its own filters apply; in a checkout
        # that is the virtual environment and run outputs too (6 s here, per run). A staged copy of the
        # files the bundle can hold builds the same FAB (tests/test_flower_runtime.py checks it).
        staged = app_dir = stage_app(app_dir, self.path / f"app-{self._runs}", exclude=[self.path])
        config_path = self.path / f"run-config-{self._runs}.toml"
        config_path.write_text(tomli_w.dumps(_checked_run_config(run_config)), encoding="utf-8")
        log_path = self.path / "logs" / f"run-{self._runs}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        command = [
            _flower_bin("flwr"),
            "run",
            str(app_dir),
            connection,
            "--run-config",
            str(config_path),
            *extra_args,
            "--stream",
        ]
        deadline = time.monotonic() + timeout_s
        with log_path.open("wb") as log_file:
            cli = subprocess.Popen(  # noqa: S603 - fixed argv, no shell
                command,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
            try:
                cli.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                pass
            finally:
                if cli.poll() is None:
                    cli.terminate()
                    try:
                        cli.wait(timeout=_GRACE_S)
                    except subprocess.TimeoutExpired:
                        cli.kill()
                        cli.wait()
        shutil.rmtree(staged, ignore_errors=True)  # `flwr run` has built and sent its bundle by now
        log = log_path.read_text(encoding="utf-8", errors="replace")
        started = _STARTED_RUN.search(log)
        if started is None:
            details = "\n".join(
                f"--- {path} ---\n{_tail(path, 30)}" for path in service_logs if path.exists()
            )
            raise RuntimeError(
                f"`flwr run` on the {engine} did not start a run (exit code {cli.returncode}). "
                f"Its output:\n{_tail_text(log)}\n{details}"
            )
        run_id = int(started.group(1))

        # `--stream` normally returns when the run ends; poll in case the stream broke early.
        status, details = self._status(connection, run_id)
        while not status.startswith("finished") and time.monotonic() < deadline:
            time.sleep(1.0)
            status, details = self._status(connection, run_id)
        if not status.startswith("finished"):
            self.flwr(["stop", str(run_id), connection])
            raise RuntimeError(
                f"Run {run_id} on the {engine} did not finish within {timeout_s:.0f} s (status "
                f"{status!r}); it was stopped. Raise timeout_s or shrink the run. "
                f"{self._log_note(log_path)}:\n{_tail_text(log)}"
            )
        outcome = RunOutcome(run_id=run_id, status=status, ok=status == "finished:completed", log=log)
        if not outcome.ok:
            raise RuntimeError(
                f"Run {run_id} on the {engine} ended as {status!r} ({details}). "
                f"{self._log_note(log_path)}:\n{_tail_text(log)}"
            )
        return outcome

    def _log_note(self, log_path: Path) -> str:
        if self.kept:
            return f"Log tail (whole log: {log_path})"
        return "Log tail (pass flwr_home=... to keep the whole log)"

    def _status(self, connection: str, run_id: int) -> tuple[str, str]:
        result = self.flwr(["list", connection, "--run-id", str(run_id), "--format", "json"])
        payload = _json_payload(result.stdout)
        if not payload or not payload.get("success") or not payload.get("runs"):
            message = (payload or {}).get("error-message") or result.stdout + result.stderr
            return f"unknown ({message.strip()})", ""
        run = payload["runs"][0]
        return str(run.get("status", "unknown")), str(run.get("status-details", ""))


# --------------------------------------------------------------------------------------------
# Ports
# --------------------------------------------------------------------------------------------


def _free_ports(count: int) -> list[int]:
    """`count` distinct loopback ports that were free a moment ago (held together, then freed)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def _flower_bin(name: str) -> str:
    """The Flower executable `name` of the Python environment running this code."""
    candidate = Path(sys.executable).parent / name
    if candidate.is_file():
        return str(candidate)
    raise FileNotFoundError(
        f"{name} not found beside {sys.executable}; install Flower into this environment "
        "(pip install -e . installs flwr[simulation]==1.41.*)."
    )


def source_app_dir() -> Path:
    """The checkout this fedmeta runs from: the Flower app folder `flwr run` bundles.

    Raises when fedmeta was installed from a wheel (no pyproject.toml beside the packages): Flower's
    engines need the app's source folder; the in-process engine does not.
    """
    import fedmeta.simulations

    root = Path(fedmeta.simulations.__file__).resolve().parents[1]  # simulations/__init__.py -> the checkout
    if not (root / "pyproject.toml").is_file():
        raise FileNotFoundError(
            f"Flower's engines build the app from fedmeta's source folder, but {root} has no pyproject.toml "
            "(fedmeta was installed from a wheel); run from a checkout (pip install -e .) or use the in-process engine."
        )
    return root


_STAGED_MARK = ".fedmeta-staged-app"  # marks a folder stage_app made (and may replace); no FAB holds such a file


def stage_app(app_dir: Path, dest: Path, *, exclude: Iterable[Path] = ()) -> Path:
    """Copy the files of `app_dir` a Flower app bundle (FAB) can hold into `dest`, and return `dest`.

    Flower's own rules choose the files (``filter_paths_for_publish``: the app's .gitignore, read as
    Flower reads it, and the publish include/exclude patterns; links skipped, as Flower skips them),
    so the bundle built from `dest` is byte for byte the one `app_dir` gives. What makes it fast:
    whole folders the .gitignore ignores are not walked (unless a ``!`` pattern could bring a file
    below one back), nor virtual environments (a folder holding pyvenv.cfg), the folders in `exclude`
    (a FLWR_HOME inside the app) and `dest` itself. `.git` is walked: Flower ships the .toml/.json
    files it may hold. Only regular files are read (no pipes, sockets). `dest` must not be the app
    folder or hold it, and is replaced only if stage_app made it.
    """
    from flwr.cli.utils import build_pathspec, filter_paths_for_publish, load_gitignore_patterns

    app_dir = _check_app_dir(app_dir)
    dest = Path(dest).expanduser().resolve()
    if dest == app_dir or app_dir.is_relative_to(dest):
        raise ValueError(f"cannot stage the Flower app into {dest}: it is the app folder {app_dir} or holds it; "
                         "stage into a folder of its own.")
    if dest.exists():
        if not (dest / _STAGED_MARK).is_file():
            raise FileExistsError(f"cannot stage the Flower app into {dest}: it exists and was not made by "
                                  "stage_app (no " + _STAGED_MARK + "); choose a new folder.")
        shutil.rmtree(dest)
    skip = {Path(p).expanduser().resolve() for p in exclude} | {dest}
    gitignore = app_dir / ".gitignore"
    patterns = load_gitignore_patterns(gitignore) if gitignore.is_file() and not gitignore.is_symlink() else []
    negated = any(line.lstrip().startswith("!") for line in patterns)
    prune = build_pathspec([] if negated else patterns)
    files: dict[str, Path] = {}
    for folder, subfolders, names in os.walk(app_dir, followlinks=False):
        here = Path(folder)
        relative = here.relative_to(app_dir)
        subfolders[:] = [
            name for name in subfolders
            if not (here / name).is_symlink() and not (here / name / "pyvenv.cfg").exists()
            and (here / name) not in skip and not prune.match_file((relative / name).as_posix() + "/")
        ]
        for name in names:
            source = here / name
            if not source.is_symlink() and source.is_file():
                files[(relative / name).as_posix()] = source
    kept = filter_paths_for_publish(files)
    dest.mkdir(parents=True)
    (dest / _STAGED_MARK).write_text(f"a copy of {app_dir} for `flwr run`; replaced at every run\n")
    for relative_name, source in kept.items():
        target = dest / relative_name
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            shutil.copyfile(source, target)
        except OSError as err:
            raise OSError(f"staging the Flower app: cannot copy {source} ({err.strerror or err}); make it readable "
                          "or add it to the app's .gitignore.") from err
    return dest


def _check_app_dir(app_dir: Path) -> Path:
    app_dir = Path(app_dir).expanduser().resolve()
    pyproject = app_dir / "pyproject.toml"
    if not pyproject.is_file():
        raise FileNotFoundError(
            f"{pyproject} not found: app_dir must be a Flower app folder (the fedmeta "
            "repository root, which holds [tool.flwr.app.components])."
        )
    return app_dir


def _checked_run_config(run_config: Mapping[str, RunConfigValue]) -> dict[str, RunConfigValue]:
    checked: dict[str, RunConfigValue] = {}
    for key, value in run_config.items():
        if not isinstance(key, str) or not _CONFIG_KEY.match(key):
            raise ValueError(
                f"Run-config key {key!r} is not a Flower config key; use letters, digits, "
                "'-' and '_' (and '.' between parts), as in [tool.flwr.app.config]."
            )
        if not isinstance(value, bool | int | float | str):
            raise TypeError(
                f"Run-config value for {key!r} is a {type(value).__name__} ({value!r}); Flower "
                "run config holds only bool, int, float and str — pass it as one of those."
            )
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"Run-config value for {key!r} is {value!r}; give a finite number.")
        checked[key] = value
    return checked


def _json_payload(text: str) -> dict | None:
    start = text.find("{")
    if start < 0:
        return None
    try:
        payload = json.loads(text[start:])
    except json.JSONDecodeError:
        return None
    return payload if isinstance(payload, dict) else None


def _tail_text(text: str, lines: int = _LOG_TAIL_LINES) -> str:
    return "\n".join(text.splitlines()[-lines:])


def _tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    try:
        return _tail_text(path.read_text(encoding="utf-8", errors="replace"), lines)
    except OSError as err:
        return f"(could not read {path}: {err})"
