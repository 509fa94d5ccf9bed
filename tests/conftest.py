"""Session-wide checks. Shared helpers live in ``helpers.py`` (``from helpers import run``)."""

from __future__ import annotations

import shutil

import pytest

REQUIRED_TOOLS = ("qemu-img", "qemu-io")  # both from Debian's qemu-utils


@pytest.fixture(scope="session", autouse=True)
def _qemu_tools_present() -> None:
    """Fail every test, loudly, when the QEMU tools are missing: nothing is skipped silently."""
    missing = [tool for tool in REQUIRED_TOOLS if shutil.which(tool) is None]
    if missing:
        pytest.fail(
            f"{', '.join(missing)} not found on PATH: run scripts/test.sh, which installs qemu-utils",
            pytrace=False,
        )
