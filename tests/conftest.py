"""Shared fixtures: e2e tests boot real guests under QEMU (TCG here)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "backdoor"))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "/e2e/" in str(item.fspath):
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def guest_image() -> Iterator[object]:
    from ntng import image
    from ntng.errors import SetupError

    try:
        yield image.find_image()
    except SetupError as e:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"no guest image ({e}); run ./setup.sh")
