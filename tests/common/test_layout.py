"""The layout holds: one `fedmeta` namespace, clean layers, one wire protocol, declared dependencies.

Static checks over the source (``ast``), plus the installed distribution seen from outside the
checkout, so a bare ``import common`` or a protocol literal cannot creep back in.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from fedmeta.common import protocol

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("common", "client", "server", "simulations")
SOURCES = sorted(p for folder in (*PACKAGES, "tests") for p in (ROOT / folder).rglob("*.py"))
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) for every absolute import in ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


def _where(path: Path, line: int) -> str:
    return f"{path.relative_to(ROOT)}:{line}"


# tests/ mirrors the packages, plus one folder for the runs of real engines and processes.
TEST_FOLDERS = (*PACKAGES, "end_to_end")


def test_every_test_file_lives_in_the_folder_of_what_it_tests():
    tests = ROOT / "tests"
    files = sorted({*tests.rglob("test_*.py"), *tests.rglob("*_test.py")})  # what pytest collects
    stray = [str(path.relative_to(ROOT)) for path in files if path.relative_to(tests).parts[0] not in TEST_FOLDERS]
    assert not stray, f"put these in one of tests/{{{','.join(TEST_FOLDERS)}}}/:\n" + "\n".join(stray)
    assert files, "no test files found under tests/"
    # Each folder is a package (so `python -m tests.end_to_end.test_reproducibility` runs), and none is empty.
    for folder in TEST_FOLDERS:
        assert (tests / folder / "__init__.py").is_file(), f"tests/{folder}/ needs an __init__.py"
        assert any((tests / folder).glob("test_*.py")), f"tests/{folder}/ holds no tests"


def test_no_module_imports_a_bare_top_level_package():
    bare = [f"{_where(path, line)} imports {module}" for path in SOURCES for line, module in _imports(path)
            if module.split(".")[0] in PACKAGES]
    assert not bare, "import these through the fedmeta namespace (fedmeta.common...):\n" + "\n".join(bare)


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        ("common", ("fedmeta.client", "fedmeta.server", "fedmeta.simulations")),
        ("client", ("fedmeta.server", "fedmeta.simulations")),
        ("server", ("fedmeta.client", "fedmeta.simulations")),
    ],
)
def test_layers_import_only_those_below_them(package, forbidden):
    wrong = [f"{_where(path, line)} imports {module}" for path in sorted((ROOT / package).rglob("*.py"))
             for line, module in _imports(path) if module.startswith(forbidden)]
    assert not wrong, "\n".join(wrong)


def test_common_knows_no_flower_except_its_one_records_module():
    flower = [_where(path, line) for path in sorted((ROOT / "common").rglob("*.py")) if path.name != "records.py"
              for line, module in _imports(path) if module.split(".")[0] == "flwr"]
    assert not flower, "common/ is pure ML and data; Flower belongs in records.py or the apps: " + ", ".join(flower)


# Protocol values distinctive enough that any string constant equal to one is the protocol, spelt out.
_PROTOCOL_LITERALS = {
    protocol.GRADS_RECORD, protocol.ROUND_SEED_KEY, protocol.EVAL_SEED_KEY, protocol.PROTOCOL_VERSION_KEY,
    protocol.NUM_EXAMPLES, protocol.SITE_KEY_METRIC, protocol.SUPPORT_LOSS_BEFORE, protocol.SUPPORT_LOSS_AFTER,
    protocol.QUERY_LOSS_BEFORE, protocol.QUERY_LOSS_AFTER, protocol.DATA_DIR_KEY, protocol.SITE_ID_KEY,
    protocol.PARTITION_ID_KEY, protocol.NUM_PARTITIONS_KEY, protocol.TRAIN_SLICES,
}


def test_the_wire_protocol_is_spelt_out_in_one_module_only():
    spelt = []
    for path in sorted(p for package in PACKAGES for p in (ROOT / package).rglob("*.py")):
        if path == ROOT / "common" / "protocol.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Constant) and node.value in _PROTOCOL_LITERALS:
                spelt.append(f"{_where(path, node.lineno)}: {node.value!r}")
            # The list of every algorithm, kept in step by hand, is the protocol too (a subset that
            # classifies algorithms, such as the second-order ones, is not).
            if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
                names = {e.value for e in node.elts if isinstance(e, ast.Constant)}
                if names >= set(protocol.ALGORITHMS):
                    spelt.append(f"{_where(path, node.lineno)}: a list of algorithm names")
    assert not spelt, "use the constants of fedmeta.common.protocol:\n" + "\n".join(spelt)


def test_flower_components_and_the_console_command_live_in_the_namespace():
    components = PYPROJECT["tool"]["flwr"]["app"]["components"]
    assert components == {"serverapp": "fedmeta.server.app:app", "clientapp": "fedmeta.client.app:app"}
    assert PYPROJECT["project"]["scripts"] == {"fedmeta": "fedmeta.simulations.cli:main"}
    mapped = PYPROJECT["tool"]["setuptools"]["package-dir"]
    assert mapped == {f"fedmeta.{p}": p for p in PACKAGES}


def test_the_python_range_is_the_one_the_code_needs():
    # tomllib (every command reads presets with it) is standard library from 3.11.
    assert PYPROJECT["project"]["requires-python"].startswith(">=3.11")


# Distribution name for each third-party import name that differs or is worth stating.
_DISTRIBUTIONS = {"flwr": "flwr", "prometheus_client": "prometheus-client", "tomli_w": "tomli-w", "yaml": "pyyaml",
                  "PIL": "pillow"}


def _declared(requirements: list[str]) -> set[str]:
    names = set()
    for requirement in requirements:
        name = requirement
        for stop in "[<>=!~; ":
            name = name.split(stop)[0]
        names.add(name.strip().lower().replace("_", "-"))
    return names


def test_every_imported_third_party_module_is_declared():
    project = PYPROJECT["project"]
    runtime = _declared(project["dependencies"])
    optional = {extra: _declared(reqs) for extra, reqs in project["optional-dependencies"].items()}
    missing = []
    for path in SOURCES:
        allowed = runtime | optional["anatomy"] if "derive_anatomy" in path.name else set(runtime)
        if path.parts[len(ROOT.parts)] == "tests":
            allowed |= optional["test"]
        for line, module in _imports(path):
            top = module.split(".")[0]
            if top in sys.stdlib_module_names or top in ("fedmeta", "tests"):
                continue
            if _DISTRIBUTIONS.get(top, top).lower().replace("_", "-") not in allowed:
                missing.append(f"{_where(path, line)} imports {top}")
    assert not missing, "declare these in pyproject.toml:\n" + "\n".join(missing)


def test_installed_fedmeta_imports_from_anywhere_and_bare_names_do_not(tmp_path):
    """Seen from a folder outside the checkout, as another project in a hospital's environment would."""
    ok = subprocess.run(
        [sys.executable, "-c", "import fedmeta.common.meta, fedmeta.server.app, fedmeta.client.app"],
        cwd=tmp_path, capture_output=True, text=True,
    )
    assert ok.returncode == 0, ok.stderr
    for bare in PACKAGES:
        result = subprocess.run([sys.executable, "-c", f"import {bare}"], cwd=tmp_path, capture_output=True, text=True)
        assert result.returncode != 0 and "ModuleNotFoundError" in result.stderr, f"`import {bare}` works outside"
