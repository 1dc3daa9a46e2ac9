"""Fast tests of fedmeta.simulations.engines.flower_runtime: argument checks, run-config encoding, process stopping.

The engines themselves run in tests/end_to_end/test_ray_simulation.py and tests/end_to_end/test_deployment.py (slow).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import tomllib
import uuid
from pathlib import Path

import pytest
import tomli_w

from fedmeta.simulations.engines import flower_runtime, processes
from fedmeta.simulations.engines.flower_runtime import LocalDeployment, _checked_run_config, run_simulation_engine

REPO_ROOT = Path(__file__).resolve().parents[2]
linux_only = pytest.mark.skipif(not Path("/proc").is_dir(), reason="process sweep reads /proc")


# -- bad arguments fail before any process starts ----------------------------------------------

BAD_SIMULATION_ARGS = [
    # (description, kwargs, error type, text the message must hold)
    ("no pyproject", {"app_dir": Path("/nonexistent-app")}, FileNotFoundError, "pyproject.toml"),
    ("zero sites", {"num_supernodes": 0}, ValueError, "num_supernodes"),
    ("float sites", {"num_supernodes": 2.0}, ValueError, "num_supernodes"),
    ("bool sites", {"num_supernodes": True}, ValueError, "num_supernodes"),
    ("half a cpu", {"num_cpus_per_client": 0.5}, ValueError, "num_cpus_per_client"),
    ("fractional cpus", {"num_cpus_per_client": 1.5}, ValueError, "whole number"),
    ("negative gpus", {"num_gpus_per_client": -1.0}, ValueError, "num_gpus_per_client"),
    ("no time", {"timeout_s": 0}, ValueError, "timeout_s"),
    ("list value", {"run_config": {"eval-steps": [0, 5]}}, TypeError, "'eval-steps'"),
    ("none value", {"run_config": {"out-dir": None}}, TypeError, "'out-dir'"),
    ("nan value", {"run_config": {"inner-lr": float("nan")}}, ValueError, "'inner-lr'"),
    ("inf value", {"run_config": {"meta-lr": float("inf")}}, ValueError, "'meta-lr'"),
    ("space in key", {"run_config": {"num rounds": 2}}, ValueError, "'num rounds'"),
    ("equals in key", {"run_config": {"a=b": 2}}, ValueError, "'a=b'"),
]


@pytest.mark.parametrize(
    "kwargs, error, text", [case[1:] for case in BAD_SIMULATION_ARGS], ids=[c[0] for c in BAD_SIMULATION_ARGS]
)
def test_run_simulation_engine_rejects_bad_arguments(tmp_path, kwargs, error, text):
    call = {"app_dir": REPO_ROOT, "run_config": {"num-rounds": 1}, "num_supernodes": 2, "flwr_home": tmp_path}
    call.update(kwargs)
    app_dir, run_config = call.pop("app_dir"), call.pop("run_config")
    with pytest.raises(error, match=text):
        run_simulation_engine(app_dir, run_config, **call)
    assert not (tmp_path / "config.toml").exists(), "nothing may be set up for a call that is refused"


def test_run_config_survives_the_toml_file_exactly():
    """Strings with quotes, backslashes and unicode reach Flower unchanged; types are kept."""
    config = {
        "out-dir": '/tmp/a "quoted" dir\\x',
        "label": "Zürich, 3T — site #1",
        "num-rounds": 3,
        "inner-lr": 0.05,
        "resume": False,
        "nested.key": "ok",
    }
    text = tomli_w.dumps(_checked_run_config(config))
    assert tomllib.loads(text) == {**{k: v for k, v in config.items() if k != "nested.key"}, "nested.key": "ok"}
    assert type(tomllib.loads(text)["resume"]) is bool


def test_local_deployment_rejects_missing_and_unquotable_data_dirs(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing-site"):
        LocalDeployment([tmp_path / "missing-site"])
    quoted = tmp_path / 'site "a"'
    quoted.mkdir()
    with pytest.raises(ValueError, match="quote"):
        LocalDeployment([quoted])
    with pytest.raises(ValueError, match="at least one"):
        LocalDeployment([])
    with pytest.raises(ValueError, match="one role per site"):
        LocalDeployment([tmp_path], roles=["train", "heldout"])
    with pytest.raises(ValueError, match="plain word"):
        LocalDeployment([tmp_path], roles=["train' other='x"])
    with pytest.raises(RuntimeError, match="with LocalDeployment"):
        LocalDeployment([tmp_path]).run(REPO_ROOT, {})


def test_free_ports_are_distinct_and_bindable():
    ports = flower_runtime._free_ports(6)
    assert len(set(ports)) == 6
    for port in ports:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))


def test_flower_binaries_come_from_this_environment():
    for name in ("flwr", "flower-superlink", "flower-supernode"):
        assert Path(flower_runtime._flower_bin(name)).parent == Path(sys.executable).parent
    with pytest.raises(FileNotFoundError, match="no-such-flower-tool"):
        flower_runtime._flower_bin("no-such-flower-tool")


# -- stopping processes -------------------------------------------------------------------------


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


@linux_only
def test_stop_processes_kills_a_tree_including_a_child_that_ignores_sigterm():
    # A tree like SuperLink -> SuperExec -> app: a child, and a grandchild deaf to SIGTERM.
    root = subprocess.Popen(
        ["bash", "-c", "sleep 300 & (trap '' TERM; sleep 300; true) & wait"], start_new_session=True
    )
    try:
        tree: set[int] = set()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and len(tree) < 4:
            time.sleep(0.05)
            tree = {root.pid, *_children(root.pid)}
            for child in list(tree - {root.pid}):
                tree.update(_children(child))
        assert len(tree) == 4, tree
        # No clock bound: stop_processes returning with the deaf grandchild dead proves SIGKILL followed.
        survivors = processes.stop_processes({root.pid}, tag=uuid.uuid4().hex, grace_s=1.0)
        root.wait(timeout=5)
        assert survivors == set()
        assert [pid for pid in tree if _alive(pid)] == []
    finally:
        if root.poll() is None:
            os.killpg(root.pid, signal.SIGKILL)


@linux_only
def test_stop_processes_finds_an_orphan_by_its_environment_tag():
    # `flwr run` detaches the local SuperLink: it is nobody's child of ours, only the tag finds it.
    tag = uuid.uuid4().hex
    marker = f"/tmp/fedmeta-orphan-{tag}"
    env = dict(os.environ, **{processes.TAG_VAR: tag})
    subprocess.run(
        ["bash", "-c", f"setsid bash -c 'echo $$ > {marker}; exec sleep 300' >/dev/null 2>&1 < /dev/null &"],
        env=env,
        check=True,
    )
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not (Path(marker).exists() and Path(marker).read_text().strip()):
        time.sleep(0.05)
    orphan = int(Path(marker).read_text())
    Path(marker).unlink()
    try:
        assert _alive(orphan)
        assert orphan in processes.tagged(tag)
        assert processes.stop_processes(set(), tag=tag, grace_s=2.0) == set()
        assert not _alive(orphan)
    finally:
        if _alive(orphan):
            os.kill(orphan, signal.SIGKILL)


# -- the README's configuration table ------------------------------------------------------------


def test_readme_lists_every_run_config_key_with_its_default():
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    defaults = pyproject["tool"]["flwr"]["app"]["config"]
    assert defaults, "[tool.flwr.app.config] is empty"
    readme = (REPO_ROOT / "README.md").read_text()
    rows = {}
    for line in readme.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0].startswith("`") and cells[1].startswith("`"):
            rows[cells[0].strip("`")] = cells[1].strip("`")
    missing = sorted(set(defaults) - set(rows))
    assert not missing, f"README.md's configuration table lacks {missing}"
    stale = sorted(set(rows) - set(defaults))
    assert not stale, f"README.md lists keys pyproject.toml no longer has: {stale}"
    for key, default in defaults.items():
        assert tomllib.loads(f"v = {rows[key]}")["v"] == default, f"README default of {key!r} is stale"


def test_the_app_folder_is_the_checkout_the_package_runs_from():
    """What `fedmeta simulate --engine ray` and `fedmeta perf` bundle: the folder holding the Flower app."""
    import tomllib

    from fedmeta.simulations.engines.flower_runtime import source_app_dir

    root = source_app_dir()
    assert root == REPO_ROOT
    components = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["components"]
    assert components["serverapp"] == "fedmeta.server.app:app"


def test_the_staged_app_builds_the_same_bundle_without_walking_ignored_folders(tmp_path):
    """`flwr run` walks every file under the app folder before filtering (a checkout's virtual environment
    and run outputs: seconds per run); the staged copy holds only what the bundle may hold, and Flower
    builds the byte-identical FAB from it."""
    from flwr.cli.build import build_fab_from_disk

    from fedmeta.simulations.engines.flower_runtime import stage_app

    import shutil

    app = tmp_path / "app"
    shutil.copytree(REPO_ROOT, app, ignore=lambda folder, names: [n for n in names if n in (".git", ".venv", "runs")])
    (app / ".gitignore").write_text((REPO_ROOT / ".gitignore").read_text())
    (app / "runs" / "big").mkdir(parents=True)  # ignored by .gitignore
    (app / "runs" / "big" / "results.json").write_text("{}")
    (app / "venv").mkdir()  # a virtual environment .gitignore does not name
    (app / "venv" / "pyvenv.cfg").write_text("home = /usr\n")
    (app / "venv" / "lib.py").write_text("x = 1\n")
    (app / "linked.py").symlink_to(app / "common" / "__init__.py")
    (app / ".git").mkdir()
    (app / ".git" / "config.toml").write_text("x = 1\n")
    os.mkfifo(app / "editor.fifo")  # never read: Flower skips what is not a regular file in its bundle
    staged = stage_app(app, tmp_path / "staged")
    assert build_fab_from_disk(staged) == build_fab_from_disk(app)
    assert (staged / ".git" / "config.toml").is_file()  # Flower ships a .toml even from .git: so does the copy
    for absent in ("runs", "venv", "linked.py", "editor.fifo"):
        assert not (staged / absent).exists(), absent
    assert (staged / "pyproject.toml").is_file() and (staged / "common" / "meta.py").is_file()
    # Staged again (the next run): replaced, not merged with what an earlier copy held.
    (staged / "stale.py").write_text("")
    assert not (stage_app(app, staged) / "stale.py").exists()
    # A `!` pattern brings a file below an ignored folder back: that folder is walked after all.
    (app / "data").mkdir()
    (app / "data" / "keep.py").write_text("x = 1\n")
    (app / "data" / "drop.py").write_text("x = 2\n")
    (app / ".gitignore").write_text((REPO_ROOT / ".gitignore").read_text() + "data/*\n!data/keep.py\n")
    staged = stage_app(app, tmp_path / "staged")
    assert build_fab_from_disk(staged) == build_fab_from_disk(app)
    assert (staged / "data" / "keep.py").is_file() and not (staged / "data" / "drop.py").exists()
    # A FLWR_HOME inside the app folder is left out; the app folder itself, or a folder stage_app did not make,
    # is never replaced.
    home = app / "flwr-home"
    staged = stage_app(app, home / "app-1", exclude=[home])
    assert not (staged / "flwr-home").exists()
    with pytest.raises(ValueError, match="is the app folder .* or holds it"):
        stage_app(app, app)
    with pytest.raises(ValueError, match="or holds it"):
        stage_app(app, tmp_path)
    (tmp_path / "mine").mkdir()
    with pytest.raises(FileExistsError, match="was not made by stage_app"):
        stage_app(app, tmp_path / "mine")
