#!/usr/bin/env python3
"""Regenerate the corrupt-image corpus of ``tests/data/`` byte for byte.

Usage::

    python3 tests/data/make_corpus.py [OUTDIR]     # default: this script's directory
    python3 tests/data/make_corpus.py --readme     # print README.md (the same recipes, as shell)

Every image is made by ``qemu-img``/``qemu-io`` (QEMU 7.2) and then damaged by poking
bytes, appending or truncating. A recipe is a list of steps; the same steps are run here
and rendered into ``README.md`` as the shell commands that do the same thing (``printf |
dd`` for a poke), so the README is the exact recipe of every file. ``tests/interop/
test_corpus.py`` checks that the committed files equal a fresh run of this script and that
the README is what :func:`render_readme` prints.

Geometry: 4 KiB clusters, table_size 2 (L1 and each L2 table are two clusters, 1024
entries; one L2 table covers 4 MiB), 8 MiB virtual size, so each file is a few tens of KiB.

The base image ``A`` (``clean.qed``) is::

    0x0000 header          0x4000-0x5fff L2#0 (L1[0])   0x8000 data, guest 4M (L2#1[0])
    0x1000-0x2fff L1       0x6000 data, guest 4k (L2#0[1])  0x9000-0xafff L2#1 (L1[1])
    0x3000 data, guest 0 (L2#0[0])  0x7000 data, guest 12k (L2#0[3])   end of file 0xb000

Guest 0 holds 0x11, 4k 0x22, 12k 0x33, 4M 0x44 (one 4 KiB cluster each).
"""

from __future__ import annotations

import os
import resource
import shlex
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
QEMU_VERSION = "7.2"  # the qemu-img/qemu-io the committed files were made with

CS = 4096
L1 = 0x1000  # L1 table of the base images (header_size 1)
L2_0 = 0x4000  # L2 table of guest [0, 4M)
L2_1 = 0x9000  # L2 table of guest [4M, 8M)
END = 0xB000  # file length of the base image


def l1(i: int) -> int:
    """Byte offset of L1 entry ``i`` in the base image."""
    return L1 + 8 * i


def l2_0(i: int) -> int:
    """Byte offset of entry ``i`` of L2#0 (guest ``i * 4k``)."""
    return L2_0 + 8 * i


def l2_1(i: int) -> int:
    """Byte offset of entry ``i`` of L2#1 (guest ``4M + i * 4k``)."""
    return L2_1 + 8 * i


# -- steps ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    """Run a QEMU tool in the corpus directory; ``aborts`` for qemu-io's ``abort``."""

    argv: tuple[str, ...]
    aborts: bool = False

    def shell(self, name: str) -> str:
        text = " ".join(shlex.quote(a) for a in self.argv)
        return f"{text} || true  # dies of SIGABRT on purpose" if self.aborts else text


@dataclass(frozen=True)
class Poke:
    """Write ``value`` as a little-endian integer of ``width`` bytes at ``offset``."""

    offset: int
    value: int
    width: int = 8
    why: str = ""

    def shell(self, name: str) -> str:
        octal = "".join(f"\\{b:03o}" for b in self.value.to_bytes(self.width, "little"))
        comment = f"u{self.width * 8} @0x{self.offset:x} = 0x{self.value:x}"
        if self.why:
            comment += f": {self.why}"
        return (
            f"printf '{octal}' | dd of={shlex.quote(name)} bs=1 seek={self.offset} conv=notrunc "
            f"status=none  # {comment}"
        )


@dataclass(frozen=True)
class Append:
    """Append ``count`` bytes of value ``byte``."""

    byte: int
    count: int

    def shell(self, name: str) -> str:
        return f"head -c {self.count} /dev/zero | tr '\\000' '\\{self.byte:03o}' >> {shlex.quote(name)}"


@dataclass(frozen=True)
class Truncate:
    length: int

    def shell(self, name: str) -> str:
        return f"truncate -s {self.length} {shlex.quote(name)}  # 0x{self.length:x}"


Step = Run | Poke | Append | Truncate


@dataclass(frozen=True)
class Case:
    name: str  # file name in the corpus directory
    what: str  # one line: what is wrong with it
    steps: tuple[Step, ...]


# -- base recipes ----------------------------------------------------------------------


def create(name: str, size: str = "8M", *extra: str) -> Run:
    return Run(
        ("qemu-img", "create", "-q", "-f", "qed", "-o", "cluster_size=4k,table_size=2", *extra, name, size)
    )


def qemu_io(name: str, *commands: str, aborts: bool = False) -> Run:
    argv: list[str] = ["qemu-io", "-f", "qed"]
    for c in commands:
        argv += ["-c", c]
    return Run((*argv, name), aborts)


BASE_WRITES = ("write -P 0x11 0 4k", "write -P 0x22 4k 4k", "write -P 0x33 12k 4k", "write -P 0x44 4M 4k")


def base(name: str, *more_writes: str) -> tuple[Step, ...]:
    """Image A (see the module docstring), closed cleanly."""
    return (create(name), qemu_io(name, *BASE_WRITES, *more_writes))


def dirty_base(name: str) -> tuple[Step, ...]:
    """Image A written by a qemu-io that then aborts: NEED_CHECK stays set, nothing else differs."""
    return (create(name), qemu_io(name, *BASE_WRITES, "abort", aborts=True))


def header_size_2(name: str) -> tuple[Step, ...]:
    """header_size 2 (clusters 0x0 and 0x1000 are header), L1 at 0x2000-0x3fff; then
    guest 0 (0x11) → data 0x4000, L2 0x5000-0x6fff, guest 4k (0x22) → data 0x7000; end 0x8000."""
    return (
        create(name),
        Poke(12, 2, 4, "header_size = 2"),
        Poke(40, 0x2000, 8, "l1_table_offset = 0x2000"),
        Truncate(0x4000),
        qemu_io(name, "write -P 0x11 0 4k", "write -P 0x22 4k 4k"),
    )


def with_backing(name: str) -> tuple[Step, ...]:
    """An overlay of ``backing.raw`` (64 KiB of 0xbb, smaller than the 8M overlay):
    guest 4k (0x11) → data 0x3000, L2#0 0x4000-0x5fff, guest 8k (one 0x12 sector at
    8k+512, the rest copied from the backing file) → 0x6000, guest 4M (0x13) → 0x7000,
    L2#1 0x8000-0x9fff; end 0xa000."""
    return (
        create(name, "8M", "-b", "backing.raw", "-F", "raw"),
        qemu_io(name, "write -P 0x11 4k 4k", "write -P 0x12 8704 512", "write -P 0x13 4M 4k"),
    )


def case(name: str, what: str, *steps: Step | tuple[Step, ...]) -> Case:
    flat: list[Step] = []
    for s in steps:
        flat.extend(s if isinstance(s, tuple) else (s,))
    return Case(name, what, tuple(flat))


P = Poke
CASES: tuple[Case, ...] = (
    case(
        "backing.raw",
        "support file: the raw backing file of backing-raw-damaged.qed (64 KiB of 0xbb)",
        Run(("qemu-img", "create", "-q", "-f", "raw", "backing.raw", "64k")),
        Run(("qemu-io", "-f", "raw", "-c", "write -P 0xbb 0 64k", "backing.raw")),
    ),
    case("clean.qed", "image A, consistent (the control)", base("clean.qed")),
    # -- invalid L2 entries (QEMU clears them with -r) --
    case(
        "l2-past-eof.qed",
        "L2#0[2] (guest 8k) points past the end of the file",
        base("l2-past-eof.qed"),
        P(l2_0(2), 0x100000),
    ),
    case("l2-unaligned.qed", "L2#0[2] is not cluster-aligned", base("l2-unaligned.qed"), P(l2_0(2), 0x6200)),
    case(
        "l2-into-header-unaligned.qed",
        "L2#0[2] points into the header cluster (unaligned)",
        base("l2-into-header-unaligned.qed"),
        P(l2_0(2), 0x200),
    ),
    case(
        "header-size-2-into-header.qed",
        "header_size 2: L2[2] and L1[1] point at the second header cluster (aligned, below the header end)",
        header_size_2("header-size-2-into-header.qed"),
        P(0x5000 + 8 * 2, 0x1000),
        P(0x2000 + 8, 0x1000),
    ),
    # -- invalid L1 entries --
    case(
        "l1-past-eof.qed",
        "L1[1] points past the end: L2#1 and its data cluster are orphaned",
        base("l1-past-eof.qed"),
        P(l1(1), 0x100000),
    ),
    case(
        "l1-unaligned.qed",
        "L1[1] is not cluster-aligned (L2#1 and its data orphaned)",
        base("l1-unaligned.qed"),
        P(l1(1), 0x9100),
    ),
    case(
        "l1-table-crosses-eof.qed",
        "L1[1] = 0xa000: the table's second cluster would be past the end",
        base("l1-table-crosses-eof.qed"),
        P(l1(1), 0xA000),
    ),
    case(
        "l1-unaddressable-past-eof.qed",
        "L1[700], beyond the 8M the image addresses, points past the end",
        base("l1-unaddressable-past-eof.qed"),
        P(l1(700), 0x7FF000),
    ),
    # -- clusters referenced twice --
    case(
        "l2-duplicate.qed",
        "L2#0[2] (guest 8k) shares guest 4k's data cluster 0x6000",
        base("l2-duplicate.qed"),
        P(l2_0(2), 0x6000),
    ),
    case(
        "l2-duplicate-across-tables.qed",
        "L2#1[1] (guest 4M+4k) shares guest 0's data cluster 0x3000",
        base("l2-duplicate-across-tables.qed"),
        P(l2_1(1), 0x3000),
    ),
    case(
        "l2-into-l1.qed",
        "L2#0[2] points at the L1 table's first cluster",
        base("l2-into-l1.qed"),
        P(l2_0(2), L1),
    ),
    case(
        "l2-into-own-l2.qed",
        "L2#0[2] points at its own table's second cluster 0x5000",
        base("l2-into-own-l2.qed"),
        P(l2_0(2), 0x5000),
    ),
    case(
        "l2-into-other-l2.qed",
        "L2#0[2] points at L2#1 (0x9000), which is then counted as shared and not read",
        base("l2-into-other-l2.qed"),
        P(l2_0(2), L2_1),
    ),
    case(
        "l1-shared.qed",
        "L1[1] = L1[0]: one L2 table serves both 4 MiB halves; L2#1 and 0x8000 orphaned",
        base("l1-shared.qed"),
        P(l1(1), L2_0),
    ),
    case(
        "l1-overlapping.qed",
        "L1[1] = 0x5000: a table overlapping L2#0's second cluster and data 0x6000",
        base("l1-overlapping.qed"),
        P(l1(1), 0x5000),
    ),
    case("l1-into-l1.qed", "L1[1] points at the L1 table itself", base("l1-into-l1.qed"), P(l1(1), L1)),
    case(
        "l1-into-data.qed",
        "L1[1] = 0x6000: a table made of guest 4k's and 12k's data clusters (L2#1 and 0x8000 orphaned)",
        base("l1-into-data.qed"),
        P(l1(1), 0x6000),
    ),
    # -- leaks --
    case(
        "leak-interior.qed",
        "L2#0[3] dropped: data cluster 0x7000 is referenced by nothing",
        base("leak-interior.qed"),
        P(l2_0(3), 0),
    ),
    case("leak-end.qed", "two clusters of 0xaa appended", base("leak-end.qed"), Append(0xAA, 2 * CS)),
    case(
        "leak-interior-and-end.qed",
        "L2#0[1] dropped (0x6000 leaks), one cluster and 1000 bytes appended",
        base("leak-interior-and-end.qed"),
        P(l2_0(1), 0),
        Append(0xAA, CS + 1000),
    ),
    case(
        "junk-partial.qed",
        "1000 bytes of 0xaa appended (a partial cluster: not a leak)",
        base("junk-partial.qed"),
        Append(0xAA, 1000),
    ),
    # -- truncated files --
    case(
        "truncated-data.qed",
        "guest 16k (0x55) at 0xb000, file cut to 0xb800 (mid-cluster)",
        base("truncated-data.qed", "write -P 0x55 16k 4k"),
        Truncate(0xB800),
    ),
    case(
        "truncated-table.qed",
        "file cut to 0xa800, mid L2#1: L1[1]'s table no longer fits",
        base("truncated-table.qed"),
        Truncate(0xA800),
    ),
    # -- dirty images --
    case(
        "dirty-clean.qed",
        "image A left by an aborted qemu-io: NEED_CHECK set, otherwise consistent",
        dirty_base("dirty-clean.qed"),
    ),
    case(
        "dirty-damaged.qed",
        "dirty; L2#0[2] past the end, L2#0[3] dropped (interior leak), a cluster appended",
        dirty_base("dirty-damaged.qed"),
        P(l2_0(2), 0x100000),
        P(l2_0(3), 0),
        Append(0x5A, CS),
    ),
    case(
        "dirty-duplicate.qed",
        "dirty; L2#0[2] shares 0x6000 with guest 4k and L2#0[5] points into L1",
        dirty_base("dirty-duplicate.qed"),
        P(l2_0(2), 0x6000),
        P(l2_0(5), L1),
    ),
    # -- header pokes that still open --
    case(
        "header-unknown-compat.qed",
        "compat_features = 0x100 (unknown, kept); L2#0[2] past the end",
        base("header-unknown-compat.qed"),
        P(24, 0x100, 8, "compat_features"),
        P(l2_0(2), 0x100000),
    ),
    case(
        "header-unknown-autoclear.qed",
        "autoclear_features = 0x1 (unknown: a read-write open clears it); L2#0[2] unaligned; "
        "a cluster appended",
        base("header-unknown-autoclear.qed"),
        P(32, 0x1, 8, "autoclear_features"),
        P(l2_0(2), 0x6001),
        Append(0xAA, CS),
    ),
    # -- with a backing file --
    case(
        "backing-raw-damaged.qed",
        "overlay of backing.raw; L2#0[1] (guest 4k) past the end, L2#1[0] (guest 4M) shares 0x6000 "
        "(0x7000 leaks)",
        with_backing("backing-raw-damaged.qed"),
        P(l2_0(1), 0x100000),
        P(0x8000, 0x6000),
    ),
    # -- combinations --
    case(
        "combo.qed",
        "dirty; invalid, duplicate and metadata entries in both tables, an unaligned L1 entry, "
        "an interior leak, leaked clusters and a partial cluster at the end",
        dirty_base("combo.qed"),
        P(l2_0(2), 0x100000),
        P(l2_0(3), 0),
        P(l2_0(5), 0x6000),
        P(l2_0(6), L1 + CS),
        P(l2_0(7), 0x3000),
        P(l2_1(1), L2_1),
        P(l2_1(2), 0xA200),
        P(l1(3), 0x7100),
        Append(0xAA, 2 * CS + 100),
    ),
    case(
        "combo-tables.qed",
        "L1[1] = L1[0] (shared), L1[2] overlaps L2#0 (0x5000), L1[3] past the end, L2#0[2] unaligned",
        base("combo-tables.qed"),
        P(l1(1), L2_0),
        P(l1(2), 0x5000),
        P(l1(3), 0x200000),
        P(l2_0(2), 0x3001),
    ),
)


# -- running the steps -------------------------------------------------------------------


def _no_core_dumps() -> None:
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def apply(step: Step, path: Path) -> None:
    if isinstance(step, Run):
        proc = subprocess.run(
            step.argv, cwd=path.parent, capture_output=True, text=True, preexec_fn=_no_core_dumps, check=False
        )
        out = proc.stdout + proc.stderr
        if "failed" in out or "rror" in out or (proc.returncode != 0) != step.aborts:
            raise RuntimeError(f"{' '.join(step.argv)}: exit {proc.returncode}\n{out}")
    elif isinstance(step, Poke):
        with open(path, "r+b") as f:
            f.seek(step.offset)
            f.write(step.value.to_bytes(step.width, "little"))
    elif isinstance(step, Append):
        with open(path, "ab") as f:
            f.write(bytes([step.byte]) * step.count)
    else:
        os.truncate(path, step.length)


def make(outdir: Path, cases: Sequence[Case] = CASES) -> list[Path]:
    """(Re)create every file of ``cases`` in ``outdir``, in order; return their paths."""
    outdir.mkdir(parents=True, exist_ok=True)
    made = []
    for c in cases:
        path = outdir / c.name
        path.unlink(missing_ok=True)
        for step in c.steps:
            apply(step, path)
        made.append(path)
    return made


def render_readme() -> str:
    lines = [
        "# Corrupt-image corpus",
        "",
        "Small QED images (4 KiB clusters, table_size 2, 8 MiB virtual), each damaged in one known way.",
        "`tests/interop/test_corpus.py` runs `qemu-img check` and `qednbd check` (with and without",
        "`-r leaks|all`) on copies of them. Do not edit the files by hand: change the recipe in",
        "`make_corpus.py` and run `python3 tests/data/make_corpus.py` (needs qemu-img/qemu-io",
        f"{QEMU_VERSION}), then `python3 tests/data/make_corpus.py --readme > tests/data/README.md`.",
        "",
        "The layout of the base image A (`clean.qed`):",
        "",
        "```",
        *(line[4:] for line in (__doc__ or "").splitlines() if line.startswith("    0x")),
        "```",
        "",
        "Guest 0 holds 0x11, 4k 0x22, 12k 0x33, 4M 0x44. Each recipe below is the exact shell that made",
        "the file, run in this directory (`ulimit -c 0` first: the dirty images come from a qemu-io that",
        "aborts). A poke writes a little-endian integer with `printf | dd`.",
        "",
    ]
    for c in CASES:
        lines += [f"## `{c.name}`", "", c.what + ".", "", "```sh"]
        lines += [step.shell(c.name) for step in c.steps]
        lines += ["```", ""]
    return "\n".join(lines)


def main(argv: Sequence[str]) -> int:
    if argv[:1] == ["--readme"]:
        sys.stdout.write(render_readme())
        return 0
    outdir = Path(argv[0]) if argv else HERE
    for path in make(outdir):
        print(f"{path.name}: {path.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
