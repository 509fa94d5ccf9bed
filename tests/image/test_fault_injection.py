"""Fault injection: an I/O error at every I/O index of a workload, surfaced and survivable.

:class:`FailingStorage` wraps a real :class:`FileStorage`, numbers every I/O call
(pread, pwrite, flush, truncate, punch_hole) and makes the N-th one — optionally
counting only calls of given kinds — raise ``ImageError(EIO | ENOSPC)``; a write can
first write a sector-aligned prefix of its data (a short write), and a fault can be
*sticky* (every later matching call fails too: a full or dead disk).

For each workload (allocating writes with and without a backing file, in-place writes,
writes spanning L2 tables, a write over the 1 MiB copy threshold, write_zeroes, trim,
resize, change_backing_file, close, the repair a read-write open of a damaged image
runs) and each fault, one *session* runs: ``QedImage(failing_storage, path)``, the
workload's operations, a read of the whole image, ``close()``. The fault is transient
(unless sticky), so after a failed operation the session goes on using the same image
object. Then, with fresh healthy storages:

1. *Surfaced*: the operation during which the fault fired raised ``ImageError`` with the
   injected errno (a pread fault inside ``check()`` is the exception: the checker counts
   I/O errors by design and its caller acts on the count); nothing raised without a
   fault; every value an operation returned (reads) agrees with the model.
2. *Nothing false*: after reopening, every sector written by an operation that reported
   success holds its data; a sector of a failed write or zeroing holds the old or the
   new bytes; the size and backing name are the old or the new ones of a failed resize
   or rebase, and exactly the new ones once one succeeded (or a later write used them).
3. *Read-only open*: opens, reads the same (for undamaged workloads), and makes no
   mutating call; the file's bytes are unchanged.
4. *Read-write open*: opens (auto-repair if dirty), reads the model, ``check()`` finds no
   corruption and no check error, and close leaves NEED_CHECK clear. A sample also goes
   through ``qemu-img check`` (interop), which must agree.

Sweeps: transient EIO/ENOSPC at every index plus short ENOSPC writes, and sticky faults,
by default; two faults close together (``slow``). Focused tests pin down close, flush,
rebase and the L2 cache after a failed table write. When a failed write's sectors read
old in the session and new after a reopen, the sweep only prints it (each sector is old
or new, as allowed); test_failed_multi_sector_l2_update_... asserts it.

Geometry: 4 KiB clusters, table_size 2 (one L2 table maps 4 MiB; qemu-img refuses
table_size 1), a 12 MiB image (three L2 tables).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import struct
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from helpers import qemu_img

from qednbd.errors import ImageError
from qednbd.qed import format as fmt
from qednbd.qed.check import check
from qednbd.qed.image import QedImage, create_image
from qednbd.qed.storage import FileStorage, Storage

KiB, MiB = 1 << 10, 1 << 20
CS = 4 * KiB
TS = 2
L2_SPAN = CS * (CS * TS // 8)  # guest bytes one L2 table maps: 4 MiB
SIZE = 3 * L2_SPAN
SECTOR = 512
BACKING_SIZE = 10 * MiB  # shorter than the image: its tail reads zeros
BACKING_A = "backing-one.raw"  # named with format raw (no-probe bit set)
BACKING_B = "b2.raw"  # same bytes, shorter name, probed
KINDS = ("pread", "pwrite", "flush", "truncate", "punch_hole")
MUTATING = frozenset(KINDS[1:])
ERRNOS = (errno.EIO, errno.ENOSPC)
# A failed write's sectors may read old before a reopen and new after it: allowed by the
# sweep's rules (each sector old or new), counted and printed, and pinned down by
# test_failed_multi_sector_l2_update_leaves_the_open_image_reading_its_file.
UNSTABLE = "unstable: "


# -- the failing storage ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Fault:
    """Fail the ``index``-th call among calls of ``kinds`` (0-based) with ``code``."""

    index: int
    code: int = errno.EIO
    kinds: frozenset[str] = frozenset(KINDS)
    short: bool = False  # a failing pwrite first writes the first half, in whole sectors
    sticky: bool = False  # every later call of ``kinds`` fails as well
    also: int = -1  # a second index that fails too (transient)

    def label(self) -> str:
        kinds = "" if self.kinds == frozenset(KINDS) else "[" + ",".join(sorted(self.kinds)) + "]"
        extra = ("+short" if self.short else "") + ("+sticky" if self.sticky else "")
        also = f",#{self.also}" if self.also >= 0 else ""
        return f"{kinds}#{self.index}{also}:{errno.errorcode[self.code]}{extra}"


@dataclass(frozen=True, slots=True)
class Call:
    kind: str
    offset: int
    length: int


class FailingStorage:
    """A :class:`Storage` that passes calls to ``inner``, numbers them, and injects a fault."""

    def __init__(self, inner: Storage, fault: Fault | None = None) -> None:
        self.inner = inner
        self.fault = fault
        self.calls: list[Call] = []
        self.fired: list[int] = []  # positions in ``calls`` that raised an injected error
        self.fired_in_check: list[bool] = []  # ... and whether check() was on the stack
        self._matching = 0

    @property
    def read_only(self) -> bool:
        return self.inner.read_only

    def _gate(self, kind: str, offset: int, length: int, data: memoryview | None = None) -> None:
        self.calls.append(Call(kind, offset, length))
        f = self.fault
        if f is None or kind not in f.kinds:
            return
        n = self._matching
        self._matching += 1
        if n not in (f.index, f.also) and not (f.sticky and n > f.index):
            return
        self.fired.append(len(self.calls) - 1)
        self.fired_in_check.append(_check_on_stack())
        if data is not None and f.short:
            prefix = len(data) // 2 // SECTOR * SECTOR
            if prefix:
                self.inner.pwrite(data[:prefix], offset)
        raise ImageError(f.code, f"injected {errno.errorcode[f.code]} on {kind} #{n}")

    def arm(self, code: int, kinds: frozenset[str] | set[str], skip: int = 0, **kw: bool) -> None:
        """From now on: fail the call after the next ``skip`` calls of ``kinds``."""
        self.fault = Fault(skip, code, frozenset(kinds), **kw)
        self._matching = 0

    def pread(self, length: int, offset: int) -> bytes:
        self._gate("pread", offset, length)
        return self.inner.pread(length, offset)

    def pwrite(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        view = memoryview(data).cast("B")
        self._gate("pwrite", offset, len(view), view)
        self.inner.pwrite(view, offset)

    def flush(self) -> None:
        self._gate("flush", 0, 0)
        self.inner.flush()

    def punch_hole(self, offset: int, length: int) -> bool:
        self._gate("punch_hole", offset, length)
        return self.inner.punch_hole(offset, length)

    def truncate(self, length: int) -> None:
        self._gate("truncate", length, 0)
        self.inner.truncate(length)

    def length(self) -> int:
        return self.inner.length()

    def close(self) -> None:
        self.inner.close()

    def mutations(self) -> list[Call]:
        return [c for c in self.calls if c.kind in MUTATING]


def _check_on_stack() -> bool:
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_name == "check" and frame.f_code.co_filename.endswith(
            os.path.join("qed", "check.py")
        ):
            return True
        frame = frame.f_back  # type: ignore[assignment]  # None ends the loop
    return False


# -- what the guest may read -----------------------------------------------------------


def pattern(tag: int, pos: int, length: int) -> bytes:
    """Bytes unique to (tag, guest sector): a misplaced or stale sector cannot pass."""
    assert pos % SECTOR == 0 and length % SECTOR == 0
    first = pos // SECTOR
    return b"".join(struct.pack("<QQ", tag, first + i) * (SECTOR // 16) for i in range(length // SECTOR))


class Model:
    """The guest bytes a correct engine may show: exact, or per sector one of a few values."""

    def __init__(self, data: bytes, size: int, backing: tuple[str, bool]) -> None:
        self.data = bytearray(data)
        self._frozen: bytes | None = data
        self.alts: dict[int, set[bytes]] = {}  # sector -> allowed values besides data[...]
        self.sizes = {size}
        self.backings = {backing}

    def _grow(self, end: int) -> None:
        self._frozen = None
        if end > len(self.data):
            self.data.extend(bytes(end - len(self.data)))

    def commit(self, pos: int, new: bytes) -> None:
        self._grow(pos + len(new))
        self.data[pos : pos + len(new)] = new
        for s in range(pos // SECTOR, (pos + len(new)) // SECTOR):
            self.alts.pop(s, None)
        self.sizes = {s for s in self.sizes if s >= pos + len(new)} or self.sizes

    def maybe(self, pos: int, new: bytes) -> None:
        self._grow(pos + len(new))
        for i in range(0, len(new), SECTOR):
            value = new[i : i + SECTOR]
            s = (pos + i) // SECTOR
            if value != self.data[pos + i : pos + i + SECTOR]:
                self.alts.setdefault(s, set()).add(value)

    def resized(self, new_size: int, ok: bool) -> None:
        self._grow(new_size)
        self.sizes = {new_size} if ok else self.sizes | {new_size}

    def rebased(self, backing: tuple[str, bool], ok: bool) -> None:
        self.backings = {backing} if ok else self.backings | {backing}

    def mismatches(self, got: bytes, where: str, base: int = 0) -> list[str]:
        """What is wrong with ``got``, read from guest offset ``base`` (empty: nothing)."""
        out: list[str] = []
        if self._frozen is None:
            self._frozen = bytes(self.data)  # bytes == bytes is one memcmp; a memoryview is not
        ref = self._frozen[base : base + len(got)]
        if got == ref:
            return out
        chunk = 64 * KiB
        for c in range(0, len(got), chunk):
            if got[c : c + chunk] == ref[c : c + chunk]:
                continue
            for p in range(c, min(c + chunk, len(got)), SECTOR):
                value = got[p : p + SECTOR]
                sector = (base + p) // SECTOR
                if value == ref[p : p + SECTOR] or value in self.alts.get(sector, ()):
                    continue
                others = f" or one of {len(self.alts[sector])} others" if sector in self.alts else ""
                out.append(
                    f"{where}: guest sector 0x{base + p:x} reads {_describe(value)}, expected "
                    f"{_describe(ref[p : p + SECTOR])}{others}"
                )
                if len(out) > 4:
                    return out
        return out

    def verify_image(self, img: QedImage, where: str, pieces: list[bytes] | None = None) -> list[str]:
        """Read the whole image in 1 MiB pieces and compare; ``pieces`` collects what was read."""
        out: list[str] = []
        if img.size not in self.sizes:
            out.append(f"{where}: size {img.size}, expected one of {sorted(self.sizes)}")
        step = MiB
        for pos in range(0, img.size, step):
            got = img.read(pos, min(step, img.size - pos))
            if pieces is not None:
                pieces.append(got)
            out += self.mismatches(got, where, pos)
            if len(out) > 4:
                break
        return out


def _describe(sector: bytes) -> str:
    if not any(sector):
        return "zeros"
    tag, sec = struct.unpack_from("<QQ", sector)
    if sector == struct.pack("<QQ", tag, sec) * (SECTOR // 16):
        return f"pattern(tag={tag}, sector=0x{sec:x})"
    return f"other bytes {sector[:16].hex()}..."


# -- workloads ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Op:
    """One call on the image: write, zero, trim, flush, resize, rebase or read."""

    kind: str
    pos: int = 0
    length: int = 0
    tag: int = 0
    name: str = ""
    backing_format: str | None = None

    def data(self) -> bytes:
        return pattern(self.tag, self.pos, self.length)

    def label(self) -> str:
        if self.kind in ("write", "zero", "trim", "read"):
            return f"{self.kind}(0x{self.pos:x}+0x{self.length:x})"
        if self.kind == "resize":
            return f"resize(0x{self.length:x})"
        if self.kind == "rebase":
            return f"rebase({self.name!r})"
        return self.kind


def W(pos: int, length: int, tag: int) -> Op:
    return Op("write", pos, length, tag)


def Z(pos: int, length: int) -> Op:
    return Op("zero", pos, length)


def T(pos: int, length: int) -> Op:
    return Op("trim", pos, length)


def R(pos: int, length: int) -> Op:
    return Op("read", pos, length)


FLUSH = Op("flush")


@dataclass(frozen=True, slots=True)
class Workload:
    name: str
    template: str  # which template image it starts from
    ops: tuple[Op, ...]
    damaged: bool = False  # the template is corrupt until repaired: read-only reads may fail


WORKLOADS = (
    Workload(
        "alloc",
        "fresh",
        (W(0, 4 * KiB, 1), W(64 * KiB + 512, KiB, 2), W(8 * KiB, 12 * KiB, 3), FLUSH, W(0, 512, 4)),
    ),
    Workload(
        "alloc_backing",
        "backed",
        (
            W(4 * KiB + 512, KiB, 11),
            W(6 * MiB - 2 * KiB, 4 * KiB, 12),
            R(4 * KiB, 8 * KiB),
            FLUSH,
            W(6 * MiB - 512, KiB, 13),
        ),
    ),
    Workload(
        "inplace",
        "populated",
        (
            W(0, 4 * KiB, 21),
            W(12 * KiB - KiB, 3 * KiB, 22),
            FLUSH,
            W(4 * MiB + 4 * KiB, 8 * KiB, 23),
            R(0, 16 * KiB),
        ),
    ),
    Workload(
        "span_l2",
        "fresh",
        (
            W(L2_SPAN + 8 * KiB, 4 * KiB, 31),
            W(L2_SPAN - 6 * KiB, 12 * KiB, 32),
            W(2 * L2_SPAN - KiB, 2 * KiB, 33),
            W(L2_SPAN - 512, KiB, 34),
            R(L2_SPAN - 8 * KiB, 16 * KiB),
        ),
    ),
    Workload(
        "big",
        "populated",
        (W(MiB + 512, MiB + 256 * KiB, 41), W(MiB + 64 * KiB, 320 * KiB, 42), FLUSH),
    ),
    Workload(
        "zeroes",
        "populated_backed",
        (
            Z(0, 16 * KiB),
            Z(2 * MiB, 64 * KiB),
            Z(6 * MiB + 512, 9 * KiB),
            Z(4 * KiB + 512, KiB),
            Z(9 * MiB - 4 * KiB, 12 * KiB),
            R(0, 32 * KiB),
        ),
    ),
    Workload(
        "trim",
        "populated",
        (T(0, 16 * KiB), T(64 * KiB + 512, 8 * KiB), T(L2_SPAN, L2_SPAN), W(0, 4 * KiB, 51)),
    ),
    Workload(
        "resize",
        "populated",
        (
            W(32 * KiB, 4 * KiB, 61),
            Op("resize", length=20 * MiB),
            W(16 * MiB, 8 * KiB, 62),
            Op("resize", length=24 * MiB),
            W(SIZE - 2 * KiB, 4 * KiB, 63),
        ),
    ),
    Workload(
        "rebase",
        "populated_backed",
        (
            W(40 * KiB, 4 * KiB, 71),
            Op("rebase", name=BACKING_B),
            W(44 * KiB, 4 * KiB, 72),
            Op("rebase", name=BACKING_A, backing_format="raw"),
            W(48 * KiB, 4 * KiB, 73),
        ),
    ),
    Workload("close", "fresh", (W(0, 4 * KiB, 81),)),
    Workload("close_clean", "populated", (R(0, 8 * KiB), FLUSH)),
    Workload(
        "repair",
        "damaged",
        (W(132 * KiB, KiB, 91), W(128 * KiB, 4 * KiB, 92), R(0, 256 * KiB), FLUSH),
        damaged=True,
    ),
)
WORKLOAD_BY_NAME = {w.name: w for w in WORKLOADS}


# -- templates ---------------------------------------------------------------------------


def _u64(raw: bytes, offset: int) -> int:
    return int(struct.unpack_from("<Q", raw, offset)[0])


def _poke_u64(path: Path, offset: int, value: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack("<Q", value))


def _l2_entry_offset(raw: bytes, guest: int) -> int:
    """File offset of the L2 entry mapping ``guest`` (its table must exist)."""
    l1 = _u64(raw, 40)
    table = _u64(raw, l1 + 8 * (guest // L2_SPAN))
    assert table, f"no L2 table for guest 0x{guest:x}"
    return table + 8 * (guest % L2_SPAN // CS)


def build_templates(root: Path) -> dict[str, Path]:
    """Template images (and their backing files) in ``root``; every case copies one."""
    root.mkdir(parents=True, exist_ok=True)
    backing = pattern(9999, 0, BACKING_SIZE)
    for name in (BACKING_A, BACKING_B):
        (root / name).write_bytes(backing)
    out: dict[str, Path] = {}

    def make(name: str, writes: list[tuple[int, int, int]], **kw: str) -> Path:
        path = root / f"{name}.qed"
        create_image(str(path), SIZE, cluster_size=CS, table_size=TS, **kw)
        with QedImage.open(str(path)) as img:
            for pos, length, tag in writes:
                img.write(pos, pattern(tag, pos, length))
        out[name] = path
        return path

    populated = [
        (0, 16 * KiB, 101),
        (64 * KiB, 8 * KiB, 102),
        (L2_SPAN + 4 * KiB, 8 * KiB, 103),
        (9 * MiB, 4 * KiB, 104),
        (2 * MiB + 512, KiB, 105),
    ]
    make("fresh", [])
    make("backed", [], backing_file=BACKING_A, backing_format="raw")
    make("populated", populated)
    make("populated_backed", populated, backing_file=BACKING_A, backing_format="raw")
    # A dirty image with every kind of damage repair handles (qed.md §6; repair.py).
    damaged = make("damaged", populated)
    raw = damaged.read_bytes()
    end = len(raw) - len(raw) % CS
    _poke_u64(damaged, _l2_entry_offset(raw, 128 * KiB), end + 16 * CS)  # past the end of file
    _poke_u64(damaged, _l2_entry_offset(raw, 132 * KiB), _u64(raw, _l2_entry_offset(raw, 0)))  # dup
    _poke_u64(damaged, _l2_entry_offset(raw, 136 * KiB), _u64(raw, 40))  # into the L1 table
    _poke_u64(damaged, _l2_entry_offset(raw, 64 * KiB), 0)  # interior leak
    l1 = _u64(raw, 40)
    _poke_u64(damaged, l1 + 16, _u64(raw, l1 + 8))  # L1[2] shares L1[1]'s table
    with open(damaged, "r+b") as f:
        f.truncate(len(raw) + 3 * CS)  # leaked tail
    header = fmt.Header.decode(damaged.read_bytes()[: fmt.HEADER_BYTES])
    _poke_u64(damaged, 16, header.features | fmt.F_NEED_CHECK)
    return out


# -- one case ----------------------------------------------------------------------------


@dataclass
class Prepared:
    """A workload's starting image, the guest bytes it holds, and its I/O call count."""

    workload: Workload
    template: Path
    initial: bytes
    backing: tuple[str, bool]
    calls: list[Call] = field(default_factory=list)


def _backing_of(img: QedImage) -> tuple[str, bool]:
    return img.backing_name, bool(img.header.features & fmt.F_BACKING_FORMAT_NO_PROBE)


def _link_backings(template_dir: Path, workdir: Path) -> None:
    for name in (BACKING_A, BACKING_B):  # backing names resolve next to the image
        if not (workdir / name).exists():
            os.symlink(template_dir / name, workdir / name)


def prepare(work: Workload, templates: dict[str, Path], scratch: Path) -> Prepared:
    """The healthy run: the starting contents (after repair, for a damaged template) and
    the session's I/O calls, which number the fault points."""
    template = templates[work.template]
    copy = scratch / f"{work.name}-initial.qed"
    _link_backings(template.parent, scratch)
    shutil.copyfile(template, copy)
    with QedImage.open(str(copy)) as img:
        initial = img.read(0, img.size)
        backing = _backing_of(img)
    copy.unlink()
    prep = Prepared(work, template, initial, backing)
    result = run_case(prep, scratch, None)
    assert not result.violations, "the healthy run itself fails:\n" + "\n".join(result.violations)
    prep.calls = result.calls
    return prep


@dataclass
class CaseResult:
    violations: list[str]
    calls: list[Call]
    fired: int
    final_path: Path


def run_case(prep: Prepared, workdir: Path, fault: Fault | None) -> CaseResult:
    """One session with ``fault`` injected, then the checks with healthy storages."""
    work = prep.workload
    _link_backings(prep.template.parent, workdir)
    path = workdir / f"{work.name}.qed"
    shutil.copyfile(prep.template, path)
    model = Model(prep.initial, len(prep.initial), prep.backing)
    fs = FailingStorage(FileStorage(str(path)), fault)
    bad: list[str] = []

    def attempt(label: str, fn: Callable[[], object]) -> tuple[bool, object]:
        before = len(fs.fired)
        try:
            result = fn()
        except ImageError as exc:
            if not fs.fired:
                bad.append(f"{label}: raised {exc!r} with no fault injected")
            elif fault is not None and exc.errno != fault.code:
                bad.append(f"{label}: raised errno {exc.errno} ({exc}); injected {fault.code}")
            return False, None
        except Exception as exc:
            bad.append(f"{label}: raised {type(exc).__name__}: {exc} (not an ImageError)")
            return False, None
        swallowed = [
            i
            for i, in_check in zip(fs.fired[before:], fs.fired_in_check[before:], strict=True)
            if not (in_check and fs.calls[i].kind == "pread")
        ]
        if swallowed:
            call = fs.calls[swallowed[0]]
            bad.append(
                f"{label}: returned success although the injected {call.kind} failure "
                f"(I/O #{swallowed[0]}) happened inside it"
            )
        return True, result

    session: list[bytes] = []  # the last in-session read of the whole image
    ok, opened = attempt("open", lambda: QedImage(fs, str(path)))
    if not ok:
        fs.close()
    else:
        assert isinstance(opened, QedImage)
        img = opened
        for op in work.ops:
            _run_op(img, op, model, attempt, bad)
        found: list[str] = []
        attempt("read-all", lambda: found.extend(model.verify_image(img, "in-session read", session)))
        bad += found
        attempt("close", img.close)
    calls, fired = fs.calls, len(fs.fired)
    bad += verify_reopened(path, model, work, session)
    return CaseResult(bad, calls, fired, path)


def _run_op(
    img: QedImage,
    op: Op,
    model: Model,
    attempt: Callable[[str, Callable[[], object]], tuple[bool, object]],
    bad: list[str],
) -> None:
    label = op.label()
    if op.kind in ("write", "zero", "trim", "read") and op.pos + op.length > img.size:
        return  # only after a failed resize: the caller would get EINVAL; not a fault case
    if op.kind == "write":
        data = op.data()
        ok, _ = attempt(label, lambda: img.write(op.pos, data))
        (model.commit if ok else model.maybe)(op.pos, data)
    elif op.kind == "zero":
        zeros = bytes(op.length)
        ok, _ = attempt(label, lambda: img.write_zeroes(op.pos, op.length))
        (model.commit if ok else model.maybe)(op.pos, zeros)
    elif op.kind == "trim":
        attempt(label, lambda: img.trim(op.pos, op.length))
        model.maybe(op.pos, bytes(op.length))  # trimmed whole clusters may read zeros
    elif op.kind == "flush":
        attempt(label, img.flush)
    elif op.kind == "resize":
        ok, _ = attempt(label, lambda: img.resize(op.length))
        model.resized(op.length, ok)
    elif op.kind == "rebase":
        ok, _ = attempt(label, lambda: img.change_backing_file(op.name, op.backing_format))
        model.rebased((op.name, op.backing_format == "raw"), ok)
    elif op.kind == "read":
        ok, got = attempt(label, lambda: img.read(op.pos, op.length))
        if ok:
            assert isinstance(got, bytes)
            bad += model.mismatches(got, f"{label} after earlier operations", op.pos)
    else:
        raise AssertionError(op.kind)


def verify_reopened(path: Path, model: Model, work: Workload, session: list[bytes]) -> list[str]:
    """Read-only open (writes nothing, reads the model and what the session last read),
    then read-write open (repairs, reads the model, check clean, NEED_CHECK clear after
    close)."""
    bad: list[str] = []
    before = hashlib.sha256(path.read_bytes()).digest()
    counter = FailingStorage(FileStorage(str(path), read_only=True))
    ro_digest: list[bytes] = []
    try:
        img = QedImage(counter, str(path))
    except ImageError as exc:
        counter.close()
        bad.append(f"read-only open failed: {exc!r}")
    else:
        with img:
            if _backing_of(img) not in model.backings:
                bad.append(f"backing {_backing_of(img)}, expected one of {sorted(model.backings)}")
            if work.damaged:  # until repaired, a bad entry fails its read with EIO: fine
                for pos in range(0, img.size, MiB):
                    with contextlib.suppress(ImageError):
                        img.read(pos, min(MiB, img.size - pos))
            else:
                try:
                    bad += model.verify_image(img, "read-only reopen", ro_digest)
                except ImageError as exc:
                    bad.append(f"read-only read failed: {exc!r}")
    if ro_digest and session and len(ro_digest) == len(session) and ro_digest != session:
        where = next(i for i, (a, b) in enumerate(zip(ro_digest, session, strict=True)) if a != b)
        bad.append(
            f"{UNSTABLE}the reopened image reads other bytes than the session read last, in guest "
            f"MiB {where} (the open image's view differed from its file)"
        )
    if counter.mutations():
        bad.append(f"read-only open made mutating calls: {counter.mutations()[:3]}")
    if hashlib.sha256(path.read_bytes()).digest() != before:
        bad.append("read-only open changed the file")
    try:
        img = QedImage.open(str(path))
    except ImageError as exc:
        bad.append(f"read-write open failed: {exc!r}")
        return bad
    with img:
        rw_digest: list[bytes] = []
        bad += model.verify_image(img, "read-write reopen", rw_digest)
        if ro_digest and ro_digest != rw_digest:
            bad.append("the read-write open (repair) changed what the image reads")
        report = check(img)
        if report.corruptions or report.check_errors:
            bad.append(
                f"check after reopen: {report.corruptions} corruptions, "
                f"{report.check_errors} check errors: {report.findings[:3]}"
            )
    if fmt.Header.decode(path.read_bytes()[: fmt.HEADER_BYTES]).need_check:
        bad.append("NEED_CHECK still set after a clean read-write session")
    return bad


def faults_for(calls: list[Call], *, short: bool = True, sticky: bool = False) -> Iterator[Fault]:
    """Every fault point of a session: each call with each errno that call can return."""
    n_mutating = 0  # a sticky fault counts mutating calls only
    for i, call in enumerate(calls):
        codes = (errno.EIO,) if call.kind == "pread" else ERRNOS
        for code in codes:
            yield Fault(i, code)
            if sticky and call.kind != "pread":
                yield Fault(n_mutating, code, kinds=MUTATING, sticky=True)
        n_mutating += call.kind in MUTATING
        if short and call.kind == "pwrite" and call.length >= 2 * SECTOR:
            yield Fault(i, errno.ENOSPC, short=True)


def sticky_faults(calls: list[Call]) -> list[Fault]:
    return [f for f in faults_for(calls, short=False, sticky=True) if f.sticky]


def pair_faults(calls: list[Call], window: int = 12) -> list[Fault]:
    n = len(calls)
    return [Fault(i, errno.EIO, also=j) for i in range(n) for j in range(i + 1, min(n, i + 1 + window))]


# -- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def templates(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_templates(tmp_path_factory.mktemp("fault-templates"))


@pytest.fixture(scope="module")
def prepared(templates: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Prepared]:
    scratch = tmp_path_factory.mktemp("fault-prepare")
    return {w.name: prepare(w, templates, scratch) for w in WORKLOADS}


def _sweep(prep: Prepared, workdir: Path, faults: list[Fault]) -> tuple[int, list[str]]:
    failures: list[str] = []
    unstable = []
    for fault in faults:
        result = run_case(prep, workdir, fault)
        if result.fired == 0:
            failures.append(f"{prep.workload.name}{fault.label()}: the fault never fired")
        for v in result.violations:
            line = f"{prep.workload.name}{fault.label()}: {v}"
            (unstable if v.startswith(UNSTABLE) else failures).append(line)
    if unstable:
        print(f"{len(unstable)} cases where a failed write reads differently after a reopen:")
        print("\n".join(unstable))
    return len(faults), failures


def _report(name: str, n: int, failures: list[str]) -> None:
    print(f"fault injection {name}: {n} cases, {len(failures)} violations")
    if failures:
        shown = "\n".join(failures[:15])
        more = f"\n... and {len(failures) - 15} more" if len(failures) > 15 else ""
        pytest.fail(f"{len(failures)} violations in {n} cases of {name}:\n{shown}{more}", pytrace=False)


# -- the sweeps ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", [w.name for w in WORKLOADS])
def test_fault_at_every_io_index(name: str, prepared: dict[str, Prepared], tmp_path: Path) -> None:
    """Transient EIO and ENOSPC at every I/O index (preads: EIO), plus short writes."""
    prep = prepared[name]
    n, failures = _sweep(prep, tmp_path, list(faults_for(prep.calls)))
    _report(name, n, failures)


@pytest.mark.parametrize("name", [w.name for w in WORKLOADS])
def test_sticky_fault_at_every_io_index(name: str, prepared: dict[str, Prepared], tmp_path: Path) -> None:
    """A disk that stays failed (full, or dead): every mutating call from index N on fails."""
    prep = prepared[name]
    n, failures = _sweep(prep, tmp_path, sticky_faults(prep.calls))
    _report(name + " (sticky)", n, failures)


@pytest.mark.slow
@pytest.mark.parametrize("name", [w.name for w in WORKLOADS])
def test_two_faults_close_together(name: str, prepared: dict[str, Prepared], tmp_path: Path) -> None:
    """Two transient EIOs, at I/O N and at one of the next twelve: a failure while the
    engine is still going on after (or cleaning up from) the first."""
    prep = prepared[name]
    n, failures = _sweep(prep, tmp_path, pair_faults(prep.calls))
    _report(name + " (pairs)", n, failures)


@pytest.mark.interop
def test_qemu_img_check_agrees_on_a_sample(prepared: dict[str, Prepared], tmp_path: Path) -> None:
    """After the healthy reopen, qemu-img check finds no corruption and the same leaks."""
    ran = 0
    for prep in prepared.values():
        faults = list(faults_for(prep.calls))
        for fault in faults[:: max(1, len(faults) // 4)]:
            result = run_case(prep, tmp_path, fault)
            if any(not v.startswith(UNSTABLE) for v in result.violations):
                continue  # the sweep reports it
            out = qemu_img("check", "--output=json", "-f", "qed", result.final_path, check=False)
            assert out.returncode in (0, 3), f"{prep.workload.name}{fault.label()}: {out.stdout}{out.stderr}"
            theirs = json.loads(out.stdout)
            with QedImage.open(str(result.final_path), read_only=True) as img:
                ours = check(img)
            assert theirs.get("corruptions", 0) == 0 and theirs["check-errors"] == 0
            assert theirs.get("leaks", 0) == ours.leaks, (prep.workload.name, fault.label(), theirs)
            ran += 1
    print(f"qemu-img check sample: {ran} cases")
    assert ran >= 2 * len(prepared)


# -- the harness itself --------------------------------------------------------------------


def test_failing_storage_numbers_calls_and_fails_the_chosen_one(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(bytes(4 * KiB))
    fs = FailingStorage(
        FileStorage(str(path)), Fault(1, errno.ENOSPC, kinds=frozenset({"pwrite"}), short=True)
    )
    fs.pread(512, 0)  # not a pwrite: not counted
    fs.pwrite(b"\x01" * 2048, 0)  # pwrite #0
    with pytest.raises(ImageError) as exc:
        fs.pwrite(b"\x02" * 2048, 0)  # pwrite #1: fails after writing 1024 bytes
    assert exc.value.errno == errno.ENOSPC
    fs.pwrite(b"\x03" * 512, 3 * KiB)  # transient: #2 succeeds
    fs.close()
    assert path.read_bytes()[: 3 * KiB] == b"\x02" * 1024 + b"\x01" * 1024 + bytes(1024)
    assert [c.kind for c in fs.calls] == ["pread", "pwrite", "pwrite", "pwrite"]
    assert fs.fired == [2]

    sticky = FailingStorage(
        FileStorage(str(path)), Fault(0, errno.EIO, kinds=frozenset({"flush"}), sticky=True)
    )
    for _ in range(3):
        with pytest.raises(ImageError):
            sticky.flush()
    sticky.close()


def test_sweep_detects_an_error_swallowed_by_the_engine(
    prepared: dict[str, Prepared], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The oracle works: an engine that ignores a failed data write is caught."""
    prep = prepared["alloc"]
    original = QedImage.write

    def swallowing_write(self: QedImage, pos: int, data: bytes) -> None:
        with contextlib.suppress(ImageError):
            original(self, pos, data)

    monkeypatch.setattr(QedImage, "write", swallowing_write)
    first_pwrite_of_data = next(
        i for i, c in enumerate(prep.calls) if c.kind == "pwrite" and c.length == 4 * KiB
    )
    result = run_case(prep, tmp_path, Fault(first_pwrite_of_data, errno.EIO))
    assert any("returned success" in v for v in result.violations), result.violations
    assert any("read-write reopen: guest sector" in v for v in result.violations), result.violations


# -- focused cases -------------------------------------------------------------------------


def _fresh(tmp_path: Path, **kw: str) -> str:
    path = str(tmp_path / "img.qed")
    create_image(path, SIZE, cluster_size=CS, table_size=TS, **kw)
    return path


def _need_check_on_disk(path: str) -> bool:
    with open(path, "rb") as f:
        return fmt.Header.decode(f.read(fmt.HEADER_BYTES)).need_check


@pytest.mark.parametrize("code", ERRNOS)
def test_close_with_failing_flush_raises_and_keeps_need_check(tmp_path: Path, code: int) -> None:
    path = _fresh(tmp_path)
    img = QedImage(fs := FailingStorage(FileStorage(path)), path)
    img.write(0, pattern(1, 0, 4 * KiB))
    assert _need_check_on_disk(path)
    fs.arm(code, {"flush"})  # close's first flush, before the header is rewritten
    with pytest.raises(ImageError) as exc:
        img.close()
    assert exc.value.errno == code
    assert _need_check_on_disk(path)
    assert fs.calls[-1].kind == "flush"  # nothing was written after the failed flush
    img.close()  # closing again does nothing
    with QedImage.open(path) as again:
        assert again.read(0, 4 * KiB) == pattern(1, 0, 4 * KiB)


@pytest.mark.parametrize("code", ERRNOS)
def test_close_with_failing_header_write_raises_and_keeps_need_check(tmp_path: Path, code: int) -> None:
    path = _fresh(tmp_path)
    img = QedImage(fs := FailingStorage(FileStorage(path)), path)
    img.write(0, pattern(1, 0, 4 * KiB))
    fs.arm(code, {"pwrite"})
    with pytest.raises(ImageError) as exc:
        img.close()
    assert exc.value.errno == code
    assert fs.calls[fs.fired[0]].offset == 0  # it was the header write that failed
    assert _need_check_on_disk(path)


def test_flush_after_a_failed_flush_does_not_report_success(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After fdatasync fails, Linux may have dropped the dirty pages and marks them clean:
    the next fdatasync succeeds although the data never reached the disk. QEMU's file
    driver therefore fails every later flush (file-posix.c, page_cache_inconsistent); a
    later successful flush, or a close that clears NEED_CHECK, would report as durable
    data that may be lost."""
    path = _fresh(tmp_path)
    img = QedImage.open(path)
    img.write(0, pattern(1, 0, 4 * KiB))
    real = os.fdatasync
    failures = iter([True])

    def fdatasync_failing_once(fd: int) -> None:
        if next(failures, False):
            raise OSError(errno.EIO, "Input/output error")
        real(fd)

    monkeypatch.setattr(os, "fdatasync", fdatasync_failing_once)
    with pytest.raises(ImageError):
        img.flush()
    try:
        with pytest.raises(ImageError):
            img.flush()
    finally:
        with contextlib.suppress(ImageError):
            img.close()
    assert _need_check_on_disk(path), "close cleared NEED_CHECK after a failed flush"


def test_rebase_whose_flush_fails_then_close_leaves_a_valid_backing_name(tmp_path: Path) -> None:
    """change_backing_file writes header + name, then flushes; if the flush fails, the
    header on disk is already the new one. A later header write (here: close clearing
    NEED_CHECK) must not combine the old header fields with the new name bytes."""
    backing = pattern(9999, 0, MiB)
    for name in (BACKING_A, BACKING_B):
        (tmp_path / name).write_bytes(backing)
    path = _fresh(tmp_path, backing_file=BACKING_A, backing_format="raw")
    img = QedImage(fs := FailingStorage(FileStorage(path)), path)
    img.write(0, pattern(1, 0, 4 * KiB))  # dirty: close will rewrite the header
    fs.arm(errno.EIO, {"flush"})
    with pytest.raises(ImageError):
        img.change_backing_file(BACKING_B, None)
    img.close()
    with QedImage.open(path, read_only=True) as again:
        assert _backing_of(again) in {(BACKING_A, True), (BACKING_B, False)}
        assert again.read(0, 8 * KiB) == pattern(1, 0, 4 * KiB) + backing[4 * KiB : 8 * KiB]


def test_read_only_open_of_a_dirty_image_never_writes_even_when_reads_fail(
    prepared: dict[str, Prepared], tmp_path: Path
) -> None:
    """Each pread of a read-only session of a dirty image fails in turn: the error
    surfaces as EIO, and no call is a write (a read-only open never repairs)."""
    path = tmp_path / "dirty.qed"
    shutil.copyfile(prepared["inplace"].template, path)
    features = fmt.Header.decode(path.read_bytes()[: fmt.HEADER_BYTES]).features
    _poke_u64(path, 16, features | fmt.F_NEED_CHECK)
    before = path.read_bytes()
    probe = FailingStorage(FileStorage(str(path), read_only=True))
    with QedImage(probe, str(path)) as img:
        expect = img.read(0, SIZE)
    n = len(probe.calls)
    assert n > 5 and not probe.mutations()
    for i in range(n):
        fs = FailingStorage(FileStorage(str(path), read_only=True), Fault(i, errno.EIO))
        with pytest.raises(ImageError) as exc:
            img = QedImage(fs, str(path))
            try:
                img.read(0, SIZE)
            finally:
                img.close()
        assert exc.value.errno == errno.EIO, i
        assert not fs.mutations(), fs.mutations()
        with QedImage(FileStorage(str(path), read_only=True), str(path)) as again:
            assert again.read(0, SIZE) == expect
    readonly = FailingStorage(FileStorage(str(path), read_only=True))
    with QedImage(readonly, str(path)) as img, pytest.raises(ImageError) as exc:
        img.write(0, bytes(512))
    assert exc.value.errno == errno.EROFS and not readonly.mutations()
    assert path.read_bytes() == before


def test_continuing_after_a_failed_l2_update_stays_consistent(tmp_path: Path) -> None:
    """Allocating writes whose data write, then whose L2 sector write, fails; then more
    writes to the same and neighbouring clusters of that table through the same object;
    close, reopen, verify."""
    path = _fresh(tmp_path)
    img = QedImage(fs := FailingStorage(FileStorage(path)), path)
    img.write(0, pattern(1, 0, 4 * KiB))  # creates the L2 table
    raw = Path(path).read_bytes()
    table = _u64(raw, _u64(raw, 40))
    fs.arm(errno.EIO, {"pwrite"})
    with pytest.raises(ImageError):
        img.write(8 * KiB, pattern(2, 8 * KiB, 4 * KiB))  # the data write fails
    fs.arm(errno.ENOSPC, {"pwrite"}, skip=1)
    with pytest.raises(ImageError):
        img.write(8 * KiB, pattern(3, 8 * KiB, 4 * KiB))  # data lands, the L2 sector does not
    assert fs.calls[fs.fired[-1]].offset == table  # the failed call was the L2 sector
    fs.fault = None
    img.write(12 * KiB, pattern(4, 12 * KiB, 4 * KiB))  # same L2 sector, succeeds
    img.write(8 * KiB, pattern(5, 8 * KiB, 512))  # the cluster that failed twice
    got = img.read(0, 16 * KiB)
    img.close()
    expect = (
        pattern(1, 0, 4 * KiB)
        + bytes(4 * KiB)
        + pattern(5, 8 * KiB, 512)
        + bytes(3584)
        + pattern(4, 12 * KiB, 4 * KiB)
    )
    assert got == expect
    with QedImage.open(path) as again:
        assert again.read(0, 16 * KiB) == expect
        report = check(again)
        assert report.corruptions == 0 and report.check_errors == 0
        assert report.leaks == 2  # the data clusters of the two failed writes


def test_failed_multi_sector_l2_update_leaves_the_open_image_reading_its_file(tmp_path: Path) -> None:
    """An allocating write of 80 clusters into an existing L2 table changes entries in two
    512-byte sectors of it; that two-sector write is cut short after the first sector.
    The caller gets the error. The file now maps the first 60 clusters to the new data;
    the open image must read what its file says (its L2 cache must not keep entries the
    file no longer has), or reads of a range nobody wrote again change across a reopen."""
    path = _fresh(tmp_path)
    img = QedImage(fs := FailingStorage(FileStorage(path)), path)
    img.write(0, pattern(1, 0, 4 * KiB))  # creates the L2 table
    pos = 4 * CS  # entries 4..83: sector 0 holds 4..63, sector 1 holds 64..83
    data = pattern(2, pos, 80 * CS)
    fs.arm(errno.ENOSPC, {"pwrite"}, skip=1, short=True)  # #0: the data; #1: the L2 sectors
    with pytest.raises(ImageError) as exc:
        img.write(pos, data)
    assert exc.value.errno == errno.ENOSPC
    assert fs.calls[fs.fired[0]].length == 2 * SECTOR
    fs.fault = None
    in_session = img.read(pos, 80 * CS)
    img.close()
    with QedImage.open(path, read_only=True) as again:
        on_file = again.read(pos, 80 * CS)
    assert on_file[: 60 * CS] == data[: 60 * CS]  # the first L2 sector reached the file
    assert in_session == on_file


def test_cases_are_counted(prepared: dict[str, Prepared]) -> None:
    """How many (workload, index, errno) cases the default sweep runs (printed with -s)."""
    counts = {name: len(list(faults_for(p.calls))) for name, p in prepared.items()}
    sticky = sum(len(sticky_faults(p.calls)) for p in prepared.values())
    pairs = sum(len(pair_faults(p.calls)) for p in prepared.values())
    total = sum(counts.values())
    print(f"fault injection cases: {counts}, total {total}; sticky {sticky}; pairs (slow) {pairs}")
    assert all(counts.values())
    assert total >= 500 and sticky >= 300


# A repro for one case: python3 -c 'import ...; repro("alloc", Fault(17, errno.EIO))'
def repro(workload: str, fault: Fault, root: str = "/tmp/qed-fault-repro") -> list[str]:
    base = Path(root)
    if base.exists():
        shutil.rmtree(base)
    templates = build_templates(base / "templates")
    (base / "work").mkdir()
    prep = prepare(WORKLOAD_BY_NAME[workload], templates, base / "work")
    return run_case(prep, base / "work", fault).violations
