"""Shared fixtures: the real receipts in ../shared/data/sroie-dev (skipped where absent)."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SROIE_ROOT = REPO_ROOT.parent / "shared" / "data" / "sroie-dev"


@pytest.fixture(scope="session")
def sroie_root() -> Path:
    """Root of the real SROIE receipts; tests using it skip cleanly where ../shared is absent."""
    if not (SROIE_ROOT / "jsons" / "val.json").is_file():
        pytest.skip(f"real receipts not found at {SROIE_ROOT}")
    return SROIE_ROOT
