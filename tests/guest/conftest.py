"""Fixtures of the guest tests: the guest kit (kernel + base initramfs), built once per session."""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from guest.guestkit import GuestKit, GuestUnavailable, build_kit

HOST_TOOLS = (
    "qemu-system-x86_64",
    "qemu-img",
    "apt-get",
    "apt-cache",
    "dpkg-deb",
    "ldd",
    "debugfs",
    "e2fsck",
)


@pytest.fixture(scope="session")
def guest_kit() -> GuestKit:
    missing = [tool for tool in HOST_TOOLS if shutil.which(tool) is None]
    if missing:
        pytest.fail(
            f"the guest tests need {', '.join(missing)} on PATH "
            "(Debian packages qemu-system-x86, qemu-utils, e2fsprogs)",
            pytrace=False,
        )
    start = time.monotonic()
    try:
        kit = build_kit()
    except GuestUnavailable as exc:
        pytest.skip(f"guest packages cannot be downloaded: {exc}")
    print(f"guest kit ready in {time.monotonic() - start:.1f} s: {kit.versions}")
    return kit


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    """A short directory for Unix sockets (sun_path holds 108 bytes; pytest's tmp_path can be long)."""
    path = Path(tempfile.mkdtemp(prefix="qednbd-guest-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
