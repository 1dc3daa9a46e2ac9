"""Flower 1.43 is HTTP-only: nothing fedmeta ships names a gRPC-only port, flag or transport.

Flower before 1.41 served the Fleet API over gRPC on 9092 (``--fleet-api-type grpc-rere``/``grpc-adapter``), the
ServerAppIo API on 9091 and the Control (Exec) API on 9093, and SuperNodes took ``--clientappio-api-address``.
1.41 serves all of it over one HTTP port (8000 by default; a SuperNode's Runtime API on its ``--port``), and 1.43
drops the gRPC paths altogether: a deployment, README or code line that still names one breaks on upgrade.
"""

from __future__ import annotations

import re
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]

GRPC_ONLY = re.compile(
    r"(?<![\d.])909[1-3](?![\d.])|fleet-api-type|grpc-rere|grpc-bidi|grpc-adapter|serverappio-api-address"
    r"|exec-api-address|clientappio-api-address|appio-api-address"
)
SHIPPED = ("README.md", "deploy", "docs", "common", "client", "server", "simulations", "pyproject.toml", ".ci")
TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".toml", ".sh", ".conf", ".template", ".txt", ".json", ""}


def shipped_files() -> list[Path]:
    files = []
    for name in SHIPPED:
        path = REPO_ROOT / name
        candidates = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        files += [p for p in candidates if p.suffix in TEXT_SUFFIXES and "__pycache__" not in p.parts]
    return files


def test_no_grpc_only_port_or_flag_is_named_anywhere_fedmeta_ships():
    files = shipped_files()
    assert any(p.name == "compose.yaml" for p in files) and any(p.name == "README.md" for p in files)
    hits = [f"{path.relative_to(REPO_ROOT)}:{number}: {line.strip()}"
            for path in files
            for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1)
            if GRPC_ONLY.search(line)]
    assert hits == [], "gRPC-only ports or flags (gone in Flower 1.43):\n" + "\n".join(hits)


def test_the_pattern_finds_what_it_is_for():
    for line in ("--fleet-api-type grpc-rere", "ports: ['9092:9092']", "--serverappio-api-address 0.0.0.0:9091",
                 "superlink:9093"):
        assert GRPC_ONLY.search(line), line
    for line in ("--port 9094", "loss 2.049094557762146", "127.0.0.1:8000"):
        assert not GRPC_ONLY.search(line), line
