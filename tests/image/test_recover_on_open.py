"""Opening a dirty image: read-write checks and repairs it first and says so; read-only never writes.

The images are files of the corpus (``tests/data/``, made by qemu-io and then damaged; see
its README), copied, so these tests need no QEMU tool. Their base layout (4 KiB clusters,
table_size 2): L1 at 0x1000, L2#0 at 0x4000, guest 0 → 0x3000 (0x11), 4k → 0x6000 (0x22),
12k → 0x7000 (0x33), 4M → 0x8000 (0x44) under L2#1 at 0x9000; the file ends at 0xb000.

* ``dirty-damaged.qed``: NEED_CHECK set, L2#0[2] (guest 8k) past the end of the file,
  L2#0[3] dropped (0x7000 leaks), one cluster appended (0xb000 leaks).
* ``dirty-duplicate.qed``: NEED_CHECK set, guest 8k shares 0x6000 with guest 4k, guest 20k
  points into L1.
* ``dirty-clean.qed``: NEED_CHECK set, nothing else wrong.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import struct
import time
from pathlib import Path

import pytest
from helpers import REPO_ROOT

from qednbd.errors import ImageError
from qednbd.qed.check import check
from qednbd.qed.format import F_NEED_CHECK
from qednbd.qed.image import QedImage
from qednbd.qed.storage import FileStorage

DATA = REPO_ROOT / "tests" / "data"
CS = 4096
M = 1 << 20
L2_0 = 0x4000
LOGGER = "qednbd.qed.repair"


def corpus_copy(name: str, tmp_path: Path) -> Path:
    path = tmp_path / name
    shutil.copyfile(DATA / name, path)
    old = time.time() - 1000  # an mtime that any write would visibly move
    os.utime(path, (old, old))
    return path


def features(path: Path) -> int:
    return int(struct.unpack_from("<Q", path.read_bytes(), 16)[0])


def snapshot(path: Path) -> tuple[bytes, int]:
    return path.read_bytes(), path.stat().st_mtime_ns


def repair_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == LOGGER]


def test_rw_open_of_dirty_damaged_image_repairs_and_logs(tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    path = corpus_copy("dirty-damaged.qed", tmp_path)
    assert features(path) & F_NEED_CHECK
    with QedImage.open(str(path)) as image:
        assert not features(path) & F_NEED_CHECK  # cleared on disk once the repair passed its check
        assert image.read(0, 8 * 1024) == b"\x11" * CS + b"\x22" * CS
        assert image.read(8 * 1024, CS) == bytes(CS)  # the past-the-end entry was cleared
        assert image.read(4 * M, CS) == b"\x44" * CS
        report = check(image)
        assert (report.corruptions, report.check_errors) == (0, 0)
        image.write(8 * 1024, b"\x99" * CS)  # the image is usable: an allocating write
    records = repair_records(caplog)
    assert len(records) == 1, [r.getMessage() for r in records]
    message = records[0].getMessage()
    assert records[0].levelno == logging.WARNING
    assert str(path) in message and "not closed cleanly" in message
    assert "cleared 1 entries" in message  # the invalid offset
    assert "truncated 1" in message and "punched 1" in message  # the leak at the end, the interior one
    assert "corruptions 1 -> 0" in message
    assert not features(path) & F_NEED_CHECK
    with QedImage.open(str(path), read_only=True) as image:
        assert image.read(8 * 1024, CS) == b"\x99" * CS
        assert check(image).corruptions == 0


def test_rw_open_splits_duplicates_and_clears_metadata_entries(tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    path = corpus_copy("dirty-duplicate.qed", tmp_path)
    with QedImage.open(str(path)) as image:
        assert image.read(4 * 1024, CS) == b"\x22" * CS
        assert image.read(8 * 1024, CS) == b"\x22" * CS  # still what it read before: a copy now
        assert image.read(20 * 1024, CS) == bytes(CS)  # pointed into L1: cleared
        extents = image.block_status(4 * 1024, 2 * CS)
        hosts = {e.host_offset for e in extents}
        assert len(extents) == 2 and None not in hosts, extents  # two clusters of their own
        image.write(4 * 1024, b"\x55" * CS)  # writing one no longer changes the other
        assert image.read(8 * 1024, CS) == b"\x22" * CS
    (record,) = repair_records(caplog)
    assert "redirected 1 to copies" in record.getMessage()
    assert "cleared 1 entries" in record.getMessage()
    assert not features(path) & F_NEED_CHECK


def test_rw_open_of_dirty_consistent_image_only_clears_the_bit(tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    path = corpus_copy("dirty-clean.qed", tmp_path)
    before = path.read_bytes()
    with QedImage.open(str(path)):
        pass
    after = path.read_bytes()
    assert after[:16] == before[:16] and after[24:] == before[24:]
    assert features(path) == features(DATA / "dirty-clean.qed") & ~F_NEED_CHECK
    (record,) = repair_records(caplog)
    assert record.levelno == logging.INFO
    assert "found nothing to repair" in record.getMessage()


def test_read_only_open_never_repairs(tmp_path: Path, caplog) -> None:
    """A damaged image stays readable for recovery: the bad entry fails, the rest reads."""
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    path = corpus_copy("dirty-damaged.qed", tmp_path)
    before = snapshot(path)
    with QedImage.open(str(path), read_only=True) as image:
        assert image.read(0, CS) == b"\x11" * CS
        assert image.read(4 * 1024, CS) == b"\x22" * CS
        assert image.read(4 * M, CS) == b"\x44" * CS
        assert image.read(12 * 1024, CS) == bytes(CS)  # the dropped entry: unallocated
        with pytest.raises(ImageError) as exc:
            image.read(8 * 1024, CS)
        assert exc.value.errno == errno.EIO
        with pytest.raises(ImageError) as exc:
            image.read(0, 3 * CS)  # a read spanning it fails as a whole
        assert exc.value.errno == errno.EIO
        assert check(image).corruptions == 1
    assert snapshot(path) == before
    assert repair_records(caplog) == []


def test_clean_image_opened_read_write_is_not_modified(tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    path = corpus_copy("clean.qed", tmp_path)
    before = snapshot(path)
    with QedImage.open(str(path)) as image:
        assert image.read(0, CS) == b"\x11" * CS
        image.write(0, b"\x11" * CS)  # in place, the same bytes: no allocation, no header write
        image.flush()
    assert snapshot(path)[0] == before[0]
    assert repair_records(caplog) == []


def test_clean_image_open_and_close_does_not_touch_the_file(tmp_path: Path) -> None:
    path = corpus_copy("clean.qed", tmp_path)
    before = snapshot(path)
    with QedImage.open(str(path)) as image:
        image.read(0, 16 * 1024)
    assert snapshot(path) == before


class FailingReads(FileStorage):
    """A read-write file whose reads touching [bad, bad + length) fail with EIO."""

    def __init__(self, path: str, bad: int, length: int) -> None:
        super().__init__(path)
        self.bad, self.bad_length = bad, length
        self.failed = 0

    def pread(self, length: int, offset: int) -> bytes:
        if offset < self.bad + self.bad_length and self.bad < offset + length:
            self.failed += 1
            raise ImageError(errno.EIO, "read failed: Input/output error")
        return super().pread(length, offset)


@pytest.mark.parametrize("name", ["dirty-damaged.qed", "dirty-clean.qed"])
def test_unreadable_table_refuses_read_write_open(name: str, tmp_path: Path) -> None:
    """An L2 table that cannot be read: repair cannot make the image safe, so no RW use."""
    path = corpus_copy(name, tmp_path)
    storage = FailingReads(str(path), L2_0 + 512, 512)
    try:
        with pytest.raises(ImageError) as exc:
            QedImage(storage, str(path))
    finally:
        storage.close()
    assert storage.failed
    assert "qednbd check -r all" in exc.value.message, exc.value.message
    assert str(path) in exc.value.message
    assert features(path) & F_NEED_CHECK  # still dirty: the next open checks again
    # and the image is still readable for recovery
    with QedImage.open(str(path), read_only=True) as image:
        assert image.read(0, CS) == b"\x11" * CS
