"""Trim and write_zeroes, checked in the file itself and with QEMU's tools.

* trim punches host holes in whole allocated clusters and leaves every table entry
  alone: ``qemu-img map`` shows the same data extents at the same offsets, ``qemu-img
  check`` stays clean, the punched clusters read zeros, and partial, unallocated and
  zero clusters are untouched (so reads still fall through to the backing file);
* write_zeroes turns whole unallocated clusters into zero entries (L2 entry 1), zeroes
  allocated clusters in place, and writes partial clusters as ordinary data; with a
  backing file a zeroed range reads zeros, not the backing file (qed.md §4.5).
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
from helpers import qemu_img, qemu_io, read_features

from qednbd.errors import ImageError
from qednbd.qed.image import QedImage, create_image
from qednbd.qed.storage import FileStorage

KiB, MiB = 1 << 10, 1 << 20
CS = 64 * KiB
TS = 4
FIRST_DATA = (1 + TS) * CS  # 0x50000: where a fresh image's first allocation lands


@pytest.fixture
def can_punch(tmp_path: Path) -> None:
    """Skip unless this filesystem frees blocks on FALLOC_FL_PUNCH_HOLE."""
    probe = tmp_path / "punch-probe"
    probe.write_bytes(b"\x5a" * MiB)
    storage = FileStorage(str(probe))
    try:
        storage.flush()
        before = os.stat(probe).st_blocks
        punched = storage.punch_hole(0, MiB // 2)
        after = os.stat(probe).st_blocks
    finally:
        storage.close()
        probe.unlink()
    if not punched or after >= before:
        pytest.skip(f"this filesystem cannot punch holes (st_blocks {before} -> {after})")


def _map(path: str) -> list[dict[str, object]]:
    return json.loads(qemu_img("map", "--output=json", "-f", "qed", path).stdout)


def _check_clean(path: str) -> None:
    out = qemu_img("check", "-f", "qed", path, check=False)
    assert out.returncode == 0, out.stdout + out.stderr


def _qemu_raw(path: str, tmp_path: Path) -> bytes:
    raw = tmp_path / "qemu-view.raw"
    qemu_img("convert", "-f", "qed", "-O", "raw", path, str(raw))
    data = raw.read_bytes()
    raw.unlink()
    return data


def _holes(path: str, start: int, end: int) -> list[tuple[int, int]]:
    """Hole extents of the host file within [start, end), by SEEK_HOLE/SEEK_DATA."""
    out = []
    fd = os.open(path, os.O_RDONLY)
    try:
        pos = start
        while pos < end:
            hole = os.lseek(fd, pos, os.SEEK_HOLE)
            if hole >= end:
                break
            try:
                data = os.lseek(fd, hole, os.SEEK_DATA)
            except OSError:
                data = end
            out.append((hole, min(data, end)))
            pos = data
    finally:
        os.close(fd)
    return out


# --------------------------------------------------------------------------------------
# trim


@pytest.mark.interop
def test_trim_punches_whole_clusters_and_keeps_entries(tmp_path, can_punch, recorder, ondisk) -> None:
    path = str(tmp_path / "img.qed")
    create_image(path, 4 * MiB, cluster_size=CS, table_size=TS)
    pattern = bytes(range(256)) * (MiB // 256)
    with QedImage.open(path) as image:
        image.write(0, pattern)  # 16 contiguous clusters at 0x50000
    entries = [ondisk.l2_entry(path, i * CS) for i in range(64)]
    assert entries[:16] == [FIRST_DATA + i * CS for i in range(16)]
    map_before = _map(path)
    blocks_before = os.stat(path).st_blocks
    length_before = os.path.getsize(path)
    assert _holes(path, FIRST_DATA, FIRST_DATA + MiB) == []

    rec = recorder(path)
    image = QedImage(rec.as_storage(), path)
    image.trim(CS - 512, 5 * CS + 1024)  # whole clusters 1..5; clusters 0 and 6 only in part

    # Only hole punches, of exactly the whole clusters, in one run; no writes, no flushes.
    assert [(e.kind, e.offset, e.length) for e in rec.events] == [("punch_hole", FIRST_DATA + CS, 5 * CS)]
    assert image.read(CS, 5 * CS) == bytes(5 * CS)
    assert image.read(0, CS) == pattern[:CS]
    assert image.read(6 * CS, 10 * CS) == pattern[6 * CS :]
    image.close()

    assert _holes(path, FIRST_DATA, FIRST_DATA + MiB) == [(FIRST_DATA + CS, FIRST_DATA + 6 * CS)]
    assert blocks_before - os.stat(path).st_blocks >= 5 * CS // 512
    assert os.path.getsize(path) == length_before
    assert [ondisk.l2_entry(path, i * CS) for i in range(64)] == entries
    assert read_features(path) == 0
    # QEMU sees the same mapping and a clean image, and reads zeros where we punched.
    assert _map(path) == map_before
    _check_clean(path)
    expected = pattern[:CS] + bytes(5 * CS) + pattern[6 * CS :] + bytes(3 * MiB)
    assert _qemu_raw(path, tmp_path) == expected


@pytest.mark.interop
def test_trim_leaves_unallocated_and_zero_clusters_alone(tmp_path, can_punch, ondisk) -> None:
    (tmp_path / "base.raw").write_bytes(b"\xbb" * MiB)
    path = str(tmp_path / "img.qed")
    create_image(path, 2 * MiB, cluster_size=CS, table_size=TS, backing_file="base.raw", backing_format="raw")
    with QedImage.open(path) as image:
        image.write_zeroes(CS, 2 * CS)  # clusters 1, 2 → zero entries
        image.write(4 * CS, b"\x44" * CS)  # cluster 4 → data
        image.write(6 * CS + 100, b"\x66" * 100)  # cluster 6 → data, rest copied from backing
    entries = [ondisk.l2_entry(path, i * CS) for i in range(32)]
    assert entries[1:3] == [1, 1] and entries[0] == entries[3] == 0
    assert entries[4] > 1 and entries[6] > 1
    length = os.path.getsize(path)
    map_before = _map(path)

    with QedImage.open(path) as image:
        image.trim(0, 2 * MiB)
        expected = bytearray(b"\xbb" * MiB + bytes(MiB))
        expected[CS : 3 * CS] = bytes(2 * CS)
        expected[4 * CS : 5 * CS] = bytes(CS)  # punched: zeros, not the backing file
        expected[6 * CS : 7 * CS] = bytes(CS)
        assert image.read(0, 2 * MiB) == expected

    assert [ondisk.l2_entry(path, i * CS) for i in range(32)] == entries
    assert os.path.getsize(path) == length
    assert _map(path) == map_before
    _check_clean(path)
    assert _qemu_raw(path, tmp_path) == expected


def test_trim_of_unallocated_or_partial_clusters_changes_nothing(tmp_path, recorder) -> None:
    path = str(tmp_path / "img.qed")
    create_image(path, 4 * MiB, cluster_size=CS, table_size=TS)
    with QedImage.open(path) as image:
        image.write(0, b"\x11" * CS)
    before = Path(path).read_bytes()
    rec = recorder(path)
    image = QedImage(rec.as_storage(), path)
    image.trim(100, CS - 200)  # inside the allocated cluster, not all of it
    image.trim(CS, 3 * MiB)  # all unallocated
    image.trim(0, 100)
    assert rec.events == []
    assert image.read(0, CS) == b"\x11" * CS
    image.close()
    assert Path(path).read_bytes() == before


def test_trim_on_a_read_only_image_is_refused(tmp_path) -> None:
    path = str(tmp_path / "img.qed")
    create_image(path, MiB, cluster_size=CS, table_size=TS)
    with QedImage.open(path, read_only=True) as image, pytest.raises(ImageError) as info:
        image.trim(0, MiB)
    assert info.value.errno == errno.EROFS


# --------------------------------------------------------------------------------------
# write_zeroes


def _twin(tmp_path: Path, name: str, size: str = "10M") -> str:
    """An image made by qemu-img with the same options as ours."""
    path = str(tmp_path / name)
    qemu_img("create", "-f", "qed", "-o", f"cluster_size={CS},table_size={TS}", path, size)
    return path


@pytest.mark.interop
def test_whole_unallocated_clusters_become_zero_entries(tmp_path, ondisk) -> None:
    path = str(tmp_path / "img.qed")
    create_image(path, 10 * MiB, cluster_size=CS, table_size=TS)
    with QedImage.open(path) as image:
        image.write_zeroes(0, 2 * CS)
        assert image.read(0, 3 * CS) == bytes(3 * CS)
    assert ondisk.l1_entry(path, 0) == FIRST_DATA  # a new L2 table, and no data cluster
    assert [ondisk.l2_entry(path, i * CS) for i in range(3)] == [1, 1, 0]
    assert os.path.getsize(path) == FIRST_DATA + TS * CS
    assert _map(path)[0] == {
        "start": 0, "length": 2 * CS, "depth": 0, "present": True, "zero": True, "data": False,
    }  # fmt: skip
    _check_clean(path)
    # Byte for byte what qemu-io makes of the same request.
    twin = _twin(tmp_path, "twin.qed")
    qemu_io(twin, "write -z 0 128k")
    assert Path(path).read_bytes() == Path(twin).read_bytes()


@pytest.mark.interop
def test_allocated_clusters_are_zeroed_in_place(tmp_path, ondisk) -> None:
    path = str(tmp_path / "img.qed")
    create_image(path, 10 * MiB, cluster_size=CS, table_size=TS)
    with QedImage.open(path) as image:
        image.write(0, b"\x77" * 2 * CS)
    host = ondisk.l2_entry(path, 0)
    assert (host, ondisk.l2_entry(path, CS)) == (FIRST_DATA, FIRST_DATA + CS)
    length = os.path.getsize(path)

    with QedImage.open(path) as image:
        image.write_zeroes(0, 2 * CS)
        assert image.read(0, 2 * CS) == bytes(2 * CS)

    assert (ondisk.l2_entry(path, 0), ondisk.l2_entry(path, CS)) == (host, host + CS)
    assert os.path.getsize(path) == length
    with open(path, "rb") as f:
        f.seek(host)
        assert f.read(2 * CS) == bytes(2 * CS)
    extent = _map(path)[0]
    assert (extent["data"], extent["offset"], extent["length"]) == (True, host, 2 * CS)
    _check_clean(path)
    twin = _twin(tmp_path, "twin.qed")
    qemu_io(twin, "write -P 0x77 0 128k", "write -z 0 128k")
    assert Path(path).read_bytes() == Path(twin).read_bytes()


@pytest.mark.interop
@pytest.mark.parametrize(
    ("offset", "length", "kinds"),
    [
        (4 * KiB, 8 * KiB, ["data", "unallocated", "unallocated"]),
        (CS // 2, 2 * CS, ["data", "zero", "data"]),
        (CS, CS + 512, ["unallocated", "zero", "data"]),
    ],
)
def test_partial_clusters_are_written_as_data(tmp_path, ondisk, offset, length, kinds) -> None:
    path = str(tmp_path / "img.qed")
    create_image(path, 10 * MiB, cluster_size=CS, table_size=TS)
    with QedImage.open(path) as image:
        image.write_zeroes(offset, length)
        assert image.read(0, 4 * CS) == bytes(4 * CS)

    def kind(entry: int | None) -> str:
        return {None: "unallocated", 0: "unallocated", 1: "zero"}.get(entry, "data")

    got = [kind(ondisk.l2_entry(path, i * CS)) for i in range(3)]
    assert got == kinds
    for i in range(3):
        entry = ondisk.l2_entry(path, i * CS)
        if got[i] == "data":
            assert entry is not None and entry % CS == 0 and entry >= FIRST_DATA
    _check_clean(path)
    twin = _twin(tmp_path, "twin.qed")
    qemu_io(twin, f"write -z {offset} {length}")
    assert Path(path).read_bytes() == Path(twin).read_bytes()


def test_zeroing_zero_clusters_writes_nothing(tmp_path, recorder) -> None:
    path = str(tmp_path / "img.qed")
    create_image(path, 10 * MiB, cluster_size=CS, table_size=TS)
    with QedImage.open(path) as image:
        image.write_zeroes(0, 4 * CS)
    before = Path(path).read_bytes()
    rec = recorder(path)
    image = QedImage(rec.as_storage(), path)
    image.write_zeroes(CS, 2 * CS)
    assert rec.events == []
    image.close()
    assert Path(path).read_bytes() == before


@pytest.mark.interop
def test_zeroed_range_hides_the_backing_file(tmp_path, ondisk) -> None:
    base = tmp_path / "base.raw"
    base.write_bytes(b"\xbb" * MiB)
    path = str(tmp_path / "img.qed")
    create_image(path, 2 * MiB, cluster_size=CS, table_size=TS, backing_file="base.raw", backing_format="raw")
    expected = bytearray(b"\xbb" * MiB + bytes(MiB))
    with QedImage.open(path) as image:
        image.write_zeroes(0, 2 * CS)  # aligned: zero entries
        image.write_zeroes(3 * CS + 100, CS + 200)  # unaligned: data clusters holding zeros
        image.write_zeroes(8 * CS, 2 * CS + 4 * KiB)  # aligned head, partial tail
        for pos, n in ((0, 2 * CS), (3 * CS + 100, CS + 200), (8 * CS, 2 * CS + 4 * KiB)):
            expected[pos : pos + n] = bytes(n)
        # A partial write into a zero cluster: the rest of it stays zero (QEMU would copy
        # the backing file there, qed.md §4.6; we do not).
        image.write(CS + 512, b"\x11" * 512)
        expected[CS + 512 : CS + 1024] = b"\x11" * 512
        assert image.read(0, 2 * MiB) == expected
    assert [ondisk.l2_entry(path, i * CS) for i in (0, 8, 9)] == [1, 1, 1]
    assert ondisk.l2_entry(path, CS) not in (0, 1)
    with QedImage.open(path, read_only=True) as image:
        assert image.read(0, 2 * MiB) == expected
    _check_clean(path)
    assert _qemu_raw(path, tmp_path) == expected
