"""R9 and qed.md §6: ``qednbd check`` counts what ``qemu-img check`` counts, prints it the same way.

Images are made with qemu-img/qemu-io and then damaged by poking table entries or appending
bytes. For every case both tools run on the same path; their stdout must be identical, byte
for byte, for ``--output=human`` and ``--output=json`` (which fixes the JSON key order and
the counters QEMU leaves out when they are 0), and so must the exit status.

Where QEMU is wrong we are not: its ``cluster_size - 1`` divisor makes it report leaks on a
clean image once the file has more than ``cluster_size - 1`` clusters, and it cannot open a
table_size 1 image at all. Those tests assert both tools' answers.
"""

from __future__ import annotations

import errno
import itertools
import json
import os
import shutil
import struct
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import qednbd, qemu_img, qemu_io, read_features, run
from hypothesis import given, settings
from hypothesis import strategies as st

from qednbd.errors import ImageError
from qednbd.qed.check import (
    MAX_FINDINGS,
    CheckReport,
    ClusterBitmap,
    Finding,
    FindingKind,
    check,
    report_human,
    report_json,
)
from qednbd.qed.image import QedImage
from qednbd.qed.storage import FileStorage

K, M, G = 1 << 10, 1 << 20, 1 << 30
F_NEED_CHECK = 0x2

# The base image of qed.md §6.3: 10M, 64K clusters, table_size 4, data at 0/64k/128k →
# L1 at 0x10000, L1[0] = 0x60000, L2[0..2] = 0x50000, 0xa0000, 0xb0000, file 0xc0000 long.
L1 = 0x10000
L2 = 0x60000
BASE_OPS = ("write -P 0x11 0 64k", "write -P 0x22 64k 64k", "write -P 0x33 128k 64k")


def poke(path: Path, offset: int, value: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack("<Q", value))


def append(path: Path, data: bytes) -> int:
    """Append ``data``; return the offset it landed at."""
    with open(path, "ab") as f:
        offset = f.tell()
        f.write(data)
    return offset


def make_qed(path: Path, size: str, *ops: str, cs: str | None = None, ts: int | None = None) -> Path:
    opts = [f"cluster_size={cs}"] if cs else []
    opts += [f"table_size={ts}"] if ts else []
    qemu_img("create", "-f", "qed", *(["-o", ",".join(opts)] if opts else []), path, size)
    if ops:
        out = qemu_io(path, *ops)
        assert "failed" not in out.stdout + out.stderr, out.stdout + out.stderr
    return path


@pytest.fixture(scope="module")
def base_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = make_qed(tmp_path_factory.mktemp("base") / "base.qed", "10M", *BASE_OPS)
    raw = path.read_bytes()
    assert len(raw) == 0xC0000
    assert struct.unpack_from("<Q", raw, L1) == (L2,)
    assert struct.unpack_from("<3Q", raw, L2) == (0x50000, 0xA0000, 0xB0000)
    return path


def l2_entry(i: int) -> int:
    return L2 + 8 * i


def l1_entry(i: int) -> int:
    return L1 + 8 * i


def _second_table(path: Path) -> None:
    """A copy of L2 appended at the end and hung under L1[1]: its three entries are duplicates."""
    with open(path, "rb") as f:
        f.seek(L2)
        table = f.read(4 * 64 * K)
    poke(path, l1_entry(1), append(path, table))


Damage = Callable[[Path], None]


def junk(n_bytes: int) -> Damage:
    def apply(p: Path) -> None:
        append(p, b"\xaa" * n_bytes)

    return apply


def both(*damages: Damage) -> Damage:
    def apply(p: Path) -> None:
        for d in damages:
            d(p)

    return apply


def entry(offset: int, value: int) -> Damage:
    return lambda p: poke(p, offset, value)


# name → what to do to a copy of the base image. The comment is QEMU's verdict.
BASE_CASES: dict[str, Damage] = {
    "clean": lambda p: None,  # 3/160 allocated, 1 fragmented, rc 0
    "l2-past-eof": entry(l2_entry(3), 0x200000),  # 1 corruption, rc 2
    "l2-duplicate": entry(l2_entry(3), 0xA0000),
    "l2-unaligned": entry(l2_entry(3), 0xA0200),
    "l2-into-l1": entry(l2_entry(3), 0x10000),
    "l2-into-own-table": entry(l2_entry(3), 0x70000),
    "l2-into-header": entry(l2_entry(3), 0x0200),
    "l2-zero-cluster": entry(l2_entry(3), 1),  # not allocated, not an error
    "l2-last-entry": entry(l2_entry(4 * 64 * K // 8 - 1), 0xB0000),
    "l1-past-eof": entry(l1_entry(1), 0x400000),  # 1 corruption, allocated 3
    "l1-unaligned": entry(l1_entry(1), 0x60100),
    "l1-shared": entry(l1_entry(1), L2),  # 4 corruptions: one per table cluster
    "l1-into-l1": entry(l1_entry(1), L1),
    "l1-overlapping": entry(l1_entry(1), 0x80000),
    "l1-table-end-past-eof": entry(l1_entry(1), 0xA0000),
    "l1-last-entry-past-eof": entry(l1_entry(4 * 64 * K // 8 - 1), 0x400000),
    "second-table": _second_table,
    "leak": junk(64 * K),  # 1 leaked cluster, rc 3
    "leak-several": junk(3 * 64 * K),
    "leak-many": junk(40 * 64 * K),
    "partial-cluster": junk(1000),  # ignored (the file's length is rounded down), rc 0
    "corruption-and-leak": both(entry(l2_entry(3), 0x200000), junk(64 * K)),
    "orphaned-table": entry(l1_entry(0), 0),  # L2 and 3 data clusters leak
}


def assert_same_as_qemu(path: Path) -> dict[str, object]:
    """Both outputs and the exit status equal qemu-img check's; return the parsed JSON."""
    parsed: dict[str, object] = {}
    for output in ("human", "json"):
        ref = qemu_img("check", "-f", "qed", f"--output={output}", path, check=False)
        ours = qednbd("check", f"--output={output}", path)
        assert ours.stderr == "", ours.stderr
        assert ours.returncode == ref.returncode, (output, ref.stdout, ours.stdout)
        if output == "json":
            parsed = json.loads(ours.stdout)
            assert parsed == json.loads(ref.stdout)
        assert ours.stdout == ref.stdout, f"--output={output}:\n{ref.stdout}---\n{ours.stdout}"
    return parsed


@pytest.mark.interop
@pytest.mark.parametrize("case", sorted(BASE_CASES))
def test_base_matrix_matches_qemu(case: str, base_image: Path, tmp_path: Path) -> None:
    path = tmp_path / "t.qed"
    shutil.copyfile(base_image, path)
    BASE_CASES[case](path)
    fields = assert_same_as_qemu(path)
    assert fields["total-clusters"] == 160
    assert fields["format"] == "qed"


def test_base_matrix_expected_counters(base_image: Path, tmp_path: Path) -> None:
    """The §6.3 table's numbers, so a change in both tools at once would not go unseen."""
    expected = {  # corruptions, leaks, allocated, fragmented, exit code
        "clean": (0, 0, 3, 1, 0),
        "l2-past-eof": (1, 0, 4, 2, 2),
        "l2-duplicate": (1, 0, 4, 2, 2),
        "l2-unaligned": (1, 0, 4, 2, 2),
        "l2-into-l1": (1, 0, 4, 2, 2),
        "l1-past-eof": (1, 0, 3, 1, 2),
        "l1-unaligned": (1, 0, 3, 1, 2),
        "l1-shared": (4, 0, 3, 1, 2),
        "leak": (0, 1, 3, 1, 3),
        "partial-cluster": (0, 0, 3, 1, 0),
        "corruption-and-leak": (1, 1, 4, 2, 2),
        "second-table": (3, 0, 6, 2, 2),
        "orphaned-table": (0, 7, 0, 0, 3),
    }
    for case, want in expected.items():
        path = tmp_path / f"{case}.qed"
        shutil.copyfile(base_image, path)
        BASE_CASES[case](path)
        with QedImage.open(str(path), read_only=True, open_backing=False) as image:
            r = check(image)
        got = (r.corruptions, r.leaks, r.allocated_clusters, r.fragmented_clusters, r.exit_code)
        assert got == want, case
        assert r.check_errors == 0
        assert r.total_clusters == 160
        assert r.image_end_offset == path.stat().st_size


def report_of(path: Path) -> CheckReport:
    with QedImage.open(str(path), read_only=True, open_backing=False) as image:
        return check(image)


@pytest.mark.parametrize(
    "case, findings",
    [
        ("clean", []),
        ("l2-past-eof", [Finding(FindingKind.L2_INVALID, L2, 3, 0x200000, 3 * 64 * K)]),
        ("l2-duplicate", [Finding(FindingKind.DUPLICATE, L2, 3, 0xA0000, 3 * 64 * K)]),
        ("l2-into-l1", [Finding(FindingKind.DUPLICATE, L2, 3, 0x10000, 3 * 64 * K)]),
        ("l1-unaligned", [Finding(FindingKind.L1_INVALID, L1, 1, 0x60100, 2 * G)]),
        ("l1-shared", [Finding(FindingKind.DUPLICATE, L1, 1, L2, 2 * G, count=4)]),
        ("l2-last-entry", [Finding(FindingKind.DUPLICATE, L2, 32767, 0xB0000, 32767 * 64 * K)]),
        ("l1-last-entry-past-eof", [Finding(FindingKind.L1_INVALID, L1, 32767, 0x400000, 32767 * 2 * G)]),
        ("leak-several", [Finding(FindingKind.LEAK, None, None, 0xC0000, count=3)]),
        ("leak-many", [Finding(FindingKind.LEAK, None, None, 0xC0000, count=40)]),
        (
            "orphaned-table",
            [
                Finding(FindingKind.LEAK, None, None, 0x50000, count=7),
            ],
        ),
    ],
)
def test_findings_say_what_and_where(case: str, findings: list[Finding], base_image: Path, tmp_path: Path):
    path = tmp_path / "t.qed"
    shutil.copyfile(base_image, path)
    BASE_CASES[case](path)
    report = report_of(path)
    assert list(report.findings) == findings
    assert not report.findings_truncated
    corruption_kinds = {FindingKind.L1_INVALID, FindingKind.L2_INVALID, FindingKind.DUPLICATE}
    assert report.corruptions == sum(f.count for f in findings if f.kind in corruption_kinds)
    assert report.leaks == sum(f.count for f in findings if f.kind == FindingKind.LEAK)


@pytest.mark.interop
def test_need_check_image_after_a_crash(tmp_path: Path) -> None:
    """R8: a qemu-io that aborts after an allocating write leaves NEED_CHECK set; check is rc 0."""
    path = make_qed(tmp_path / "t.qed", "10M")
    qemu_io(path, "write -P 0x5a 0 4k", "abort", check=False)
    assert read_features(path) & F_NEED_CHECK
    fields = assert_same_as_qemu(path)
    assert fields["allocated-clusters"] == 1
    assert read_features(path) & F_NEED_CHECK  # neither tool clears it without -r
    assert report_of(path).need_check


@pytest.mark.interop
def test_need_check_image_with_damage(tmp_path: Path) -> None:
    path = make_qed(tmp_path / "t.qed", "10M")
    qemu_io(path, "write -P 0x5a 0 4k", "write -P 0x5b 1M 4k", "abort", check=False)
    assert read_features(path) & F_NEED_CHECK
    poke(path, L2 + 16 * 8, 0x7FFF0000)  # L2 of this image is at 0x60000 as well: entry 16 = 1M
    append(path, bytes(64 * K))
    fields = assert_same_as_qemu(path)
    assert (fields["corruptions"], fields["leaks"]) == (1, 2)  # the cluster it pointed at leaks too


def _far_table(path: Path, l1_index: int, cs: int, ts: int) -> None:
    """Append an L2 table whose entry 5 points at an appended data cluster; hang it at L1[l1_index].

    Far past the guest size, these entries serve no guest byte; both tools still follow them.
    """
    table_at = append(path, bytes(cs * ts))
    data_at = append(path, b"\x77" * cs)
    poke(path, table_at + 5 * 8, data_at)
    poke(path, cs + 8 * l1_index, table_at)


FOUR_K_TWO_CASES: dict[str, tuple[str, tuple[str, ...], Damage]] = {
    # 4K clusters, table_size 2: L1 has 1024 entries in two clusters, each L2 covers 4 MiB.
    "l2-tables-past-the-middle": (
        "4G",
        (
            "write -P 0x01 0 4k",
            "write -P 0x02 2050M 8k",  # L1 index 512: the first entry of L1's second cluster
            "write -P 0x03 3584M 12k",
            "write -P 0x04 4194300k 4k",  # the image's last cluster: L1[1023], L2[1023]
            "write -P 0x05 4186112 16k",  # across an L2 boundary: data, L2, data, L2
        ),
        lambda p: None,
    ),
    "entry-beyond-the-guest-size": ("16M", ("write -P 0x01 0 4k",), lambda p: _far_table(p, 900, 4096, 2)),
    "entry-beyond-the-guest-size-past-eof": (
        "16M",
        ("write -P 0x01 0 4k",),
        lambda p: poke(p, 4096 + 8 * 1000, 0x7FFF000),
    ),
    "last-l1-entry-shares-l1": ("16M", ("write -P 0x01 0 4k",), lambda p: poke(p, 4096 + 8 * 1023, 4096)),
}


@pytest.mark.interop
@pytest.mark.parametrize("case", sorted(FOUR_K_TWO_CASES))
def test_4k_table_size_2_matches_qemu(case: str, tmp_path: Path) -> None:
    size, ops, damage = FOUR_K_TWO_CASES[case]
    path = make_qed(tmp_path / "t.qed", size, *ops, cs="4k", ts=2)
    damage(path)
    assert_same_as_qemu(path)


@pytest.mark.interop
def test_tables_larger_than_one_read(tmp_path: Path) -> None:
    """64K/16: L1 and each L2 are 1 MiB, read 256 KiB at a time; contiguity spans the reads.

    A fragmentation count restarted at a read boundary, or an L1 read stopped at the
    addressable prefix (128 entries for 1T), would disagree with QEMU.
    """
    path = make_qed(
        tmp_path / "t.qed",
        "1T",
        "write -P 0x01 0 64k",
        "write -P 0x02 2046M 2M",  # L2 entries 32736..32767: up to the first read boundary
        "write -P 0x03 300G 64k",
        "write -P 0x05 2G 64k",  # entry 32768, the second read's first: fragmented
        "write -P 0x04 1023G 128k",
        cs="64k",
        ts=16,
    )
    _far_table(path, 100_000, 64 * K, 16)  # in L1's fourth read, far beyond the guest size
    fields = assert_same_as_qemu(path)
    assert fields["allocated-clusters"] == 1 + 32 + 1 + 1 + 2 + 1


@pytest.mark.interop
@pytest.mark.parametrize("size", ["0", "4M"])
def test_empty_images_match_qemu(size: str, tmp_path: Path) -> None:
    """No allocation: total/allocated/fragmented counters that are 0 are left out, no % line."""
    fields = assert_same_as_qemu(make_qed(tmp_path / "t.qed", size))
    assert "allocated-clusters" not in fields


@pytest.mark.interop
def test_false_leaks_of_qemu_cs_minus_1_divisor(tmp_path: Path) -> None:
    """QEMU divides offsets by ``cluster_size - 1`` to number clusters; we divide by the size.

    ``qed_bytes_to_clusters`` is ``round_up(x, cs) / (cs - 1)``. In its check that turns the
    cluster at byte offset ``k * cs`` into bit ``k + k // (cs - 1)`` (roughly), so once a file
    holds more than ``cs - 1`` clusters (here 4095 clusters of 4 KiB: 16 MiB) some bit
    indices belong to no cluster. Nothing marks them, and QEMU reports them as leaked on a
    perfectly clean image. This 4K/2 image holds 20 MiB of data in 5133 clusters:
    qemu-img says 1 leaked cluster (exit 3), we say none (exit 0). Every other counter agrees.
    (table_size 2 keeps each allocation below 4095 clusters, so QEMU's allocator, which has
    the same divisor, writes a correct image.)
    """
    path = make_qed(tmp_path / "t.qed", "64M", "write -P 0x5a 0 20M", cs="4k", ts=2)
    assert path.stat().st_size // 4096 > 4095
    ref = qemu_img("check", "-f", "qed", "--output=json", path, check=False)
    ours = qednbd("check", "--output=json", path)
    assert ref.returncode == 3
    assert ours.returncode == 0, ours.stdout + ours.stderr
    ref_fields, our_fields = json.loads(ref.stdout), json.loads(ours.stdout)
    assert ref_fields.pop("leaks") == 1
    assert "leaks" not in our_fields
    assert our_fields == ref_fields
    assert our_fields["allocated-clusters"] == 5120
    human = qednbd("check", path)
    assert human.stdout.startswith("No errors were found on the image.\n"), human.stdout
    # ... and a real leak on the same image is still exactly one leak
    append(path, bytes(4096))
    assert report_of(path).leaks == 1


@pytest.mark.interop
def test_table_size_1_image(tmp_path: Path) -> None:
    """QEMU cannot open table_size 1 images (qed.md §1.3); our check reads them."""
    path = tmp_path / "t.qed"
    created = qednbd("create", "-f", "qed", "-o", "cluster_size=4k,table_size=1", path, "16M")
    assert created.returncode == 0, created.stderr
    with QedImage.open(str(path)) as image:
        image.write(0, b"\x11" * 8192)
        image.write(5 * M, b"\x22" * 4096)
        image.write_zeroes(9 * M, 8192)
    ours = qednbd("check", "--output=json", path)
    assert ours.returncode == 0, ours.stdout + ours.stderr
    fields = json.loads(ours.stdout)
    assert fields == {
        "total-clusters": 4096,
        "check-errors": 0,
        "allocated-clusters": 3,
        "filename": str(path),
        "format": "qed",
    }
    ref = qemu_img("check", "-f", "qed", path, check=False)
    assert ref.returncode == 1 and "QED table offset is invalid" in ref.stderr
    # L1 (one cluster at 4096) → L2 for [0, 2M) at 0x4000 (after two data clusters)
    raw = path.read_bytes()
    l2_for_0 = struct.unpack_from("<Q", raw, 4096)[0]
    poke(path, l2_for_0 + 8 * 7, struct.unpack_from("<Q", raw, l2_for_0)[0])  # a duplicate
    report = report_of(path)
    assert (report.corruptions, report.allocated_clusters, report.exit_code) == (1, 4, 2)


def _hostile(path: Path, file_bytes: int, word: Callable[[int], int]) -> None:
    """A 4K/16 image of 256G (L1: 8192 entries) whose every byte after the header is ``word(j)``."""
    make_qed(path, "256G", cs="4k", ts=16)
    words = [word(j) for j in range((file_bytes - 4096) // 8)]
    with open(path, "r+b") as f:
        f.seek(4096)
        f.write(struct.pack(f"<{len(words)}Q", *words))


def _everywhere(j: int) -> int:
    """Mostly aligned offsets inside an 8 MiB file; some unaligned, some past EOF, some 1."""
    h = (j * 2654435761) & 0xFFFFFFFF
    kind = h % 16
    if kind == 0:
        return h  # unaligned (or 0, or 1)
    if kind == 1:
        return (h % 4096) << 24  # aligned, far past the end
    return (h % 2048) * 4096


@pytest.mark.interop
def test_hostile_image_fast_bounded_and_like_qemu(tmp_path: Path) -> None:
    """L1 and every table entry point all over the file: overlapping tables, tables in L1, junk."""
    path = tmp_path / "t.qed"
    _hostile(path, 8 * M, _everywhere)
    start = time.monotonic()
    tracemalloc.start()
    try:
        report = report_of(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    elapsed = time.monotonic() - start
    assert elapsed < 20, elapsed
    assert peak < 8 * M, peak  # bitmap 256 B, one 64 KiB read, capped findings
    assert report.corruptions > MAX_FINDINGS and report.findings_truncated
    assert len(report.findings) == MAX_FINDINGS
    fields = assert_same_as_qemu(path)  # 2048 clusters < 4095: QEMU counts exactly here
    assert fields["corruptions"] == report.corruptions


@pytest.mark.interop
def test_sparse_file_full_of_tables_is_bounded(tmp_path: Path) -> None:
    """Every L1 entry is a distinct valid table in a 1 GiB sparse file: 8192 table reads, all zeros."""
    path = make_qed(tmp_path / "t.qed", "256G", cs="4k", ts=16)
    table_clusters = 16
    first_table = 17 * 4096  # after the header and L1
    l1 = struct.pack("<8192Q", *(first_table + i * table_clusters * 4096 for i in range(8192)))
    with open(path, "r+b") as f:
        f.seek(4096)
        f.write(l1)
        f.truncate(G)
    start = time.monotonic()
    tracemalloc.start()
    try:
        report = report_of(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert time.monotonic() - start < 20
    assert peak < 4 * M, peak
    n_clusters = G // 4096
    referenced = 1 + 16 + 8192 * table_clusters  # header, L1, tables
    assert (report.corruptions, report.allocated_clusters) == (0, 0)
    assert report.leaks == n_clusters - referenced
    assert report.findings == (Finding(FindingKind.LEAK, None, None, referenced * 4096, count=report.leaks),)


class FailingStorage(FileStorage):
    """A read-only file whose reads touching [bad, bad+length) fail with EIO."""

    def __init__(self, path: str, bad: int, length: int) -> None:
        super().__init__(path, read_only=True)
        self.bad, self.bad_length = bad, length

    def pread(self, length: int, offset: int) -> bytes:
        if offset < self.bad + self.bad_length and self.bad < offset + length:
            raise ImageError(errno.EIO, "read failed: Input/output error")
        return super().pread(length, offset)


def test_unreadable_table_is_a_check_error(base_image: Path, tmp_path: Path) -> None:
    """An I/O error on an L2 table counts as a check error; leaks are then not counted (exit 1)."""
    path = tmp_path / "t.qed"
    shutil.copyfile(base_image, path)
    poke(path, l2_entry(3), 0x200000)
    image = QedImage(FailingStorage(str(path), L2 + 4096, 512), str(path), open_backing=False)
    try:
        report = check(image)
    finally:
        image.close()
    assert report.check_errors == 1
    assert report.leaks == 0  # the unread table's clusters would otherwise all look leaked
    assert report.exit_code == 1
    assert report.findings[-1] == Finding(
        FindingKind.IO_ERROR, L1, 0, L2, detail="read failed: Input/output error"
    )
    assert "\n1 internal errors have occurred during the check.\n" in report_human(report) + "\n"
    assert json.loads(report_json(report, "t.qed"))["check-errors"] == 1


@settings(max_examples=300, deadline=None)
@given(
    n_clusters=st.integers(0, 200),
    header=st.integers(0, 3),
    marked=st.lists(st.tuples(st.integers(0, 199), st.integers(1, 40)), max_size=12),
)
def test_leak_runs_and_count(n_clusters: int, header: int, marked: list[tuple[int, int]]) -> None:
    """The bitmap's clear runs and clear count against a plain set of cluster numbers."""
    bitmap = ClusterBitmap(n_clusters, header)
    used = set(range(min(header, n_clusters)))
    for first, n in marked:
        n = max(0, min(n, n_clusters - first))
        already = bitmap.mark(first, n)
        assert already == len(used & set(range(first, first + n)))
        used |= set(range(first, first + n))
    clear = [i for i in range(n_clusters) if i not in used]
    assert bitmap.count_clear() == len(clear)
    runs = list(bitmap.clear_runs())
    assert [i for first, n in runs for i in range(first, first + n)] == clear
    assert all(a + n < b for (a, n), (b, _) in itertools.pairwise(runs))  # maximal: never adjacent


def _snapshot(path: Path) -> tuple[bytes, int, int]:
    st = path.stat()
    return path.read_bytes(), st.st_mtime_ns, st.st_size


@pytest.mark.interop
@pytest.mark.parametrize("case", ["clean", "corruption-and-leak", "need-check"])
def test_check_does_not_write(case: str, base_image: Path, tmp_path: Path) -> None:
    path = tmp_path / "t.qed"
    if case == "need-check":
        make_qed(path, "10M")
        qemu_io(path, "write 0 4k", "abort", check=False)
        assert read_features(path) & F_NEED_CHECK
    else:
        shutil.copyfile(base_image, path)
        BASE_CASES[case](path)
    old_time = time.time() - 100
    os.utime(path, (old_time, old_time))  # an mtime a write would visibly move
    before = _snapshot(path)
    for args in (["check", path], ["check", "--output=json", path]):
        qednbd(*args)
    report_of(path)
    assert _snapshot(path) == before


def test_unopenable_image_is_one_line_exit_1(tmp_path: Path) -> None:
    path = tmp_path / "t.qed"
    path.write_bytes(b"QED\0" + bytes(60))
    proc = qednbd("check", path)
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert len(proc.stderr.splitlines()) == 1 and proc.stderr.startswith(f"qednbd: {path}: ")


@pytest.mark.parametrize("repair", [False, True], ids=["check", "check-r"])
def test_check_opens_the_backing_chain_as_qemu_img_does(tmp_path: Path, repair: bool) -> None:
    """qemu-img check opens (and locks) the backing file although it reads only the image's own
    tables, so a missing backing file fails the check: same exit status, same reason."""
    qemu_img("create", "-q", "-f", "qed", tmp_path / "base.qed", "8M")
    qemu_img("create", "-q", "-f", "qed", "-b", "base.qed", "-F", "qed", tmp_path / "top.qed")
    (tmp_path / "base.qed").rename(tmp_path / "gone.qed")
    args = ["check", *(["-r", "all"] if repair else []), "top.qed"]
    theirs = run(["qemu-img", *args], check=False, cwd=tmp_path)
    ours = qednbd(*args, cwd=tmp_path)
    assert theirs.returncode == ours.returncode == 1
    reason = "Could not open backing file: Could not open 'base.qed': No such file or directory"
    assert reason in theirs.stderr and reason in ours.stderr
    assert ours.stderr.count("\n") == 1 and ours.stdout == ""
