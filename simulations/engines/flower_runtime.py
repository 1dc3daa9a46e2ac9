"""Run fedmeta's Flower apps on Flower's own engines, from Python, and leave nothing running.

Two engines, both driven through the real `flwr` CLI so that what a test exercises is what a
consortium runs:

- `run_simulation_engine` / `SimulationEngine`: Flower's Simulation Engine (Ray) via `flwr run`
  against a local SuperLink that `flwr` starts in the background (one run, or several runs
  sharing that SuperLink).
- `LocalDeployment`: Flower's Deployment Engine on loopback — one `flower-superlink` and N
  `flower-supernode`s, each with its own `data-dir` — and `flwr run` against it.

Flower 1.41 facts this module is built around:
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

import logging
import os
import re
import secrets
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType

from fedmeta.common.config import RunConfig
from fedmeta.common.protocol import DATA_DIR_KEY, ROLE_KEY
from fedmeta.common.app_approval import sign_approval
from fedmeta.server.app_release import APPROVED_APPS_DIR, app_fab_digest
from fedmeta.server.provision import provision
from fedmeta.simulations.engines.app_bundle import _check_app_dir, source_app_dir, stage_app
from fedmeta.simulations.engines.flower_home import (
    RunConfigValue, RunOutcome, _checked_run_config, _flower_bin, _FlowerHome, _free_ports, _json_payload, _tail,
)
from fedmeta.simulations.engines.processes import stop_processes

__all__ = ["LocalDeployment", "RunOutcome", "SimulationEngine", "run_simulation_engine", "source_app_dir",
           "stage_app"]

log = logging.getLogger("fedmeta.runtime")


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
    own FLWR_HOME, as separate hospitals would, and (``app_gate``, on by default when secure) runs with
    ``--isolation process`` beside its app gate, ``fedmeta site-exec``, which starts the ClientApp of app
    bundles the consortium signed only: ``run`` signs the app it submits. Sites listed in ``late`` are provisioned and
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
        app_gate: bool | None = None,
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
        self.app_gate = (not insecure_no_tls) if app_gate is None else bool(app_gate)
        if self.app_gate and insecure_no_tls:
            raise ValueError("app_gate needs the provisioned release key: it cannot go with insecure_no_tls=True.")
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
            self.pki = home.path / "pki"
            provision(self.pki, server_names=["127.0.0.1", "localhost"], port=superlink_port,
                      sites=[self.site_name(i) for i in range(len(self.data_dirs))])
            superlink_dir = self.pki / "superlink"
            security = ["--ssl-ca-certfile", str(superlink_dir / "ca.crt"), "--ssl-certfile",
                        str(superlink_dir / "server.crt"), "--ssl-keyfile", str(superlink_dir / "server.key"),
                        "--enable-supernode-auth"]
        self._superlink_command = [
            _flower_bin("flower-superlink"),
            *security,
            "--host",
            "127.0.0.1",
            "--port",
            str(superlink_port),
            # Registrations and runs survive a restart (as the README's SuperLink; test_consortium_readme.py).
            "--database",
            str(home.path / "superlink-state.db"),
            # The app's dependencies are the installed fedmeta's: no `uv sync` per run (Flower's default since
            # 1.29: 47 s and a 5 GB environment per run, and impossible behind a hospital firewall).
            "--disable-runtime-dependency-installation",
        ]
        self._superlink = self._spawn("superlink", self._superlink_command, home.env)
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
        isolation = []
        bundle = None if self.insecure_no_tls else self._require_pki() / "sites" / self.site_name(index)
        if self.app_gate and bundle is not None and bundle.is_dir():  # a stranger's SuperNode (no bundle): no gate
            # The site's app gate starts its ClientApps, approved app bundles only (fedmeta.client.app_gate).
            (bundle / APPROVED_APPS_DIR).mkdir(mode=0o755, exist_ok=True)
            secret = home.path / f"supernode-{index}" / "superexec.secret"  # the SuperNode's and its gate's only
            if not secret.is_file():
                secret.parent.mkdir(parents=True, exist_ok=True)
                with os.fdopen(os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as handle:
                    handle.write(secrets.token_hex(32))  # 0600 from its creation on
            isolation = ["--isolation", "process", "--superexec-auth-secret-file", str(secret)]
            self._spawn(f"site-exec-{index}", [
                _flower_bin("fedmeta"), "site-exec", "--runtime-api-address", f"127.0.0.1:{node_port}",
                "--approved-apps", str(bundle / APPROVED_APPS_DIR), "--public-key", str(bundle / "release.pub"),
                "--superexec-auth-secret-file", str(secret),
            ], node_env)
        return self._spawn(
            f"supernode-{index}",
            [
                _flower_bin("flower-supernode"),
                *security,
                "--superlink",
                self.superlink_address,
                "--port",
                str(node_port),
                *isolation,
                "--node-config",
                node_config,
            ],
            node_env,
        )

    def approve_app(self, app_dir: Path) -> str:
        """Signs `app_dir`'s app bundle with the consortium's release key into every site's approved-apps/; its digest."""
        pki = self._require_pki()
        digest, identity = app_fab_digest(app_dir)
        for index in range(len(self.data_dirs)):
            sign_approval(digest, key_path=pki / "release" / "release.key",
                          out_dir=pki / "sites" / self.site_name(index) / APPROVED_APPS_DIR, overwrite=True, **identity)
        return digest

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
            process = self._superlink
            if process.poll() is not None:
                raise RuntimeError(f"flower-superlink exited with code {process.returncode} while starting; its log "
                                   f"ends with:\n{_tail(self._log_files[self._processes.index(process)])}")
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
        repeat = 1
        while log_path in self._log_files:  # a site started again (or a stranger on its slot) keeps its own log
            repeat += 1
            log_path = home.path / "logs" / f"{name}.{repeat}.log"
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
            before_submit=self.approve_app if self.app_gate else None,
        )

    def _require_home(self) -> _FlowerHome:
        if self._home is None:
            raise RuntimeError("LocalDeployment is not running; use it as `with LocalDeployment(...)`.")
        return self._home
