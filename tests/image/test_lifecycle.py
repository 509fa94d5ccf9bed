"""The NEED_CHECK (dirty bit) lifecycle and the header rules around opening.

Every test drives a real file through a :class:`RecordingStorage` (see conftest.py) and
asserts on the recorded order of writes and flushes, and on the bytes in the file.

The rules (image.py's docstring, qed.md §2 and §4.4):
* before the first allocating write of a dirty period the header is written with
  NEED_CHECK set and flushed, before any data — also with a backing file (QEMU skips
  that case; we do not);
* writes into allocated clusters touch neither the header nor the tables;
* close flushes, clears the bit and flushes again; ``poll_idle`` does the same after
  5 s without an allocating write;
* an image that was dirty when opened keeps the bit (it has not been checked);
* a read-only open writes nothing; unknown autoclear bits are cleared by a RW open only;
  unknown compat bits survive.
"""

from __future__ import annotations

import errno
import resource
import struct
import subprocess
from pathlib import Path

import pytest
from helpers import qemu_img, read_features

from qednbd.errors import ImageError
from qednbd.qed.format import F_NEED_CHECK
from qednbd.qed.image import QedImage, create_image

KiB, MiB = 1 << 10, 1 << 20
CS = 64 * KiB
TS = 4
METADATA_END = (1 + TS) * CS  # header cluster + L1 table of a fresh image


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _features_of(header_bytes: bytes) -> int:
    return int(struct.unpack_from("<Q", header_bytes, 16)[0])


def _is_header_write(event) -> bool:
    return event.kind == "pwrite" and event.offset == 0


def _fresh(tmp_path: Path, size: int = 10 * MiB, **kw) -> str:
    path = str(tmp_path / "img.qed")
    create_image(path, size, cluster_size=CS, table_size=TS, **kw)
    return path


def _backed(tmp_path: Path) -> str:
    (tmp_path / "base.raw").write_bytes(b"\xbb" * MiB)
    return _fresh(tmp_path, 4 * MiB, backing_file="base.raw", backing_format="raw")


def _open(recorder, path: str, clock=None, read_only: bool = False, recover: bool = True):
    rec = recorder(path, read_only=read_only)
    image = QedImage(rec.as_storage(), path, clock=clock or FakeClock(), recover=recover)
    return rec, image


# --------------------------------------------------------------------------------------
# (a), (b): NEED_CHECK is set and flushed before the first allocating write


@pytest.mark.parametrize("backing", [False, True], ids=["no-backing", "raw-backing"])
def test_need_check_is_durable_before_the_first_data_write(tmp_path, recorder, backing: bool) -> None:
    path = _backed(tmp_path) if backing else _fresh(tmp_path)
    clean_header = Path(path).read_bytes()[:64]
    rec, image = _open(recorder, path)
    assert rec.events == [], "a plain RW open wrote something"

    image.write(4 * KiB, b"\x11" * 4 * KiB)

    events = rec.events
    # 1. the header, with NEED_CHECK set; 2. a flush; only then anything else.
    assert _is_header_write(events[0])
    assert _features_of(events[0].data) & F_NEED_CHECK
    assert events[1].kind == "flush"
    assert all(not _is_header_write(e) for e in events[2:])
    data_writes = [i for i, e in enumerate(events) if e.kind == "pwrite" and e.offset >= METADATA_END]
    assert data_writes and min(data_writes) > 1
    assert read_features(path) & F_NEED_CHECK
    # The header write changed nothing but the features.
    expected = bytearray(clean_header)
    expected[16:24] = struct.pack("<Q", _features_of(clean_header) | F_NEED_CHECK)
    assert events[0].data[:64] == bytes(expected)
    image.close()
    assert read_features(path) & F_NEED_CHECK == 0


def test_qemu_sets_no_need_check_with_a_backing_file_but_we_do(tmp_path, recorder) -> None:
    """The difference is deliberate (image.py docstring): the bit must be on disk."""
    path = _backed(tmp_path)
    _rec, image = _open(recorder, path)
    image.write(0, b"\x22" * 512)
    assert read_features(path) & F_NEED_CHECK
    image.close()


def test_allocation_order_data_then_l2_flush_then_l1(tmp_path, recorder) -> None:
    """qed.md §4.2: data, then the new L2 table written whole and flushed, then the L1 sector."""
    path = _fresh(tmp_path)
    rec, image = _open(recorder, path)
    image.write(0, b"\x33" * 4 * KiB)
    kinds = [(e.kind, e.offset, e.length) for e in rec.events]
    assert kinds == [
        ("pwrite", 0, 64),
        ("flush", 0, 0),
        ("pwrite", 0x50000, CS),  # the data cluster, zero-filled tail included
        ("pwrite", 0x60000, CS * TS),  # the new L2 table
        ("flush", 0, 0),
        ("pwrite", CS, 512),  # the L1 sector holding L1[0]
    ]
    image.close()


def test_with_a_backing_file_data_is_flushed_before_the_tables(tmp_path, recorder) -> None:
    """qed.md §4.2 step 5: copied-on-write data is durable before any table points at it."""
    path = _backed(tmp_path)
    rec, image = _open(recorder, path)
    image.write(0, b"\x44" * 4 * KiB)  # allocates L2 too
    image.write(CS, b"\x55" * 4 * KiB)  # only an L2 update
    kinds = [(e.kind, e.offset, e.length) for e in rec.events]
    assert kinds == [
        ("pwrite", 0, 64),
        ("flush", 0, 0),
        ("pwrite", 0x50000, CS),  # data, with the rest of the cluster from the backing file
        ("flush", 0, 0),
        ("pwrite", 0x60000, CS * TS),
        ("flush", 0, 0),
        ("pwrite", CS, 512),
        ("pwrite", 0xA0000, CS),  # second data cluster
        ("flush", 0, 0),
        ("pwrite", 0x60000, 512),  # the L2 sector holding L2[1]
    ]
    assert rec.events[2].data == b"\x44" * 4 * KiB + b"\xbb" * (CS - 4 * KiB)
    image.close()


def test_later_allocations_do_not_rewrite_the_header(tmp_path, recorder) -> None:
    path = _fresh(tmp_path)
    rec, image = _open(recorder, path)
    image.write(0, b"\x11" * 512)
    rec.forget()
    image.write(5 * CS, b"\x12" * 512)  # allocating, same L2 table
    image.write_zeroes(8 * CS, 2 * CS)  # allocating zero clusters
    assert not any(_is_header_write(e) for e in rec.events)
    assert rec.flushes() == []
    image.close()


def test_write_zeroes_on_unallocated_clusters_sets_need_check(tmp_path, recorder) -> None:
    """qed.md §4.5: an aligned zero write is allocating (it changes L2) like any other."""
    path = _fresh(tmp_path)
    rec, image = _open(recorder, path)
    image.write_zeroes(0, 2 * CS)
    assert _is_header_write(rec.events[0]) and rec.events[1].kind == "flush"
    assert read_features(path) & F_NEED_CHECK
    image.close()


# --------------------------------------------------------------------------------------
# (c) writes in place


def test_in_place_writes_touch_neither_header_nor_tables(tmp_path, recorder) -> None:
    path = _fresh(tmp_path)
    with QedImage.open(path) as image:
        image.write(0, b"\x11" * 2 * CS)
    assert read_features(path) == 0
    rec, image = _open(recorder, path)
    image.write(100, b"\x22" * 5000)
    image.write(CS - 10, b"\x23" * 20)  # spans both allocated clusters
    image.write_zeroes(0, CS)  # zeroing an allocated cluster writes in place too
    assert rec.flushes() == []
    for e in rec.writes():
        assert e.offset >= 0x50000 and e.offset + e.length <= 0x50000 + 2 * CS, e
    assert read_features(path) == 0
    assert image.read(100, 4) == b"\0\0\0\0"
    assert image.read(CS, 10) == b"\x23" * 10
    image.close()
    assert read_features(path) == 0


# --------------------------------------------------------------------------------------
# (d) close


def test_close_flushes_clears_and_flushes(tmp_path, recorder) -> None:
    path = _fresh(tmp_path)
    rec, image = _open(recorder, path)
    image.write(0, b"\x11" * 4 * KiB)
    dirty_header = Path(path).read_bytes()[:64]
    assert _features_of(dirty_header) & F_NEED_CHECK
    rec.forget()

    image.close()

    kinds = [e.kind for e in rec.events]
    assert kinds == ["flush", "pwrite", "flush"]
    header = rec.events[1]
    assert header.offset == 0
    assert _features_of(header.data) & F_NEED_CHECK == 0
    # Only the features changed.
    expected = bytearray(dirty_header)
    expected[16:24] = struct.pack("<Q", _features_of(dirty_header) & ~F_NEED_CHECK)
    assert header.data[:64] == bytes(expected)
    assert Path(path).read_bytes()[16] & F_NEED_CHECK == 0


# --------------------------------------------------------------------------------------
# (e) poll_idle


def test_poll_idle_clears_after_five_quiet_seconds(tmp_path, recorder) -> None:
    path = _fresh(tmp_path)
    clock = FakeClock(100.0)
    rec, image = _open(recorder, path, clock)
    image.write(0, b"\x11" * 4 * KiB)
    assert read_features(path) & F_NEED_CHECK
    rec.forget()

    clock.now = 104.999
    assert image.poll_idle() is False
    assert rec.events == []
    assert read_features(path) & F_NEED_CHECK

    clock.now = 105.0
    assert image.poll_idle() is True
    assert read_features(path) & F_NEED_CHECK == 0
    assert [e.kind for e in rec.events] == ["flush", "pwrite", "flush"]
    assert rec.events[1].offset == 0

    rec.forget()
    clock.now = 200.0
    assert image.poll_idle() is False  # nothing to clear
    assert rec.events == []

    image.write(100, b"\x12" * 100)  # in place: stays clean
    assert read_features(path) & F_NEED_CHECK == 0
    assert not any(_is_header_write(e) for e in rec.events)
    rec.forget()
    image.write(3 * CS, b"\x13" * 100)  # allocating: dirty again, durably first
    assert read_features(path) & F_NEED_CHECK
    assert _is_header_write(rec.events[0]) and rec.events[1].kind == "flush"
    image.close()
    assert read_features(path) == 0


def test_poll_idle_counts_from_the_last_allocating_write(tmp_path, recorder) -> None:
    path = _fresh(tmp_path)
    clock = FakeClock(100.0)
    _rec, image = _open(recorder, path, clock)
    image.write(0, b"\x11" * 512)
    clock.now = 103.0
    image.write(2 * CS, b"\x11" * 512)
    clock.now = 106.0  # 6 s after the first, 3 s after the last
    assert image.poll_idle() is False
    assert read_features(path) & F_NEED_CHECK
    clock.now = 104.0 + 4.0  # 5 s after the last
    assert image.poll_idle() is True
    assert read_features(path) & F_NEED_CHECK == 0
    image.close()


# --------------------------------------------------------------------------------------
# (f), (h): images that were dirty when opened


def _dirty_by_qemu(tmp_path: Path) -> str:
    path = str(tmp_path / "dirty.qed")
    qemu_img("create", "-f", "qed", path, "10M")
    # abort: no clean close. Run where a core dump (if enabled) cannot litter the checkout.
    subprocess.run(
        ["qemu-io", "-f", "qed", "-c", "write -P 0xcd 0 4k", "-c", "abort", path],
        cwd=tmp_path,
        capture_output=True,
        check=False,
        timeout=60,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_CORE, (0, 0)),
    )
    assert read_features(path) & F_NEED_CHECK, "qemu-io abort did not leave the image dirty"
    return path


@pytest.mark.interop
def test_read_only_open_of_a_dirty_image_writes_nothing(tmp_path, recorder) -> None:
    path = _dirty_by_qemu(tmp_path)
    before = Path(path).read_bytes()
    clock = FakeClock(0.0)
    rec, image = _open(recorder, path, clock, read_only=True)

    assert image.read(0, 4 * KiB) == b"\xcd" * 4 * KiB
    assert image.read(4 * KiB, 60 * KiB) == bytes(60 * KiB)
    assert image.read(0, 10 * MiB)[: 4 * KiB] == b"\xcd" * 4 * KiB
    image.block_status(0, 10 * MiB)
    with pytest.raises(ImageError) as info:
        image.write(0, b"x")
    assert info.value.errno == errno.EROFS
    clock.now = 1e6
    assert image.poll_idle() is False
    image.flush()
    image.close()

    assert rec.events == []
    assert Path(path).read_bytes() == before


@pytest.mark.interop
def test_rw_open_of_a_dirty_image_checks_it_and_clears_the_bit(tmp_path, recorder, caplog) -> None:
    """QEMU's rule, kept: a read-write open of a dirty image checks (and repairs) it first."""
    path = _dirty_by_qemu(tmp_path)
    caplog.set_level("INFO", logger="qednbd.qed.repair")
    rec, image = _open(recorder, path)
    assert not read_features(path) & F_NEED_CHECK, "the open did not check and clear the bit"
    assert rec.events[-1].kind == "flush"
    assert "not closed cleanly" in caplog.text
    assert image.read(0, 4 * KiB) == b"\xcd" * 4 * KiB
    image.close()


@pytest.mark.interop
def test_rw_open_without_recovery_keeps_the_bit(tmp_path, recorder) -> None:
    path = _dirty_by_qemu(tmp_path)
    clock = FakeClock(0.0)
    _rec, image = _open(recorder, path, clock, recover=False)
    assert image.read(0, 4 * KiB) == b"\xcd" * 4 * KiB
    image.write(4 * KiB, b"\x11" * 4 * KiB)  # in place
    image.write(CS, b"\x12" * 4 * KiB)  # allocating
    clock.now = 1e6
    assert image.poll_idle() is False
    assert read_features(path) & F_NEED_CHECK
    image.close()
    assert read_features(path) & F_NEED_CHECK, "close cleared NEED_CHECK of an unchecked image"
    with QedImage.open(path, read_only=True) as again:
        assert again.read(0, 8 * KiB) == b"\xcd" * 4 * KiB + b"\x11" * 4 * KiB
        assert again.read(CS, 4 * KiB) == b"\x12" * 4 * KiB


def test_rw_open_without_recovery_keeps_the_bit_even_without_writes(tmp_path, ondisk) -> None:
    path = _fresh(tmp_path)
    ondisk.poke_u64(path, 16, F_NEED_CHECK)
    with QedImage.open(path, recover=False) as image:
        image.read(0, 4096)
    assert read_features(path) == F_NEED_CHECK


# --------------------------------------------------------------------------------------
# (g) unknown autoclear and compat bits


def test_unknown_autoclear_bits_are_cleared_by_a_rw_open(tmp_path, recorder, ondisk) -> None:
    path = _fresh(tmp_path)
    ondisk.poke_u64(path, 32, 0x8 | 1 << 40)
    before = Path(path).read_bytes()[:64]
    rec, image = _open(recorder, path)
    # At open: the header rewritten with autoclear 0 (nothing else changed), then a flush.
    assert [e.kind for e in rec.events] == ["pwrite", "flush"]
    assert rec.events[0].offset == 0
    expected = bytearray(before)
    expected[32:40] = bytes(8)
    assert rec.events[0].data[:64] == bytes(expected)
    assert ondisk.u64(path, 32) == 0
    image.close()
    assert ondisk.u64(path, 32) == 0


def test_unknown_autoclear_bits_are_kept_by_a_read_only_open(tmp_path, recorder, ondisk) -> None:
    path = _fresh(tmp_path)
    ondisk.poke_u64(path, 32, 0x8)
    before = Path(path).read_bytes()
    rec, image = _open(recorder, path, read_only=True)
    image.read(0, 4096)
    image.close()
    assert rec.events == []
    assert ondisk.u64(path, 32) == 0x8
    assert Path(path).read_bytes() == before


def test_unknown_compat_bits_survive_rw_use(tmp_path, recorder, ondisk) -> None:
    path = _fresh(tmp_path)
    ondisk.poke_u64(path, 24, 0x8 | 1 << 63)
    clock = FakeClock(0.0)
    _rec, image = _open(recorder, path, clock)
    image.write(0, b"\x11" * 4 * KiB)  # header rewritten with NEED_CHECK
    assert ondisk.u64(path, 24) == 0x8 | 1 << 63
    clock.now = 10.0
    assert image.poll_idle()  # header rewritten again
    assert ondisk.u64(path, 24) == 0x8 | 1 << 63
    image.write(CS, b"\x12" * 4 * KiB)
    image.resize(20 * MiB)
    image.close()
    assert ondisk.u64(path, 24) == 0x8 | 1 << 63
    assert read_features(path) == 0
    with QedImage.open(path, read_only=True) as again:
        assert again.read(0, 4 * KiB) == b"\x11" * 4 * KiB
        assert again.size == 20 * MiB
