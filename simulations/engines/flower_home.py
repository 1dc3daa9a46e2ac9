"""A private FLWR_HOME and the `flwr` CLI inside it: what both of fedmeta's Flower engines stand on.

`_FlowerHome` keeps every call away from the user's `~/.flwr` (connections live in
`$FLWR_HOME/config.toml`) and tags every process started in it with `FEDMETA_RUNTIME_TAG`, so that the
engines can find and stop them; `flwr run` exits 0 even when the run failed, so `run_app` reads the
outcome back with `flwr list --run-id N --format json`.
"""

from __future__ import annotations

import json
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
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import tomli_w

from fedmeta.simulations.engines.app_bundle import stage_app
from fedmeta.simulations.engines.processes import TAG_VAR

RunConfigValue = bool | int | float | str

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
        before_submit: Callable[[Path], object] | None = None,
    ) -> RunOutcome:
        """`flwr run --stream`, then the real status from the SuperLink; raise unless completed."""
        self._runs += 1
        # `flwr run` walks every file under the app folder before its own filters apply; in a checkout
        # that is the virtual environment and run outputs too (6 s here, per run). A staged copy of the
        # files the bundle can hold builds the same FAB (tests/simulations/test_flower_runtime.py checks it).
        staged = app_dir = stage_app(app_dir, self.path / f"app-{self._runs}", exclude=[self.path])
        if before_submit is not None:
            before_submit(staged)  # e.g. sign the very bundle `flwr run` will build (LocalDeployment.approve_app)
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
# Small helpers: ports, Flower's executables, run config, log tails
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


def _flower_bin(name: str) -> str:
    """The Flower executable `name` of the Python environment running this code."""
    candidate = Path(sys.executable).parent / name
    if candidate.is_file():
        return str(candidate)
    raise FileNotFoundError(
        f"{name} not found beside {sys.executable}; install Flower into this environment "
        "(pip install -e . installs flwr[simulation]==1.41.*)."
    )


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
