"""Malformed and hostile images: a clear error, bounded memory and time, and nothing lost.

The images here are built byte by byte (no QEMU tools), so every offset is known:

* hostile headers fail ``QedImage.open`` with a typed error and leak no file descriptor;
* table entries that point past the end of the file, off a cluster boundary or into the
  header fail exactly the reads that follow them, with ``EIO``, while every other cluster
  still reads; nothing is written while failing; ``qednbd convert`` stops with one line;
* ``qednbd info``/``map``/``convert`` on hostile images finish under a 512 MiB address-space
  limit and a timeout, with status 0 or 1 and never a traceback;
* the memory limit refuses an L1 table that would not fit, and the L2 cache never holds
  more pages than its capacity.
"""

from __future__ import annotations

import errno
import json
import os
import resource
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from helpers import digest, qednbd

from qednbd.errors import ImageError, InvalidImage, UnsupportedFeature
from qednbd.qed.image import QedImage

KiB, MiB, GiB, TiB, PiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40, 1 << 50
MAGIC = 0x00444551
HEADER = struct.Struct("<IIIIQQQQQII")
ADDRESS_SPACE_LIMIT = 512 * MiB
BOUNDED_TIMEOUT = 30.0  # seconds; every command below needs well under a second or two


# -- building images by hand ------------------------------------------------------------


@dataclass
class Layout:
    """A QED image described by its parts; :meth:`write` lays them out at the stated offsets."""

    image_size: int
    cluster_size: int = 65536
    table_size: int = 4
    header_size: int = 1
    features: int = 0
    l1_offset: int | None = None  # default: right after the header clusters
    l1: dict[int, int] = field(default_factory=dict)  # index -> L2 table offset
    l2: dict[int, dict[int, int]] = field(default_factory=dict)  # table offset -> {index: entry}
    data: dict[int, bytes] = field(default_factory=dict)  # host offset -> bytes
    length: int | None = None  # file length; default: end of the last thing written

    @property
    def table_bytes(self) -> int:
        return self.cluster_size * self.table_size

    def write(self, path: Path) -> Path:
        cs = self.cluster_size
        l1_offset = self.header_size * cs if self.l1_offset is None else self.l1_offset
        end = l1_offset + self.table_bytes
        with open(path, "wb") as f:
            f.write(
                HEADER.pack(
                    MAGIC,
                    cs,
                    self.table_size,
                    self.header_size,
                    self.features,
                    0,
                    0,
                    l1_offset,
                    self.image_size,
                    0,
                    0,
                )
            )
            for index, value in self.l1.items():
                f.seek(l1_offset + 8 * index)
                f.write(struct.pack("<Q", value))
            for table, entries in self.l2.items():
                for index, value in entries.items():
                    f.seek(table + 8 * index)
                    f.write(struct.pack("<Q", value))
                end = max(end, table + self.table_bytes)
            for offset, payload in self.data.items():
                f.seek(offset)
                f.write(payload)
                end = max(end, offset + -(-len(payload) // cs) * cs)
            f.truncate(end if self.length is None else self.length)
        return path


def fill(byte: int, n: int = 65536) -> bytes:
    return bytes([byte]) * n


def three_clusters(**changes: object) -> Layout:
    """10 MiB, 64K/4: L1 at 0x10000, L2 at 0x50000, data 0x11/0x22/0x33 in guest clusters 0-2
    at host 0x90000/0xa0000/0xb0000; the file ends at 0xc0000."""
    layout = Layout(
        image_size=10 * MiB,
        l1={0: 0x50000},
        l2={0x50000: {0: 0x90000, 1: 0xA0000, 2: 0xB0000}},
        data={0x90000: fill(0x11), 0xA0000: fill(0x22), 0xB0000: fill(0x33)},
    )
    for key, value in changes.items():
        setattr(layout, key, value)
    return layout


def bad_l2_entry(value: int, **changes: object) -> Layout:
    """:func:`three_clusters` with guest cluster 1's L2 entry replaced by ``value``."""
    return three_clusters(l2={0x50000: {0: 0x90000, 1: value, 2: 0xB0000}}, **changes)


def l2_entry_into_header() -> Layout:
    """header_size 2: a cluster-aligned entry below 0x20000 points into the header."""
    return Layout(
        image_size=10 * MiB,
        header_size=2,
        l1={0: 0x60000},
        l2={0x60000: {0: 0xA0000, 1: 0x10000, 2: 0xC0000}},
        data={0xA0000: fill(0x11), 0xB0000: fill(0x22), 0xC0000: fill(0x33)},
    )


BAD_L2_ENTRIES: dict[str, Callable[[], Layout]] = {
    "past-eof": lambda: bad_l2_entry(0x400000),
    "at-eof": lambda: bad_l2_entry(0xC0000),
    "into-partial-tail-cluster": lambda: bad_l2_entry(0xC0000, length=0xC0000 + 1000),
    "unaligned": lambda: bad_l2_entry(0xA0200),
    "all-ones": lambda: bad_l2_entry(2**64 - 1),
    "into-header": l2_entry_into_header,
}


def two_regions(l1_entry0: int, header_size: int = 1) -> Layout:
    """4 GiB, 64K/4 (one L2 table covers 2 GiB): L1[0] = ``l1_entry0``; L1[1] -> a valid L2
    table right after L1 whose first entry maps guest 2 GiB to a cluster of 0x44 after it.
    With header_size 1: L1 at 0x10000, L2 at 0x50000, data at 0x90000, end of file 0xa0000."""
    cs = 65536
    l2 = (header_size + 4) * cs
    data = l2 + 4 * cs
    return Layout(
        image_size=4 * GiB,
        header_size=header_size,
        l1={0: l1_entry0, 1: l2},
        l2={l2: {0: data}},
        data={data: fill(0x44)},
    )


BAD_L1_ENTRIES: dict[str, Callable[[], Layout]] = {
    "l2-past-eof": lambda: two_regions(0x4000000),
    "l2-last-cluster-past-eof": lambda: two_regions(0x70000),  # clusters 0x70000..0xa0000
    "l2-unaligned": lambda: two_regions(0x50100),
    "l2-in-header": lambda: two_regions(0x10000, header_size=2),
    "l2-all-ones": lambda: two_regions(2**64 - 1),
}


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


# -- running qednbd under limits --------------------------------------------------------


def _limit_address_space() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE_LIMIT, ADDRESS_SPACE_LIMIT))


def qednbd_bounded(
    *args: str | Path | int, timeout: float = BOUNDED_TIMEOUT
) -> subprocess.CompletedProcess[str]:
    """``python -m qednbd ARGS`` with a 512 MiB address-space limit; fails the test on timeout."""
    try:
        return qednbd(*args, timeout=timeout, preexec_fn=_limit_address_space)
    except subprocess.TimeoutExpired:
        pytest.fail(f"did not finish within {timeout} s: qednbd {' '.join(map(str, args))}")


def test_address_space_limit_is_in_force():
    """The harness itself: a child under the limit cannot allocate 1 GiB (so the bound is real)."""
    proc = subprocess.run(
        [sys.executable, "-c", "bytearray(1 << 30)"],
        capture_output=True,
        text=True,
        timeout=BOUNDED_TIMEOUT,
        preexec_fn=_limit_address_space,
        check=False,
    )
    assert proc.returncode != 0
    assert "MemoryError" in proc.stderr


def assert_orderly(proc: subprocess.CompletedProcess[str]) -> None:
    """Status 0, or status 1 with exactly one line on stderr; never a traceback."""
    output = proc.stdout + proc.stderr
    assert "Traceback" not in output, output
    assert "internal error" not in proc.stderr, proc.stderr
    assert proc.returncode in (0, 1), (proc.args, proc.returncode, proc.stderr)
    if proc.returncode == 1:
        assert len(proc.stderr.splitlines()) == 1, proc.stderr


def assert_one_line_failure(proc: subprocess.CompletedProcess[str], path: Path) -> str:
    assert_orderly(proc)
    assert proc.returncode == 1, (proc.args, proc.stdout, proc.stderr)
    line = proc.stderr.rstrip("\n")
    assert line.startswith(f"qednbd: {path}: "), line
    return line


# -- hostile headers through the API -----------------------------------------------------


def header_poke(offset: int, fmt: str, value: int) -> Callable[[Path], None]:
    def mutate(path: Path) -> None:
        with open(path, "r+b") as f:
            f.seek(offset)
            f.write(struct.pack("<" + fmt, value))

    return mutate


HOSTILE_HEADERS: list[tuple[str, Callable[[Path], None], type[ImageError], str]] = [
    ("magic", header_poke(0, "I", 0xFFFFFFFF), InvalidImage, "Image not in QED format"),
    ("cluster-size", header_poke(4, "I", 0xFFFFFFFF), InvalidImage, "QED cluster size is invalid"),
    ("table-size", header_poke(8, "I", 0xFFFFFFFF), InvalidImage, "QED table size is invalid"),
    ("header-size", header_poke(12, "I", 0xFFFFFFFF), InvalidImage, "QED table offset is invalid"),
    ("unknown-feature", header_poke(16, "Q", 0x100), UnsupportedFeature, "Unsupported QED features: 100"),
    ("l1-offset", header_poke(40, "Q", 2**64 - 1), InvalidImage, "QED table offset is invalid"),
    ("image-size", header_poke(48, "Q", 2**64 - 1), InvalidImage, "QED image size is invalid"),
    ("image-size-2^63", header_poke(48, "Q", 2**63), InvalidImage, "QED image size is invalid"),
    ("truncated-512", lambda p: os.truncate(p, 512), InvalidImage, "QED table offset is invalid"),
    ("truncated-0", lambda p: os.truncate(p, 0), InvalidImage, "Image not in QED format"),
    ("truncated-63", lambda p: os.truncate(p, 63), InvalidImage, "QED table offset is invalid"),
]


@pytest.mark.parametrize(
    "mutate, error, message", [h[1:] for h in HOSTILE_HEADERS], ids=[h[0] for h in HOSTILE_HEADERS]
)
@pytest.mark.parametrize("read_only", [True, False], ids=["ro", "rw"])
def test_hostile_header_fails_open_with_a_typed_error(mutate, error, message, read_only, tmp_path):
    path = three_clusters().write(tmp_path / "t.qed")
    mutate(path)
    before = digest(path)
    fds = open_fds()
    with pytest.raises(error) as info:
        QedImage.open(str(path), read_only=read_only)
    assert str(info.value) == message
    assert info.value.errno == (errno.ENOTSUP if error is UnsupportedFeature else errno.EINVAL)
    assert open_fds() == fds, "a failed open leaked a file descriptor"
    assert digest(path) == before


# -- bad table entries -------------------------------------------------------------------


def test_three_clusters_layout_is_valid(tmp_path):
    """The base of the bad-entry cases opens and reads back what it holds (a broken recipe
    would make every case below pass for the wrong reason)."""
    with QedImage.open(str(three_clusters().write(tmp_path / "t.qed")), read_only=True) as image:
        assert image.read(0, 3 * 65536) == fill(0x11) + fill(0x22) + fill(0x33)
    with QedImage.open(str(l2_entry_into_header().write(tmp_path / "h.qed")), read_only=True) as image:
        assert image.read(0, 65536) == fill(0x11)
        assert image.read(2 * 65536, 65536) == fill(0x33)
    with QedImage.open(str(two_regions(0).write(tmp_path / "r.qed")), read_only=True) as image:
        assert image.read(2 * GiB, 65536) == fill(0x44)
        assert image.read(0, 65536) == bytes(65536)


@pytest.mark.parametrize("case", list(BAD_L2_ENTRIES), ids=list(BAD_L2_ENTRIES))
@pytest.mark.parametrize("read_only", [True, False], ids=["ro", "rw"])
def test_bad_l2_entry_fails_only_its_cluster_with_eio(case, read_only, tmp_path):
    path = BAD_L2_ENTRIES[case]().write(tmp_path / "t.qed")
    before = digest(path)
    with QedImage.open(str(path), read_only=read_only) as image:
        for pos, length in ((65536, 65536), (65536 + 4096, 512), (0, 3 * 65536), (65536 - 512, 1024)):
            with pytest.raises(ImageError) as info:
                image.read(pos, length)
            assert info.value.errno == errno.EIO, info.value
        # the failure is not cached as a success, and the neighbours still read
        with pytest.raises(ImageError):
            image.read(65536, 512)
        assert image.read(0, 65536) == fill(0x11)
        assert image.read(2 * 65536, 65536) == fill(0x33)
        assert image.read(3 * 65536, 65536) == bytes(65536)
        if not read_only:
            with pytest.raises(ImageError) as info:
                image.write(65536, b"\xee" * 512)
            assert info.value.errno == errno.EIO
    assert digest(path) == before, "failing reads (or a failed write) changed the image"


@pytest.mark.parametrize("case", list(BAD_L1_ENTRIES), ids=list(BAD_L1_ENTRIES))
def test_bad_l1_entry_fails_only_its_region_with_eio(case, tmp_path):
    path = BAD_L1_ENTRIES[case]().write(tmp_path / "t.qed")
    before = digest(path)
    with QedImage.open(str(path)) as image:
        for pos in (0, 65536, 2 * GiB - 512):
            with pytest.raises(ImageError) as info:
                image.read(pos, 512)
            assert info.value.errno == errno.EIO, info.value
        with pytest.raises(ImageError) as info:
            image.write(4096, b"\xee" * 512)
        assert info.value.errno == errno.EIO
        assert image.read(2 * GiB, 65536) == fill(0x44)
        assert image.read(2 * GiB + 65536, 65536) == bytes(65536)
    assert digest(path) == before


@pytest.mark.parametrize("case", ["past-eof", "unaligned", "into-header"])
def test_convert_of_a_bad_entry_fails_with_one_line_and_leaves_no_output(case, tmp_path):
    path = BAD_L2_ENTRIES[case]().write(tmp_path / "t.qed")
    before = digest(path)
    for out_format in ("raw", "qed"):
        out = tmp_path / f"out.{out_format}"
        proc = qednbd_bounded("convert", "-O", out_format, path, out)
        assert_one_line_failure(proc, path)
        assert not out.exists(), "a failed convert left a partial output behind"
    assert digest(path) == before


# -- bounded memory and time -------------------------------------------------------------


def sparse_world(image_size: int, cluster_size: int, table_size: int) -> Layout:
    """A fresh (empty) image of the given geometry; the L1 table stays a sparse hole."""
    return Layout(image_size=image_size, cluster_size=cluster_size, table_size=table_size)


def one_tib_scattered() -> Layout:
    """1 TiB, 64K/4: data in three L2 regions (first, middle and last cluster of the image)."""
    last = TiB - 65536
    return Layout(
        image_size=TiB,
        l1={0: 0x50000, 250: 0x90000, 511: 0xD0000},
        l2={
            0x50000: {0: 0x110000},
            0x90000: {0: 0x120000},
            0xD0000: {(last >> 16) & 32767: 0x130000},
        },
        data={0x110000: fill(0xA1), 0x120000: fill(0xB2), 0x130000: fill(0xC3)},
    )


HOSTILE_IMAGES: dict[str, Callable[[], Layout]] = {
    "l1-to-l2-past-eof": BAD_L1_ENTRIES["l2-past-eof"],
    "l1-to-l2-all-ones": BAD_L1_ENTRIES["l2-all-ones"],
    "l2-entry-past-eof": BAD_L2_ENTRIES["past-eof"],
    "l2-entry-unaligned": BAD_L2_ENTRIES["unaligned"],
    "l2-entry-into-header": BAD_L2_ENTRIES["into-header"],
    "64M-clusters-image-size-2^62": lambda: sparse_world(2**62, 64 * MiB, 16),
    "64M-clusters-largest-image-size": lambda: sparse_world(2**63 - GiB, 64 * MiB, 16),
    "64M-clusters-image-size-2^63": lambda: sparse_world(2**63, 64 * MiB, 16),
    "64K-16-one-PiB": lambda: sparse_world(PiB, 65536, 16),
    "one-TiB-scattered": one_tib_scattered,
    "truncated-512": lambda: Layout(image_size=MiB, length=512),
}


@pytest.mark.parametrize("case", list(HOSTILE_IMAGES), ids=list(HOSTILE_IMAGES))
def test_commands_on_hostile_images_are_bounded(case, tmp_path):
    path = HOSTILE_IMAGES[case]().write(tmp_path / "t.qed")
    before = digest(path)
    for args in (
        ("info", path),
        ("info", "--output=json", path),
        ("map", "--output=json", path),
        ("convert", "-O", "raw", path, tmp_path / "out.raw"),
    ):
        start = time.monotonic()
        proc = qednbd_bounded(*args)
        assert_orderly(proc)
        assert time.monotonic() - start < BOUNDED_TIMEOUT
    assert digest(path) == before


def test_one_tib_image_maps_and_converts_quickly(tmp_path):
    path = one_tib_scattered().write(tmp_path / "t.qed")
    start = time.monotonic()
    proc = qednbd_bounded("map", "--output=json", path, timeout=10)
    assert time.monotonic() - start < 10
    assert proc.returncode == 0, proc.stderr
    data = [(e["start"], e["length"], e["offset"]) for e in json.loads(proc.stdout) if e["data"]]
    assert data == [(0, 65536, 0x110000), (250 * 2 * GiB, 65536, 0x120000), (TiB - 65536, 65536, 0x130000)]
    assert sum(e["length"] for e in json.loads(proc.stdout)) == TiB

    out = tmp_path / "out.raw"
    proc = qednbd_bounded("convert", "-O", "raw", path, out, timeout=20)
    assert proc.returncode == 0, proc.stderr
    assert out.stat().st_size == TiB
    with open(out, "rb") as f:
        for pos, byte in ((0, 0xA1), (250 * 2 * GiB, 0xB2), (TiB - 65536, 0xC3)):
            f.seek(pos)
            assert f.read(65536) == fill(byte)
        f.seek(65536)
        assert f.read(65536) == bytes(65536)
    assert out.stat().st_blocks * 512 < 16 * MiB, "the raw output is not sparse"


def test_huge_image_with_64m_clusters_opens_in_bounded_memory(tmp_path):
    """2^62 bytes at 64 MiB clusters: the L1 held in memory covers only the addressable
    prefix, so opening and mapping cost kilobytes, not the 1 GiB the header describes."""
    path = sparse_world(2**62, 64 * MiB, 16).write(tmp_path / "t.qed")
    with QedImage.open(str(path), read_only=True, memory_limit=4 * MiB) as image:
        assert image.size == 2**62
        assert image.read(2**62 - 4096, 4096) == bytes(4096)
        assert len(image.l1) * 8 <= 64 * KiB
    proc = qednbd_bounded("map", "--output=json", path, timeout=10)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == [
        {"start": 0, "length": 2**62, "depth": 0, "present": False, "zero": True, "data": False}
    ]


def test_memory_limit_refuses_an_l1_that_does_not_fit(tmp_path):
    """64K/16 at 1 PiB needs 131072 L1 entries (1 MiB)."""
    path = sparse_world(PiB, 65536, 16).write(tmp_path / "t.qed")
    fds = open_fds()
    for read_only in (True, False):
        with pytest.raises(InvalidImage) as info:
            QedImage.open(str(path), read_only=read_only, memory_limit=512 * KiB)
        assert "memory limit" in str(info.value)
        assert "\n" not in str(info.value)
    assert open_fds() == fds
    with QedImage.open(str(path), read_only=True, memory_limit=2 * MiB) as image:
        assert image.size == PiB
        assert image.l2.capacity >= 1
        assert image.read(PiB - 512, 512) == bytes(512)


def many_l2_tables(n_tables: int) -> Layout:
    """4K/2 (one 8 KiB L2 table covers 4 MiB): table i maps guest cluster 0 of its region,
    and entry 1000 for odd i, to data clusters filled with byte i+1 (and 0x80|i)."""
    cs = 4096
    layout = Layout(image_size=n_tables * 4 * MiB, cluster_size=cs, table_size=2)
    host = 3 * cs
    for i in range(n_tables):
        layout.l1[i] = host
        entries = {0: host + 2 * cs}
        layout.data[host + 2 * cs] = fill(i + 1, cs)
        if i % 2:
            entries[1000] = host + 3 * cs
            layout.data[host + 3 * cs] = fill(0x80 | i, cs)
        layout.l2[host] = entries
        host += 4 * cs
    return layout


def test_l2_cache_stays_within_capacity(tmp_path):
    n_tables = 48
    path = many_l2_tables(n_tables).write(tmp_path / "t.qed")
    table_bytes = 8192
    l1_bytes = 512
    with QedImage.open(str(path), read_only=True, memory_limit=l1_bytes + 5 * table_bytes) as image:
        capacity = image.l2.capacity
        assert 1 <= capacity < n_tables // 4, "the limit did not make the cache smaller than the working set"
        order = list(range(n_tables)) + list(reversed(range(n_tables))) + list(range(0, n_tables, 3))
        for i in order:
            base = i * 4 * MiB
            assert image.read(base, 4096) == fill(i + 1, 4096), i
            if i % 2:
                assert image.read(base + 1000 * 4096, 4096) == fill(0x80 | i, 4096), i
            assert image.read(base + 4096, 512) == bytes(512)
            assert len(image.l2._pages) <= capacity
            image.block_status(base, 4 * MiB)
            assert len(image.l2._pages) <= capacity
        # one read spanning every region at once
        whole = image.read(0, n_tables * 4 * MiB)
        assert len(image.l2._pages) <= capacity
        for i in range(n_tables):
            assert whole[i * 4 * MiB : i * 4 * MiB + 4096] == fill(i + 1, 4096)


def test_l2_cache_stays_within_capacity_while_writing(tmp_path):
    n_tables = 24
    path = many_l2_tables(n_tables).write(tmp_path / "t.qed")
    with QedImage.open(str(path), memory_limit=512 + 3 * 8192) as image:
        capacity = image.l2.capacity
        assert capacity < n_tables
        for i in range(n_tables):
            # into an allocated cluster, a new cluster of an existing table, and a new table
            image.write(i * 4 * MiB + 100, b"\x5a" * 100)
            image.write(i * 4 * MiB + 8192, b"\x6b" * 4096)
            assert len(image.l2._pages) <= capacity
        image.resize(image.size + 64 * MiB)
        for i in range(n_tables, n_tables + 16):
            image.write(i * 4 * MiB, b"\x7c" * 4096)
            assert len(image.l2._pages) <= capacity
    with QedImage.open(str(path), read_only=True) as image:
        for i in range(n_tables):
            base = i * 4 * MiB
            assert image.read(base, 4096) == fill(i + 1, 100) + b"\x5a" * 100 + fill(i + 1, 4096 - 200)
            assert image.read(base + 8192, 4096) == b"\x6b" * 4096
        for i in range(n_tables, n_tables + 16):
            assert image.read(i * 4 * MiB, 4096) == b"\x7c" * 4096


def test_l2_cache_pages_a_large_table(tmp_path):
    """64K/16: one L2 table is 1 MiB, cached in pages; reads across one table's pages with a
    two-page budget stay within it."""
    cs = 65536
    entries_per_table = cs * 16 // 8  # 131072 -> one table covers 8 GiB
    picks = [0, 40000, 80000, 131071]
    layout = Layout(image_size=8 * GiB, cluster_size=cs, table_size=16, l1={0: 17 * cs})
    l2: dict[int, int] = {}
    for n, index in enumerate(picks):
        host = (33 + n) * cs
        l2[index] = host
        layout.data[host] = fill(0x10 + n)
    layout.l2[17 * cs] = l2
    path = layout.write(tmp_path / "t.qed")
    assert entries_per_table == 131072
    with QedImage.open(str(path), read_only=True, memory_limit=512 + 2 * 256 * KiB) as image:
        capacity = image.l2.capacity
        assert capacity <= 2
        for _ in range(3):
            for n, index in enumerate(picks):
                assert image.read(index * cs, cs) == fill(0x10 + n), index
                assert len(image.l2._pages) <= capacity
