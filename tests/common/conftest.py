"""Fixtures of tests/common: a released checkpoint to sign, verify, evaluate and damage."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import train_smoke_run


@pytest.fixture(scope="session")
def trained_checkpoint(smoke_federation, tmp_path_factory) -> Path:
    """A one-round FOMAML run of the smoke federation: the checkpoint a consortium would release."""
    return train_smoke_run(smoke_federation, tmp_path_factory.mktemp("release-run"))
