"""Every geometry QED allows: cluster sizes 4 KiB..64 MiB x table sizes 1..16.

Our engine must create, write, read back and reopen all of them — including the ones
QEMU cannot open (table size 1, and large clusters where QEMU's maximum size overflows
to 0, qed.md §1.3). Where QEMU can open the image, ``qemu-img check`` must pass and
``qemu-img convert`` must read the same bytes.

Files are sparse, but an allocating write really writes one whole data cluster and one
whole new L2 table (cluster_size * table_size bytes) — as QEMU does. Cases where that
exceeds :data:`DEFAULT_WRITE_BUDGET` run only with the ``slow`` marker; their create,
read and reopen still run by default.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
from helpers import qemu_img

from qednbd.qed.format import qemu_can_open, qemu_max_image_size
from qednbd.qed.image import QedImage, create_image

KiB, MiB = 1 << 10, 1 << 20
CLUSTER_SIZES = [1 << bits for bits in range(12, 27)]
TABLE_SIZES = [1, 2, 4, 8, 16]
IMAGE_SIZE = 1 * MiB
DEFAULT_WRITE_BUDGET = 128 * MiB  # bytes one allocation may write in the default run


def _id(cs: int, ts: int) -> str:
    return f"cs{cs // KiB}K-ts{ts}"


def _allocation_bytes(cs: int, ts: int) -> int:
    """What the first allocating write costs on disk: a data cluster and a new L2 table."""
    return cs + cs * ts


def _cases(marks_if_costly: bool) -> list[object]:
    out: list[object] = []
    for cs in CLUSTER_SIZES:
        for ts in TABLE_SIZES:
            marks = []
            if marks_if_costly and _allocation_bytes(cs, ts) > DEFAULT_WRITE_BUDGET:
                marks.append(pytest.mark.slow)
            out.append(pytest.param(cs, ts, id=_id(cs, ts), marks=marks))
    return out


@pytest.fixture
def image_path(tmp_path: Path):
    """A path whose file is removed afterwards: some of these are gigabytes long (sparse)."""
    path = tmp_path / "img.qed"
    yield str(path)
    for p in tmp_path.iterdir():
        p.unlink()


def _qemu_agrees(path: str, expected: bytes, tmp_path: Path) -> None:
    check = qemu_img("check", "-f", "qed", path, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    raw = tmp_path / "out.raw"
    qemu_img("convert", "-f", "qed", "-O", "raw", path, str(raw))
    try:
        assert raw.read_bytes() == expected, "qemu-img convert reads different bytes"
    finally:
        raw.unlink()


@pytest.mark.interop
@pytest.mark.parametrize(("cs", "ts"), _cases(marks_if_costly=True))
def test_create_write_read_reopen(cs: int, ts: int, image_path: str, tmp_path: Path) -> None:
    create_image(image_path, IMAGE_SIZE, cluster_size=cs, table_size=ts)
    assert os.path.getsize(image_path) == (1 + ts) * cs
    assert os.stat(image_path).st_blocks * 512 <= 64 * KiB, "create wrote more than the header"

    rng = random.Random(cs * 31 + ts)
    model = bytearray(IMAGE_SIZE)
    straddle = cs - 100 if cs < IMAGE_SIZE else 7  # across a cluster boundary where there is one
    writes = [(0, 4 * KiB), (300_000, 5000), (IMAGE_SIZE - 512, 512), (straddle, 300)]
    with QedImage.open(image_path) as image:
        assert image.size == IMAGE_SIZE
        assert image.read(0, IMAGE_SIZE) == model
        for pos, n in writes:
            data = rng.randbytes(n)
            image.write(pos, data)
            model[pos : pos + n] = data
        assert image.read(0, IMAGE_SIZE) == model

    with QedImage.open(image_path) as image:
        assert image.read(0, IMAGE_SIZE) == model
        image.write(4096, b"\x5a" * 4096)  # in place, or a new cluster at small sizes
        model[4096:8192] = b"\x5a" * 4096
        image.write_zeroes(299_000, 3000)
        model[299_000:302_000] = bytes(3000)
        assert image.read(0, IMAGE_SIZE) == model

    with QedImage.open(image_path, read_only=True) as image:
        assert image.read(0, IMAGE_SIZE) == model
        extents = image.block_status(0, IMAGE_SIZE)
        assert sum(e.length for e in extents) == IMAGE_SIZE

    with open(image_path, "rb") as f:
        assert int.from_bytes(f.read(24)[16:24], "little") == 0, "NEED_CHECK left set"
    if qemu_can_open(cs, ts, IMAGE_SIZE):
        _qemu_agrees(image_path, bytes(model), tmp_path)


@pytest.mark.parametrize(("cs", "ts"), _cases(marks_if_costly=False))
def test_zero_size_images(cs: int, ts: int, image_path: str) -> None:
    create_image(image_path, 0, cluster_size=cs, table_size=ts)
    assert os.path.getsize(image_path) == (1 + ts) * cs
    with QedImage.open(image_path) as image:
        assert image.size == 0
        assert image.read(0, 0) == b""
        assert image.block_status(0, 0) == []
        image.resize(64 * KiB)  # and it can grow
    with QedImage.open(image_path, read_only=True) as image:
        assert image.size == 64 * KiB
        assert image.read(0, 64 * KiB) == bytes(64 * KiB)


@pytest.mark.interop
@pytest.mark.parametrize(("cs", "ts"), _cases(marks_if_costly=True))
def test_zero_size_images_with_qemu(cs: int, ts: int, image_path: str, tmp_path: Path) -> None:
    """Size 0 is the only size QEMU accepts for its overflowing geometries.

    (QEMU's create writes the whole L1 table and its check reads it, hence the budget.)
    """
    create_image(image_path, 0, cluster_size=cs, table_size=ts)
    # qemu-img create makes the same file: same length, same header cluster.
    twin = str(tmp_path / "twin.qed")
    qemu_img("create", "-f", "qed", "-o", f"cluster_size={cs},table_size={ts}", twin, "0")
    assert os.path.getsize(twin) == os.path.getsize(image_path)
    with open(image_path, "rb") as ours, open(twin, "rb") as theirs:
        head = min(cs, MiB)
        assert ours.read(head) == theirs.read(head)
    if qemu_can_open(cs, ts, 0):
        _qemu_agrees(image_path, b"", tmp_path)
    else:
        assert ts == 1
        out = qemu_img("check", "-f", "qed", image_path, check=False)
        assert out.returncode != 0 and "QED table offset is invalid" in out.stderr


@pytest.mark.interop
@pytest.mark.parametrize(
    ("cs", "ts"),
    [
        pytest.param(c, t, id=_id(c, t))
        for c in CLUSTER_SIZES
        for t in TABLE_SIZES
        if qemu_max_image_size(c, t) >= IMAGE_SIZE
    ],
)
def test_qemu_img_create_matches_at_1m(cs: int, ts: int, image_path: str, tmp_path: Path) -> None:
    """Where QEMU creates a 1 MiB image, ours is byte-identical (recipe R1)."""
    twin = str(tmp_path / "twin.qed")
    qemu_img("create", "-f", "qed", "-o", f"cluster_size={cs},table_size={ts}", twin, "1M")
    create_image(image_path, IMAGE_SIZE, cluster_size=cs, table_size=ts)
    assert Path(image_path).read_bytes() == Path(twin).read_bytes()


# --------------------------------------------------------------------------------------
# boundaries that small images never reach


def _qemu_window(path: str, tmp_path: Path, pos: int, length: int) -> bytes:
    """Guest bytes [pos, pos+length) as QEMU reads them (convert to a sparse raw file)."""
    raw = tmp_path / "window.raw"
    qemu_img("convert", "-f", "qed", "-O", "raw", path, str(raw))
    try:
        with open(raw, "rb") as f:
            f.seek(pos)
            return f.read(length)
    finally:
        raw.unlink()


@pytest.mark.interop
def test_l2_cache_page_boundaries(image_path: str, tmp_path: Path) -> None:
    """64K/16: a 1 MiB L2 table is cached in 256 KiB pages; page n starts at guest n*2 GiB.

    Allocations, in-place writes, zero writes and contiguous runs that cross a page
    boundary must land where QEMU (which has no pages) expects them.
    """
    cs, gib = 64 * KiB, 1 << 30
    size = 6 * gib
    create_image(image_path, size, cluster_size=cs, table_size=16)
    windows = {2 * gib: bytearray(16 * cs), 4 * gib: bytearray(16 * cs)}  # 8 clusters either side

    def put(pos: int, data: bytes) -> None:
        for base, buf in windows.items():
            lo = base - 8 * cs
            if lo <= pos and pos + len(data) <= lo + len(buf):
                buf[pos - lo : pos - lo + len(data)] = data
                return
        raise AssertionError("outside the windows")

    rng = random.Random(7)
    ops: list[tuple[str, int, int]] = [
        ("write", 2 * gib - cs, cs),  # new L2 table, entry at the end of page 0
        ("write", 2 * gib, 2 * cs),  # allocation at the start of page 1
        ("write", 2 * gib - 2 * cs - 100, 3 * cs),  # alloc + in place across the boundary
        ("write", 4 * gib - cs, 2 * cs),  # one allocation straddling pages 1 and 2
        ("zero", 2 * gib - 4 * cs, 8 * cs),  # zero entries and in-place zeros, both pages
        ("write", 4 * gib - 3 * cs + 5, 6 * cs),  # allocation around an allocated run
        ("zero", 4 * gib - 6 * cs, 2 * cs),  # zero entries in page 1 only
    ]
    with QedImage.open(image_path) as image:
        for op, pos, n in ops:
            if op == "write":
                data = rng.randbytes(n)
                image.write(pos, data)
                put(pos, data)
            else:
                image.write_zeroes(pos, n)
                put(pos, bytes(n))
        for base, buf in windows.items():
            assert image.read(base - 8 * cs, len(buf)) == buf
    with QedImage.open(image_path, read_only=True) as image:
        for base, buf in windows.items():
            assert image.read(base - 8 * cs, len(buf)) == buf
            extents = image.block_status(base - 8 * cs, len(buf))
            assert sum(e.length for e in extents) == len(buf)
    check = qemu_img("check", "-f", "qed", image_path, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    raw = tmp_path / "out.raw"
    qemu_img("convert", "-f", "qed", "-O", "raw", image_path, str(raw))
    try:
        with open(raw, "rb") as f:
            for base, buf in windows.items():
                f.seek(base - 8 * cs)
                assert f.read(len(buf)) == buf, f"QEMU reads other bytes around {base:#x}"
    finally:
        raw.unlink()


@pytest.mark.interop
def test_growing_past_the_cached_l1_prefix(image_path: str, tmp_path: Path) -> None:
    """4K/2: L1 is held 64 entries (256 MiB) at a time; a resize must make more addressable."""
    cs = 4 * KiB
    create_image(image_path, 1 * MiB, cluster_size=cs, table_size=2)
    with QedImage.open(image_path) as image:
        image.write(0, b"\x01" * cs)
        image.resize(512 * MiB)
        image.write(400 * MiB, b"\x02" * 3 * cs)  # L1 index 100
        image.write_zeroes(300 * MiB, 8 * cs)
        assert image.read(400 * MiB - cs, 5 * cs) == bytes(cs) + b"\x02" * 3 * cs + bytes(cs)
    with QedImage.open(image_path) as image:
        assert image.size == 512 * MiB
        assert image.read(0, cs) == b"\x01" * cs
        assert image.read(400 * MiB, 3 * cs) == b"\x02" * 3 * cs
        image.write(511 * MiB, b"\x03" * cs)  # L1 index 127, the last
    check = qemu_img("check", "-f", "qed", image_path, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    assert _qemu_window(image_path, tmp_path, 400 * MiB - cs, 5 * cs) == (
        bytes(cs) + b"\x02" * 3 * cs + bytes(cs)
    )
    assert _qemu_window(image_path, tmp_path, 511 * MiB, cs) == b"\x03" * cs


@pytest.mark.interop
@pytest.mark.parametrize("cs", [2 * MiB, 4 * MiB], ids=["cs2M", "cs4M"])
def test_large_cluster_copy_on_write_from_backing(cs: int, image_path: str, tmp_path: Path) -> None:
    """Allocations over 1 MiB copy the backing file in chunks; the bytes must still be right."""
    backing = random.Random(cs).randbytes(3 * MiB + 1000)  # ends mid-sector
    (tmp_path / "base.raw").write_bytes(backing)
    size = 4 * cs
    create_image(
        image_path, size, cluster_size=cs, table_size=2, backing_file="base.raw", backing_format="raw"
    )
    model = bytearray(backing[:size] + bytes(size - len(backing)))
    with QedImage.open(image_path) as image:
        for pos, n in ((cs // 2 + 300, 1000), (3 * cs + 17, 5000), (cs // 4, 100)):
            data = random.Random(pos).randbytes(n)
            image.write(pos, data)
            model[pos : pos + n] = data
        assert image.read(0, size) == model
    with QedImage.open(image_path, read_only=True) as image:
        assert image.read(0, size) == model
    _qemu_agrees(image_path, bytes(model), tmp_path)
