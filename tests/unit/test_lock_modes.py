"""qednbd/qed/locking.py in one process: two opens of a file are two open file descriptions,
which OFD locks treat as two holders (as two processes). The compatibility table below is
QEMU's rule written out by hand: open B is refused if it uses what A refuses to share, or
refuses what A uses; -U opens refuse nothing."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from qednbd.errors import ImageError
from qednbd.qed import locking
from qednbd.qed.locking import (
    INSPECTOR,
    READER,
    SHARED_INSPECTOR,
    SHARED_READER,
    WRITER,
    Access,
    LockConflict,
)
from qednbd.qed.storage import FileStorage

MODES = {
    "writer": WRITER,
    "reader": READER,
    "inspector": INSPECTOR,
    "shared-reader": SHARED_READER,
    "shared-inspector": SHARED_INSPECTOR,
}
# (first holder, second opener) -> the second open succeeds; written out, not computed
COMPATIBLE = {
    ("writer", "writer"): False,
    ("writer", "reader"): False,
    ("writer", "inspector"): False,
    ("writer", "shared-reader"): True,
    ("writer", "shared-inspector"): True,
    ("reader", "writer"): False,
    ("reader", "reader"): True,
    ("reader", "inspector"): True,
    ("reader", "shared-reader"): True,
    ("reader", "shared-inspector"): True,
    ("inspector", "writer"): False,
    ("inspector", "reader"): True,
    ("inspector", "inspector"): True,
    ("inspector", "shared-reader"): True,
    ("inspector", "shared-inspector"): True,
    ("shared-reader", "writer"): True,
    ("shared-reader", "reader"): True,
    ("shared-reader", "inspector"): True,
    ("shared-reader", "shared-reader"): True,
    ("shared-reader", "shared-inspector"): True,
    ("shared-inspector", "writer"): True,
    ("shared-inspector", "reader"): True,
    ("shared-inspector", "inspector"): True,
    ("shared-inspector", "shared-reader"): True,
    ("shared-inspector", "shared-inspector"): True,
}


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(b"x" * 4096)
    return path


def _open(path: Path, access: Access) -> FileStorage:
    return FileStorage(str(path), read_only=not access.uses & locking.Perm.WRITE, access=access)


@pytest.mark.parametrize(("first", "second"), sorted(COMPATIBLE), ids=lambda m: m)
def test_compatibility(image: Path, first: str, second: str) -> None:
    holder = _open(image, MODES[first])
    try:
        if COMPATIBLE[first, second]:
            _open(image, MODES[second]).close()
        else:
            with pytest.raises(LockConflict) as caught:
                _open(image, MODES[second])
            assert caught.value.errno == errno.EAGAIN
            assert "lock" in str(caught.value) and "\n" not in str(caught.value)
    finally:
        holder.close()
    _open(image, WRITER).close()  # gone with the holder's close


def test_a_refused_open_keeps_no_locks(image: Path) -> None:
    """QEMU's apply-then-test leaves the loser's bytes behind unless it drops them."""
    reader = _open(image, READER)
    with pytest.raises(LockConflict):
        _open(image, WRITER)
    reader.close()
    _open(image, WRITER).close()  # the refused writer's bytes did not linger


def _refusal(image: Path, holding: Access, opening: Access) -> str:
    """The message of ``opening``'s refusal while ``holding`` is held."""
    holder = _open(image, holding)
    try:
        with pytest.raises(LockConflict) as caught:
            _open(image, opening)
    finally:
        holder.close()
    return str(caught.value)


def test_messages_name_the_lock_and_the_other_access(image: Path) -> None:
    text = _refusal(image, WRITER, READER)
    assert text.startswith('Failed to get shared "write" lock: ')
    assert "open for writing" in text and f"pid {os.getpid()})" in text
    text = _refusal(image, READER, WRITER)
    # both opens are this process's: the message says so rather than blame "another process"
    assert text.startswith(
        'Failed to get "write" lock: this process (another of its opens) has the image open read-only'
    )
    assert "does not share write access" in text
    assert "header only" in _refusal(image, INSPECTOR, WRITER)


def test_create_does_not_empty_a_file_in_use(image: Path) -> None:
    holder = _open(image, READER)
    try:
        with pytest.raises(LockConflict):
            FileStorage(str(image), create=True)
        assert image.read_bytes() == b"x" * 4096
    finally:
        holder.close()
    created = FileStorage(str(image), create=True)
    created.close()
    assert image.read_bytes() == b""


def test_force_share_is_for_reading_only() -> None:
    assert locking.shared(READER) is SHARED_READER
    assert locking.shared(INSPECTOR) is SHARED_INSPECTOR
    with pytest.raises(ImageError, match="read-only"):
        locking.shared(WRITER)


def test_held_bytes_are_qemus(image: Path) -> None:
    """The byte numbers themselves (QEMU's 100 + permission, 200 + refused permission)."""
    writer = _open(image, WRITER)
    probe = os.open(image, os.O_RDONLY)  # another open file description
    try:
        for byte in (100, 101, 103, 201, 203):
            assert locking._held_by_others(probe, byte), byte
        for byte in (102, 200, 202, 99, 104, 199, 204):
            assert not locking._held_by_others(probe, byte), byte
    finally:
        os.close(probe)
        writer.close()


def test_find_holders_names_python_programs(image: Path) -> None:
    writer = _open(image, WRITER)
    try:
        found = locking.find_holders(os.stat(image), {101})
    finally:
        writer.close()
    assert found and found[0][1] == os.getpid()
    assert not locking.find_holders(os.stat(image), {101})
