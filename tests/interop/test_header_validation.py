"""Header validation against QEMU (qed.md §7 "Open validation order", §8 iotest 116, recipe R10).

Every case starts from a fresh image (``qemu-img create -f qed``, or the same bytes written by
hand where qemu-img would write a 1 GiB L1 table) and pokes one hostile value into the header.
For each case ``qemu-img info -f qed`` is the oracle:

* where QEMU refuses, ``qednbd info`` and ``qednbd map`` exit 1 with exactly one line on
  stderr that carries QEMU's reason, never a traceback, and leave the file untouched;
* where QEMU opens the image, so do we;
* the two documented differences (table_size 1, and the maximum size QEMU computes as 0 for
  large clusters) are cases QEMU refuses and we accept, and are checked as such.
"""

from __future__ import annotations

import re
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from helpers import digest, qednbd, qemu_img, qemu_io

from qednbd.qed.image import QedImage

pytestmark = pytest.mark.interop

MiB = 1 << 20
QEMU_OPEN_ERROR = re.compile(r"^qemu-img: Could not open '(?P<path>[^']*)': (?P<reason>.+)$")

Mutation = Callable[[Path], None]


def poke(path: Path, offset: int, fmt: str, value: int) -> None:
    """Overwrite one little-endian field of the file in place."""
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack("<" + fmt, value))


def poke_bytes(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def truncate(n_bytes: int) -> Mutation:
    def mutate(path: Path) -> None:
        with open(path, "r+b") as f:
            f.truncate(n_bytes)

    return mutate


def field_(offset: int, fmt: str, value: int) -> Mutation:
    return lambda path: poke(path, offset, fmt, value)


def all_of(*mutations: Mutation) -> Mutation:
    def mutate(path: Path) -> None:
        for m in mutations:
            m(path)

    return mutate


def backing_name(offset: int, name: bytes, size: int | None = None) -> Mutation:
    """Set F_BACKING_FILE and point the backing name fields at ``name`` written at ``offset``."""
    return all_of(
        field_(16, "Q", 0x1),
        field_(56, "I", offset),
        field_(60, "I", len(name) if size is None else size),
        lambda path: poke_bytes(path, offset, name),
    )


def padded_backing_name(n_bytes: int) -> Mutation:
    """An existing absolute backing path (``base.raw`` beside the image) that is exactly
    ``n_bytes`` long: extra leading slashes name the same file."""

    def mutate(path: Path) -> None:
        target = str(path.parent / "base.raw")
        name = "/" * (n_bytes - len(target)) + target
        backing_name(64, name.encode())(path)

    return mutate


def write_fresh_by_hand(path: Path, cluster_size: int, table_size: int, size: int) -> None:
    """The bytes ``qemu-img create -f qed`` writes, with the L1 table left as a sparse hole."""
    header = struct.pack(
        "<IIIIQQQQQII", 0x00444551, cluster_size, table_size, 1, 0, 0, 0, cluster_size, size, 0, 0
    )
    with open(path, "wb") as f:
        f.write(header)
        f.truncate((1 + table_size) * cluster_size)


# ``accept``: QEMU opens it and so must we. ``refuse``: both refuse, with QEMU's reason.
# ``differs``: QEMU refuses, we accept on purpose (documented in docs/format.md).
ACCEPT, REFUSE, DIFFERS = "accept", "refuse", "differs"


@dataclass(frozen=True)
class Case:
    id: str
    mutate: Mutation
    outcome: str
    cluster_size: int = 65536
    table_size: int = 4
    size: int = MiB
    by_hand: bool = False  # build the fresh image without qemu-img (huge L1 tables)
    reason: str | None = field(default=None)  # QEMU's reason, pinned so a recipe cannot drift
    backing_file: bool = False  # create base.raw (1 MiB) beside the image, for map to open


CASES = [
    Case("fresh", lambda path: None, ACCEPT),
    # iotest 116: all-ones in each field
    Case("magic-all-ones", field_(0, "I", 0xFFFFFFFF), REFUSE, reason="Image not in QED format"),
    Case("cluster-size-all-ones", field_(4, "I", 0xFFFFFFFF), REFUSE, reason="QED cluster size is invalid"),
    Case("table-size-all-ones", field_(8, "I", 0xFFFFFFFF), REFUSE, reason="QED table size is invalid"),
    Case("header-size-all-ones", field_(12, "I", 0xFFFFFFFF), REFUSE, reason="QED table offset is invalid"),
    Case("l1-offset-all-ones", field_(40, "Q", 2**64 - 1), REFUSE, reason="QED table offset is invalid"),
    Case("image-size-all-ones", field_(48, "Q", 2**64 - 1), REFUSE, reason="QED image size is invalid"),
    # truncated files
    Case("truncated-512", truncate(512), REFUSE, reason="QED table offset is invalid"),
    Case("truncated-0", truncate(0), REFUSE, reason="Image not in QED format"),
    Case("truncated-32", truncate(32), REFUSE, reason="QED table offset is invalid"),
    Case("truncated-63", truncate(63), REFUSE, reason="QED table offset is invalid"),
    # QEMU sees a file's length in whole 512-byte sectors (rounded up) before it rounds down to
    # a cluster: one byte short of the L1 table's end still opens, one sector short does not.
    Case("truncated-one-byte-short", truncate(5 * 65536 - 1), ACCEPT),
    Case("truncated-511-bytes-short", truncate(5 * 65536 - 511), ACCEPT),
    Case(
        "truncated-one-sector-short",
        truncate(5 * 65536 - 512),
        REFUSE,
        reason="QED table offset is invalid",
    ),
    # magic and feature bits
    Case(
        "qcow2-magic",
        lambda path: poke_bytes(path, 0, b"QFI\xfb"),
        REFUSE,
        reason="Image not in QED format",
    ),
    Case("unknown-feature-0x100", field_(16, "Q", 0x100), REFUSE, reason="Unsupported QED features: 100"),
    Case("unknown-feature-0x8", field_(16, "Q", 0x8), REFUSE, reason="Unsupported QED features: 8"),
    Case("unknown-feature-0x108", field_(16, "Q", 0x10B), REFUSE, reason="Unsupported QED features: 108"),
    Case("need-check-set", field_(16, "Q", 0x2), ACCEPT),
    Case("unknown-compat-0x8", field_(24, "Q", 0x8), ACCEPT),
    Case("unknown-autoclear-0x8", field_(32, "Q", 0x8), ACCEPT),
    # backing file name fields
    Case("backing-bit-name-size-0", field_(16, "Q", 0x1), ACCEPT),
    Case(
        "backing-name-past-header-cluster",
        all_of(field_(16, "Q", 0x1), field_(56, "I", 65500), field_(60, "I", 100)),
        REFUSE,
        reason="QED backing filename offset is invalid",
    ),
    Case("backing-name-ends-at-header-end", backing_name(65528, b"base.raw"), ACCEPT, backing_file=True),
    Case(
        "backing-name-one-byte-past-header-end",
        backing_name(65529, b"base.raw"),
        REFUSE,
        reason="QED backing filename offset is invalid",
    ),
    Case(
        "backing-name-offset-all-ones",
        all_of(field_(16, "Q", 0x1), field_(56, "I", 0xFFFFFFFF), field_(60, "I", 8)),
        REFUSE,
        reason="QED backing filename offset is invalid",
    ),
    Case(
        "backing-name-size-all-ones",
        all_of(field_(16, "Q", 0x1), field_(56, "I", 64), field_(60, "I", 0xFFFFFFFF)),
        REFUSE,
        reason="QED backing filename offset is invalid",
    ),
    Case(
        "backing-name-size-4096",
        backing_name(64, b"b" * 4096),
        REFUSE,
        reason="Failed to read backing filename",
    ),
    Case("backing-name-size-4095", padded_backing_name(4095), ACCEPT, backing_file=True),
    # geometry
    Case("image-size-1000", field_(48, "Q", 1000), REFUSE, reason="QED image size is invalid"),
    Case("image-size-2^63", field_(48, "Q", 2**63), REFUSE, reason="QED image size is invalid"),
    Case("image-size-0", field_(48, "Q", 0), ACCEPT),
    Case("cluster-size-3000", field_(4, "I", 3000), REFUSE, reason="QED cluster size is invalid"),
    Case("cluster-size-2048", field_(4, "I", 2048), REFUSE, reason="QED cluster size is invalid"),
    Case("cluster-size-128M", field_(4, "I", 128 * MiB), REFUSE, reason="QED cluster size is invalid"),
    Case("table-size-3", field_(8, "I", 3), REFUSE, reason="QED table size is invalid"),
    Case("table-size-0", field_(8, "I", 0), REFUSE, reason="QED table size is invalid"),
    Case("table-size-32", field_(8, "I", 32), REFUSE, reason="QED table size is invalid"),
    Case("header-size-0", field_(12, "I", 0), ACCEPT),
    Case("header-size-2", field_(12, "I", 2), REFUSE, reason="QED table offset is invalid"),
    # the L1 table offset
    Case("l1-offset-unaligned", field_(40, "Q", 65536 + 512), REFUSE, reason="QED table offset is invalid"),
    Case("l1-offset-inside-header", field_(40, "Q", 0), REFUSE, reason="QED table offset is invalid"),
    Case("l1-offset-past-eof", field_(40, "Q", 100 * 65536), REFUSE, reason="QED table offset is invalid"),
    Case(
        "l1-last-cluster-past-eof",
        field_(40, "Q", 2 * 65536),
        REFUSE,
        reason="QED table offset is invalid",
    ),
    # hostile sizes with the largest clusters (QEMU's maximum overflows to 0 there)
    Case(
        "64M-clusters-size-0",
        lambda path: None,
        ACCEPT,
        cluster_size=64 * MiB,
        table_size=16,
        size=0,
        by_hand=True,
    ),
    Case(
        "64M-clusters-huge-image-size",
        field_(48, "Q", 2**62),
        DIFFERS,
        cluster_size=64 * MiB,
        table_size=16,
        size=0,
        by_hand=True,
        reason="QED image size is invalid",
    ),
    Case(
        "64M-clusters-image-size-2^64-512",
        field_(48, "Q", 2**64 - 512),
        REFUSE,
        cluster_size=64 * MiB,
        table_size=16,
        size=0,
        by_hand=True,
        reason="QED image size is invalid",
    ),
    Case(
        "64M-clusters-image-size-2^63",
        field_(48, "Q", 2**63),
        REFUSE,
        cluster_size=64 * MiB,
        table_size=16,
        size=0,
        by_hand=True,
        reason="QED image size is invalid",
    ),
    Case(
        "table-size-1",
        lambda path: None,
        DIFFERS,
        table_size=1,
        reason="QED table offset is invalid",
    ),
]


def make_case_image(case: Case, path: Path) -> None:
    if case.by_hand:
        write_fresh_by_hand(path, case.cluster_size, case.table_size, case.size)
    else:
        qemu_img(
            "create",
            "-f",
            "qed",
            "-o",
            f"cluster_size={case.cluster_size},table_size={case.table_size}",
            path,
            str(case.size),
        )
    case.mutate(path)
    if case.backing_file:
        with open(path.parent / "base.raw", "wb") as f:
            f.truncate(MiB)


def qemu_reason(path: Path) -> str | None:
    """None if ``qemu-img info -f qed`` opens the image, else QEMU's reason text."""
    proc = qemu_img("info", "-f", "qed", path, check=False)
    if proc.returncode == 0:
        return None
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, f"unexpected qemu-img output: {proc.stderr!r}"
    match = QEMU_OPEN_ERROR.match(lines[0])
    assert match, f"unexpected qemu-img error line: {lines[0]!r}"
    return match.group("reason")


def assert_refused(path: Path, command: str, reason: str) -> None:
    proc = qednbd(command, path)
    output = proc.stdout + proc.stderr
    assert "Traceback" not in output, output
    assert proc.returncode == 1, (command, proc.returncode, output)
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, f"qednbd {command}: expected one line on stderr, got {proc.stderr!r}"
    assert lines[0].startswith(f"qednbd: {path}: "), lines[0]
    assert reason in lines[0], f"qednbd {command}: {lines[0]!r} lacks QEMU's reason {reason!r}"


def assert_accepted(path: Path, command: str) -> None:
    proc = qednbd(command, path)
    output = proc.stdout + proc.stderr
    assert "Traceback" not in output, output
    assert proc.returncode == 0, (command, proc.returncode, output)
    assert proc.stderr == "", proc.stderr


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_refuses_exactly_where_qemu_does(case: Case, tmp_path: Path) -> None:
    path = tmp_path / "t.qed"
    make_case_image(case, path)
    reason = qemu_reason(path)
    # the oracle first: the recipe must still provoke what it was written for
    if case.outcome == ACCEPT:
        assert reason is None, f"QEMU now refuses: {reason}"
    else:
        assert reason is not None, "QEMU now opens this image"
        assert reason == case.reason
    before = digest(path)
    for command in ("info", "map"):
        if case.outcome == REFUSE:
            assert reason is not None
            assert_refused(path, command, reason)
        else:
            assert_accepted(path, command)
        assert digest(path) == before, f"qednbd {command} modified the image"


def test_hand_built_fresh_image_matches_qemu_img_create(tmp_path: Path) -> None:
    """The by-hand recipe above writes the same bytes as qemu-img (checked where that is cheap)."""
    ours, theirs = tmp_path / "ours.qed", tmp_path / "theirs.qed"
    for cs, ts, size in ((65536, 4, MiB), (4096, 16, 100352), (4 * MiB, 2, 0)):
        write_fresh_by_hand(ours, cs, ts, size)
        qemu_img("create", "-f", "qed", "-o", f"cluster_size={cs},table_size={ts}", theirs, str(size))
        assert ours.read_bytes() == theirs.read_bytes(), (cs, ts, size)


def _read_u64(path: Path, offset: int) -> int:
    with open(path, "rb") as f:
        f.seek(offset)
        return int.from_bytes(f.read(8), "little")


@pytest.mark.parametrize("compat, autoclear", [(0x8, 0), (0, 0x8), (0x30, 0xF0)])
def test_unknown_compat_kept_and_autoclear_cleared_like_qemu(compat: int, autoclear: int, tmp_path: Path):
    """A read-write open keeps unknown compat bits and clears unknown autoclear bits, as qemu-io does;
    a read-only open (qednbd info/map) changes nothing."""
    base = tmp_path / "base.qed"
    qemu_img("create", "-f", "qed", base, "1M")
    qemu_io(base, "write -P 0x5a 0 64k")
    poke(base, 24, "Q", compat)
    poke(base, 32, "Q", autoclear)
    theirs, ours = tmp_path / "theirs.qed", tmp_path / "ours.qed"
    shutil.copyfile(base, theirs)
    shutil.copyfile(base, ours)

    qemu_io(theirs, "read -P 0x5a 0 64k")
    assert _read_u64(theirs, 24) == compat
    assert _read_u64(theirs, 32) == 0

    before = digest(ours)
    for command in ("info", "map"):
        assert_accepted(ours, command)
    assert digest(ours) == before, "a read-only open changed the header"

    with QedImage.open(str(ours)) as image:
        assert image.read(0, 65536) == b"\x5a" * 65536
        assert image.header.compat_features == compat
        assert image.header.autoclear_features == 0
    assert _read_u64(ours, 24) == compat
    assert _read_u64(ours, 32) == 0
    assert ours.read_bytes() == theirs.read_bytes()


@pytest.mark.parametrize("short_by", [1, 100, 511])
def test_data_cluster_in_tail_shorter_than_a_sector_reads_like_qemu(short_by: int, tmp_path: Path):
    """QEMU measures the file in whole sectors, so a data cluster that lost fewer than 512 bytes
    at the end of the file is still valid: it reads as its bytes, then zeros."""
    path = tmp_path / "t.qed"
    qemu_img("create", "-f", "qed", path, "1M")
    qemu_io(path, "write -P 0x11 0 64k", "write -P 0x22 64k 64k")
    # data at 0x50000, L2 at 0x60000-0x9ffff, data at 0xa0000; the file ends at 0xb0000
    assert path.stat().st_size == 0xB0000
    with open(path, "r+b") as f:
        f.truncate(0xB0000 - short_by)
    ref = tmp_path / "ref.raw"
    qemu_img("convert", "-f", "qed", "-O", "raw", path, ref)
    expected = ref.read_bytes()
    assert expected[65536 : 2 * 65536] == b"\x22" * (65536 - short_by) + bytes(short_by)

    with QedImage.open(str(path), read_only=True) as image:
        assert image.read(0, MiB) == expected
    out = tmp_path / "out.raw"
    proc = qednbd("convert", "-O", "raw", path, out)
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes() == expected
