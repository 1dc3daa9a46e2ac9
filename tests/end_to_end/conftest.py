"""Fixtures of tests/end_to_end: the federation the real engines run."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def federation(smoke_federation) -> Path:
    """The session's smoke federation (tests/conftest.py)."""
    return smoke_federation
