"""R2/R5/R7: the same op script through qemu-io and through our engine gives byte-identical files.

Each case starts from one fresh image made by ``qemu-img create``, copied twice; qemu-io
runs the script on one copy, :func:`opscript.run_engine` on the other. The files must be
identical (same allocation order, same COW bytes, same table sectors, same header), both
must pass ``qemu-img check``, and NEED_CHECK must be clear after close in both.

Partial writes into *zero clusters* with a backing file are left out on purpose: QEMU
fills the rest of the cluster from the backing file there (qed.md §9, bug 4) and we do
not; ``test_cross_write.py`` covers that difference.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from helpers import qemu_img, read_features
from opscript import run_engine, run_qemu_io

pytestmark = pytest.mark.interop

K, M = 1 << 10, 1 << 20
F_NEED_CHECK = 0x2


@dataclass(frozen=True)
class Case:
    size: int
    ops: list[str]
    cluster_size: int | None = None
    table_size: int | None = None
    backing: list[dict[str, object]] = field(default_factory=list)  # layers below the image


R2_OPS = [
    "write -P 0x11 0 4k",
    "write -P 0x22 4190208 8192",
    "write -P 0x33 8k 16k",
    "write -z 1M 64k",
    "write -z 2M 4k",
    "write -P 0x44 64k 64k",
]

NO_BACKING = {
    "r2-4K-2": Case(16 * M, R2_OPS, 4 * K, 2),
    "r2-64K-4": Case(16 * M, R2_OPS),
    "l2-boundaries-4K-2": Case(
        16 * M,
        [
            "write -P 0x01 4190208 8192",  # straddles the first L2 region (4 MiB)
            "write -P 0x02 8386560 8704",  # 0x7ff800..: partial cluster, then the 8 MiB boundary
            "write -P 0x03 4186112 8404992",  # 4M-8k .. 12M+8k: touches four L2 regions in one call
            "write -P 0x06 12578816 4198400",  # 12M-4k .. 16M, the end of the image
            "write -P 0x04 4194000 1000",  # unaligned, across the boundary into allocated data
            "write -P 0x05 8392704 4096",
        ],
        4 * K,
        2,
    ),
    "allocated-and-unallocated-64K-4": Case(
        8 * M,
        [
            "write -P 0x10 64k 64k",
            "write -P 0x11 192k 64k",
            "write -P 0x12 32k 320k",  # partial, allocated, hole, allocated, partial
            "write -P 0x13 100000 200000",
            "write -P 0x14 1M 1",
            "write -P 0x15 1048577 131070",
        ],
    ),
    "write-zeroes-64K-4": Case(
        8 * M,
        [
            "write -z 0 128k",  # aligned over unallocated → zero clusters
            "write -z 200k 10k",  # unaligned → an allocating write of zeros
            "write -P 0x21 1M 192k",
            "write -z 1M 64k",  # aligned over data: zeroed in place, offset kept
            "write -z 1100k 100k",  # unaligned over data and beyond it
            "write -z 2M 1M",
            "write -P 0x22 2M 64k",  # full-cluster write over a zero cluster
            "write -z 3M 4097",
        ],
    ),
    "overwrites-4K-16": Case(
        4 * M,
        [
            "write -P 0x31 0 64k",
            "write -P 0x32 4k 8k",
            "write -P 0x33 0 512",
            "write -P 0x34 60k 8k",
            "flush",
            "write -P 0x35 0 68k",
            "write -P 0x36 123 4567",
            "write -z 8k 4k",
            "write -P 0x37 8k 100",
        ],
        4 * K,
        16,
    ),
    "zero-cluster-partial-writes-no-backing": Case(
        4 * M,
        [
            "write -z 0 256k",
            "write -P 0x41 4k 4k",  # into a zero cluster: the rest must be zeros
            "write -P 0x42 130000 100",
            "write -P 0x43 192k 64k",  # whole zero cluster
            "write -P 0x44 60k 8k",  # spans a data cluster and a zero cluster
        ],
    ),
    "unaligned-size-4K-16": Case(
        100352,
        [
            "write -P 0x51 99840 512",  # the last, partial cluster
            "write -P 0x52 4096 512",
            "write -z 94208 4096",
            "write -P 0x53 90000 10352",
        ],
        4 * K,
        16,
    ),
    "unaligned-size-64K-4": Case(
        1000448,
        [
            "write -P 0x61 983040 17408",  # from the last cluster's start to the end
            "write -z 917504 65536",
            "write -P 0x62 900000 100448",
        ],
    ),
    "geometry-64K-2": Case(
        4 * M,
        ["write -P 0x71 0 1M", "write -P 0x72 2097152 65536", "write -z 3M 128k", "write -P 0x73 3M 10"],
        64 * K,
        2,
    ),
    "geometry-64K-16": Case(
        64 * M,
        ["write -P 0x81 0 4k", "write -P 0x82 48M 1M", "write -z 60M 64k", "write -P 0x83 63M 4097"],
        64 * K,
        16,
    ),
    "geometry-4M-2": Case(
        64 * M,
        ["write -P 0x91 1M 4k", "write -P 0x92 8M 8M", "write -z 20M 4M", "write -P 0x93 33M 5000"],
        4 * M,
        2,
    ),
}

RAW_BASE = {
    "name": "base.raw",
    "fmt": "raw",
    "size": "4M",
    "ops": ["write -P 0xbb 0 4M", "write -P 0xa5 1M 1"],
}
RAW_SHORT = {"name": "short.raw", "fmt": "raw", "size": "6144", "ops": ["write -P 0xbb 0 6144"]}
QED_BASE = [
    {"name": "base2.raw", "fmt": "raw", "size": "3M", "ops": ["write -P 0xcc 0 3M"]},
    {
        "name": "base.qed",
        "fmt": "qed",
        "size": "4M",
        "backing": "base2.raw",
        "backing_fmt": "raw",
        "ops": ["write -P 0xdd 64k 64k", "write -z 256k 64k", "write -P 0xde 1000000 5000"],
    },
]

BACKING_OPS = [
    "write -P 0x11 4k 4k",  # COW head and tail from the backing file
    "write -P 0x12 65000 1000",  # partial clusters on both sides of a boundary
    "write -P 0x13 256k 64k",  # whole cluster
    "write -z 512k 128k",  # zero clusters over backing data
    "write -z 700k 1000",  # unaligned zeroes: an allocating write with COW
    "write -P 0x14 1000000 300000",
    "write -P 0x15 3M 1M",
]

WITH_BACKING = {
    "raw-backing-64K-4": Case(4 * M, BACKING_OPS, backing=[RAW_BASE]),
    "raw-backing-4K-2": Case(8 * M, [*BACKING_OPS, "write -P 0x16 4190208 8192"], 4 * K, 2, [RAW_BASE]),
    "qed-backing-depth-2": Case(4 * M, BACKING_OPS, backing=QED_BASE),
    "r7-short-raw-backing": Case(
        100000 + 352,
        ["write -P 0x21 4096 512", "write -P 0x22 99840 512", "write -P 0x23 1000 100"],
        4 * K,
        16,
        [RAW_SHORT],
    ),
}


def _prepare(tmp_path: Path, case: Case, make_layers) -> tuple[Path, Path]:
    base_name = None
    base_fmt = None
    if case.backing:
        make_layers(case.backing)
        base_name = str(case.backing[-1]["name"])
        base_fmt = str(case.backing[-1]["fmt"])
    fresh = tmp_path / "fresh.qed"
    args: list[str] = ["create", "-f", "qed"]
    opts = [
        f"{k}={v}" for k, v in (("cluster_size", case.cluster_size), ("table_size", case.table_size)) if v
    ]
    if opts:
        args += ["-o", ",".join(opts)]
    if base_name:
        args += ["-b", base_name, "-F", base_fmt or "raw"]
    qemu_img(*args, fresh, str(case.size))
    theirs, ours = tmp_path / "qemu.qed", tmp_path / "engine.qed"
    shutil.copyfile(fresh, theirs)
    shutil.copyfile(fresh, ours)
    return theirs, ours


def _run_parity(tmp_path: Path, case: Case, make_layers, qemu_check) -> None:
    theirs, ours = _prepare(tmp_path, case, make_layers)
    run_qemu_io(theirs, case.ops)
    run_engine(ours, case.ops)
    qemu_check(theirs)
    qemu_check(ours)
    assert read_features(theirs) & F_NEED_CHECK == 0
    assert read_features(ours) & F_NEED_CHECK == 0
    a, b = theirs.read_bytes(), ours.read_bytes()
    assert len(a) == len(b), f"file lengths differ: qemu-io {len(a)}, engine {len(b)}"
    if a != b:
        first = next(i for i in range(len(a)) if a[i] != b[i])
        pytest.fail(f"files differ, first at byte 0x{first:x}: qemu-io {a[first]:#x}, engine {b[first]:#x}")


@pytest.mark.parametrize("name", list(NO_BACKING))
def test_op_script_parity(tmp_path, make_layers, qemu_check, name):
    _run_parity(tmp_path, NO_BACKING[name], make_layers, qemu_check)


@pytest.mark.parametrize("name", list(WITH_BACKING))
def test_op_script_parity_with_backing(tmp_path, make_layers, qemu_check, name):
    _run_parity(tmp_path, WITH_BACKING[name], make_layers, qemu_check)
