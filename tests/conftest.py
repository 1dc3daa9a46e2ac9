"""Shared fixtures: the smoke federation is generated once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def smoke_federation(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Root of a generated `smoke` federation (3 train + 2 held-out sites, 4 patients each, seed 0)."""
    from fedmeta.common.synth import generate_federation

    return generate_federation(tmp_path_factory.mktemp("federation") / "smoke", "smoke", seed=0)
