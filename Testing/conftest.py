"""Shared fixtures."""

from __future__ import annotations

import pytest

from .helpers import make_tiny_model


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """An untrained small model folder (3 mm grid, 32^3 patches) for plumbing tests."""
    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny")
