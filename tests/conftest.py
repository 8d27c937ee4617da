"""Shared pytest fixtures: location of the read-only Caffe reference data."""
from pathlib import Path

import pytest

REFERENCE_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "reference"


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """The Caffe reference data folder beside the repo; skips the test when it is absent."""
    if not REFERENCE_DIR.is_dir():
        pytest.skip(f"Caffe reference data not found at {REFERENCE_DIR}")
    return REFERENCE_DIR
