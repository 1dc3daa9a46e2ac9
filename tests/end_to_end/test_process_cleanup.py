"""A `fedmeta` command that starts workers ends them when it is told to stop (SIGTERM, SIGINT, SIGHUP), and its
pool workers end with it when it is killed (SIGKILL).

Each test starts a real `fedmeta` process tree with a marker in its environment (every descendant
inherits it, re-parented to init or not), waits until the workers exist, signals it, and then looks
through /proc for any process of the tree still alive. Linux only.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="reads process trees from /proc")

MARKER = "FEDMETA_TEST_PROCESS_TREE"

# Two methods of equal budget whose training never ends on its own: the workers are busy when signalled.
ENDLESS_PRESET = """
federation = "smoke"
seeds = 1
shots = [1]
steps = [0]
eval-max-images = 4
oracle-steps = 1
curve-every = 0
methods = ["fomaml", "maml"]

[run-config]
num-rounds = 1000000
episodes-per-site = 1
k-shot = 2
q-query = 2
image-size = 32
model-base-channels = 8
model-levels = 3
device = "cpu"

[training.fomaml]
inner-steps = 1
[training.maml]
inner-steps = 1
"""


def _fedmeta() -> list[str]:
    script = Path(sys.executable).with_name("fedmeta")
    return [str(script)] if script.exists() else [sys.executable, "-m", "fedmeta.simulations.cli"]


class Tree:
    """The processes of one `fedmeta` command: those that carry its marker or whose FLWR_HOME lies in its
    folder, their descendants, and every process ever seen so (Ray's agents overwrite their environment
    with their title, so they are known only as children of the raylet, and only while it lives)."""

    def __init__(self, marker: str, home: Path):
        self.marker, self.home = marker, home
        self.seen: dict[int, tuple[str, str]] = {}  # pid -> (start time, command line)

    def live(self) -> dict[int, str]:
        """pid -> command line of every live (not zombie) process of the tree, and remembers them."""
        table = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
                environ = (entry / "environ").read_bytes().split(b"\0")
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            state, ppid, *rest = stat[stat.rindex(")") + 2:].split()
            if state not in ("Z", "X"):
                table[int(entry.name)] = (int(ppid), rest[17], environ, cmdline)
        home = b"FLWR_HOME=" + os.fsencode(self.home)
        found = {pid for pid, (_, _, environ, _) in table.items()
                 if f"{MARKER}={self.marker}".encode() in environ or any(v.startswith(home) for v in environ)}
        found |= {pid for pid, (start, _) in self.seen.items() if pid in table and table[pid][1] == start}
        grown = True
        while grown:
            children = {pid for pid, (ppid, *_) in table.items() if ppid in found} - found
            found |= children
            grown = bool(children)
        for pid in found:
            self.seen.setdefault(pid, (table[pid][1], table[pid][3]))
        return {pid: table[pid][3] for pid in found}

    def kill(self) -> None:
        for pid in self.live():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _wait_for(condition, timeout_s: float, what: str, process: subprocess.Popen):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if process.poll() is not None:
            pytest.fail(f"fedmeta exited ({process.returncode}) before {what}:\n{_output(process)}")
        time.sleep(0.2)
    pytest.fail(f"no {what} within {timeout_s:.0f} s")


def _start(argv: list[str], tmp_path: Path, request: pytest.FixtureRequest,
           program: list[str] | None = None) -> tuple[subprocess.Popen, Tree]:
    """Starts ``program`` (default: `fedmeta`) with ``argv``, its output to a file, in its own session."""
    tree = Tree(uuid.uuid4().hex, tmp_path)
    # TMPDIR too: the temporary FLWR_HOMEs a command makes for its engines lie under tmp_path. Ray's own
    # folder stays short (its socket paths must fit AF_UNIX's 107 bytes): RAY_TMPDIR.
    (tmp_path / "tmp").mkdir()
    ray_tmp = tempfile.mkdtemp(prefix="fm-ray-")
    request.addfinalizer(lambda: shutil.rmtree(ray_tmp, ignore_errors=True))
    env = dict(os.environ, FLWR_HOME=str(tmp_path / "flwr-home"), TMPDIR=str(tmp_path / "tmp"), RAY_TMPDIR=ray_tmp,
               FLWR_TELEMETRY_ENABLED="0", **{MARKER: tree.marker})
    # Output to a file, not a pipe: a leftover worker holding the pipe would keep the test waiting for EOF.
    # Own process group, so that the SIGINT case can signal the whole group as a terminal's Ctrl-C does.
    with (tmp_path / "fedmeta.log").open("wb") as log:
        process = subprocess.Popen([*(_fedmeta() if program is None else program), *argv], cwd=tmp_path, env=env, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    process.log_path = tmp_path / "fedmeta.log"
    return process, tree


def _output(process: subprocess.Popen) -> str:
    return process.log_path.read_text(errors="replace")


def _stop_and_check(process: subprocess.Popen, tree: Tree, signum: int, to_group: bool, code: int,
                    exit_timeout_s: float = 60.0, then: tuple[int, ...] = ()) -> str:
    """Signals ``process`` (or its group), and ``then`` each of those 0.3 s apart, then asserts that it
    exits with ``code`` and leaves no process."""
    tree.live()  # the tree as it stands when signalled
    for index, each in enumerate((signum, *then)):
        time.sleep(0.3 if index else 0)
        if to_group:
            os.killpg(process.pid, each)
        else:
            process.send_signal(each)
    try:
        process.wait(timeout=exit_timeout_s)
    except subprocess.TimeoutExpired:
        pytest.fail(f"fedmeta did not exit within {exit_timeout_s:.0f} s of {signal.Signals(signum).name}")
    output = _output(process)
    assert process.returncode == code, output
    # multiprocessing's resource tracker ends by itself once the last holder of its pipe is gone.
    deadline = time.monotonic() + 10
    while (left := tree.live()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, f"left running after {signal.Signals(signum).name}: {left}"
    return output


def _kill_leftovers(process: subprocess.Popen, tree: Tree) -> None:
    if process.poll() is None:
        process.kill()
        process.wait()
    tree.kill()


# A command with a tree below it (two children, and a grandchild behind a shell) whose `finally` takes a while.
COMMAND_WITH_A_TREE = """
import subprocess, sys, time
from fedmeta.simulations.engines.processes import run_command

def command():
    children = [subprocess.Popen(["sleep", "300"]) for _ in range(2)]
    children.append(subprocess.Popen(["sh", "-c", "sleep 300 & wait"]))
    print("ready", flush=True)
    try:
        time.sleep(300)
    finally:
        time.sleep(1)  # a second signal meanwhile must not cut this short
        print("cleaned up", flush=True)

sys.exit(run_command(command, "demo"))
"""


@pytest.mark.parametrize(("signals", "code", "said"), [
    ((signal.SIGTERM,), 143, "demo: terminated"),
    ((signal.SIGINT,), 130, "demo: interrupted"),
    ((signal.SIGHUP,), 129, "demo: terminated (SIGHUP"),  # the terminal or ssh session closed
    ((signal.SIGTERM, signal.SIGTERM, signal.SIGINT), 143, "demo: terminated"),  # impatience is ignored
], ids=["sigterm", "sigint", "sighup", "repeated"])
def test_a_signal_stops_the_whole_tree_then_runs_the_commands_cleanup(tmp_path, request, signals, code, said):
    if signal.SIGHUP in signals and signal.getsignal(signal.SIGHUP) == signal.SIG_IGN:
        # Under nohup the command inherits an ignored SIGHUP and, by design, keeps running (the nohup test below):
        # a suite started with nohup cannot test SIGHUP's own path.
        pytest.skip("SIGHUP is ignored in this process (started with nohup), and so in the command it starts")
    process, tree = _start([sys.executable, "-c", COMMAND_WITH_A_TREE], tmp_path, request, program=[])
    try:
        _wait_for(lambda: "ready" in _output(process) and len(tree.live()) >= 5, 30, "the command's children", process)
        output = _stop_and_check(process, tree, signals[0], False, code, then=signals[1:])
        assert said in output and "cleaned up" in output and "Traceback" not in output
    finally:
        _kill_leftovers(process, tree)


@pytest.mark.skipif(shutil.which("nohup") is None, reason="needs nohup")
def test_a_command_started_with_nohup_outlives_sighup_and_still_ends_its_tree_on_sigterm(tmp_path, request):
    process, tree = _start(["-c", COMMAND_WITH_A_TREE], tmp_path, request, program=[shutil.which("nohup"), sys.executable])
    try:
        _wait_for(lambda: "ready" in _output(process) and len(tree.live()) >= 5, 30, "the command's children", process)
        process.send_signal(signal.SIGHUP)
        time.sleep(1)
        assert process.poll() is None and len(tree.live()) >= 5, _output(process)  # nohup asked it to run on
        _stop_and_check(process, tree, signal.SIGTERM, False, 143)
    finally:
        _kill_leftovers(process, tree)


def _gone_after_sigkill(process: subprocess.Popen, tree: Tree, workers: list[int]) -> None:
    """SIGKILLs ``process`` (no handler runs) and asserts that its ``workers``, and then its whole tree, end."""
    tree.live()
    process.kill()
    process.wait()
    deadline = time.monotonic() + 10  # the kernel signals them at once; the resource tracker ends after them
    while (left := tree.live()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not set(workers) & set(left), f"pool workers left running after SIGKILL of their parent: {left}"
    assert not left, f"left running after SIGKILL: {left}"


# A pool like the benchmark's (its initializer), the workers busy when the parent is killed.
BENCHMARK_POOL = """
import multiprocessing, time
from concurrent.futures import ProcessPoolExecutor
from fedmeta.simulations.experiments.benchmark import _worker_init

pool = ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_init, initargs=(1,))
list(pool.map(time.sleep, [1, 1]))  # both workers started and initialised
futures = [pool.submit(time.sleep, 300) for _ in range(2)]
print("ready", flush=True)
time.sleep(300)
"""


def test_benchmark_pool_workers_end_when_their_parent_is_killed(tmp_path, request):
    process, tree = _start(["-c", BENCHMARK_POOL], tmp_path, request, program=[sys.executable])
    try:
        _wait_for(lambda: "ready" in _output(process), 60, "the pool", process)
        workers = [pid for pid, cmd in tree.live().items() if "spawn_main" in cmd]
        assert len(workers) >= 2, tree.live()
        _gone_after_sigkill(process, tree, workers)
    finally:
        _kill_leftovers(process, tree)


def test_synth_killed_with_sigkill_leaves_no_worker_and_the_next_run_sweeps_its_staging(tmp_path, request,
                                                                                      lazy_preset):
    from fedmeta.common.synth import generate_federation

    out = tmp_path / "fed"
    process, tree = _start(["synth", "--out", str(out), "--preset", "default", "--workers", "2", "--all-sites"],
                           tmp_path, request)
    try:
        workers = _wait_for(lambda: [pid for pid, cmd in tree.live().items() if "spawn_main" in cmd][1:] and
                            [pid for pid, cmd in tree.live().items() if "spawn_main" in cmd], 60, "two workers", process)
        staging = tmp_path / f".fed.partial-{process.pid}"
        assert staging.is_dir()
        _gone_after_sigkill(process, tree, workers)
        assert staging.is_dir()  # SIGKILL ran no cleanup ...
        generate_federation(out, lazy_preset(sites=2), seed=0)  # ... the next run (a fast lazy one) does
        assert not staging.exists() and (out / "manifest.json").is_file()
    finally:
        _kill_leftovers(process, tree)


@pytest.mark.parametrize(("signum", "to_group", "code"), [
    (signal.SIGTERM, False, 143),  # a supervisor's or `kill`'s stop, to the command only
    (signal.SIGINT, True, 130),  # Ctrl-C in a terminal: the whole foreground group
], ids=["sigterm", "sigint-group"])
def test_benchmark_workers_end_with_the_command(smoke_federation, tmp_path, request, signum, to_group, code):
    preset = tmp_path / "endless.toml"
    preset.write_text(ENDLESS_PRESET)
    process, tree = _start(["benchmark", "--preset", str(preset), "--federation-dir", str(smoke_federation),
                            "--out", str(tmp_path / "out"), "--jobs", "2"], tmp_path, request)
    try:
        workers = _wait_for(lambda: [pid for pid, cmd in tree.live().items() if "spawn_main" in cmd][1:],
                            90, "two pool workers", process)
        assert workers
        output = _stop_and_check(process, tree, signum, to_group, code)
        assert ("terminated" if signum == signal.SIGTERM else "interrupted") in output
    finally:
        _kill_leftovers(process, tree)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("flwr") is None and not Path(sys.executable).with_name("flwr").exists(),
                    reason="needs Flower's CLI")
def test_a_ray_simulation_ends_its_superlink_and_ray_with_the_command(tmp_path, request):
    """The detached SuperLink, flwr-simulation and Ray are not the command's children: its engine's exit,
    which SIGTERM now runs, stops them by their tag."""
    process, tree = _start(["simulate", "--preset", "smoke", "--engine", "ray", "--rounds", "1000",
                            "--no-baseline", "--federation-dir", str(tmp_path / "federation"),
                            "--out", str(tmp_path / "out")], tmp_path, request)
    try:
        _wait_for(lambda: any("ray::ClientAppActor" in cmd for cmd in tree.live().values()),
                  300, "Ray ClientApp actor", process)
        _stop_and_check(process, tree, signal.SIGTERM, False, 143, exit_timeout_s=90)
    finally:
        _kill_leftovers(process, tree)
