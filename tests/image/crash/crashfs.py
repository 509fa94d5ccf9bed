"""Crash-state enumeration for QED images (reliability.md §1.1/§1.2).

Pieces, bottom up:

* :class:`CrashStorage` implements the engine's ``Storage`` protocol in memory. It keeps
  ``durable`` (the bytes as of the last flush) and ``pending`` (writes, hole punches and
  truncates since then, in issue order); reads see durable + pending applied in order.
  Every call that changes the file is logged (:class:`Write`, :class:`Barrier`), each
  tagged with the guest operation that issued it, so a crash can be placed after any
  logged I/O and a state can be replayed from the log.
* :func:`point_choices` / :func:`iter_crash_states` turn a log into crash states: for a
  crash after log entry *i*, with *P* the writes since the last barrier, every subset of
  *P* that contains the last write (all smaller ones are states of an earlier crash
  point) when |P| ≤ 10, sampled beyond (always singletons, all-but-one, prefixes); torn
  writes (only the first k 512-byte host sectors of one write); and, for a write that
  extends the file, the new end of file without its data ("size before data").
* Workloads: a small op menu on tiny geometries; every 512-byte sector of written data
  carries 8-byte stamps (tag, generation, guest word index), so a read can tell which
  guest offset and which write its bytes came from. The guest model after every op is
  kept sparsely (sector → interned content, absent = the base: backing bytes or zeros).
* :class:`Enumerator` opens every distinct state read-write on a fresh
  :class:`CrashStorage` (a dirty state is checked and repaired by the open), and checks
  the invariants C1–C7 of reliability.md §1.2 (:func:`open_and_check`: C1, C7;
  :func:`allowed_violation`: C2–C5; :func:`c6_violation`: C6); a sample also goes
  through ``qemu-img check``. Distinct states are found by content hash; each state is
  opened once and its read-back kept sparsely, so every crash point that reaches it is
  checked against its own oracle. :func:`run_jobs` runs configurations in parallel.
* :class:`RepairCrashChecker` does the same for the I/O of a repair: every crash state of
  a repair of a damaged image must recover to exactly what a clean repair gives.

Unallocated extents past the backing file's end are not read (the engine fills them
with zeros without touching the image); everything else is read through the engine.

The oracle for C2/C3/C5 at a crash point inside (or right after) guest op *c*, with *f*
the last durability point acknowledged by then (a FLUSH, a FUA write, a resize or a
close, all of which flush the whole image): every sector must read as the model after some op in
*f..c*, or, byte by byte, as one of those models (two sub-sector writes to one sector are
independent pending writes here, so a crash may keep one and not the other). That is
exactly "flushed bytes read back, unless a later unflushed write covered them; never
durable bytes read as the old value (zeros/backing) or a later write".
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import itertools
import json
import logging
import multiprocessing
import os
import random
import struct
import subprocess
import sys
import time
from array import array
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from qednbd.errors import ImageError
from qednbd.qed import format as fmt
from qednbd.qed.check import check
from qednbd.qed.image import Kind, QedImage, create_image
from qednbd.qed.repair import RepairResult, repair

KiB = 1024
SECTOR = 512
CLUSTER = 4096
FULL = -1  # a pending write applied whole
SIZE_ONLY = -2  # an extending write whose new end of file persisted, but not its data
STAMP_TAG = 0xC5A5  # top 16 bits of every stamp word
SOAK = os.environ.get("QEDNBD_CRASH_SOAK", "") not in ("", "0")
SUMMARY: list[str] = []  # lines printed at the end of the session (see conftest.py)
_HEADER = struct.Struct("<IIIIQQQQQII")
_LITTLE = sys.byteorder == "little"


# -- stamps -----------------------------------------------------------------------------


def stamp(gen: int, pos: int, length: int) -> bytes:
    """Guest bytes [pos, pos+length) of generation ``gen``: one word per aligned 8 bytes."""
    lo = pos & ~7
    hi = (pos + length + 7) & ~7
    top = (STAMP_TAG << 48) | (gen << 32)
    words = array("Q", [top | w for w in range(lo >> 3, hi >> 3)])
    if not _LITTLE:
        words.byteswap()
    raw = words.tobytes()
    return raw[pos - lo : pos - lo + length]


def describe_word(word: bytes, guest_word_pos: int) -> str:
    """What an 8-byte aligned word read at ``guest_word_pos`` is."""
    value = int.from_bytes(word, "little")
    if value == 0:
        return "zeros"
    if value >> 48 == STAMP_TAG:
        gen = (value >> 32) & 0xFFFF
        where = (value & 0xFFFFFFFF) << 3
        if where != guest_word_pos:
            return f"C4: stamp of guest offset 0x{where:x} (generation {gen})"
        return f"generation {gen}"
    return f"C4: foreign bytes {word.hex()} (metadata?)"


# -- the storage --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Write:
    """A pending change: data at ``offset`` (a hole punch is zeros that never extend the
    file), or a truncate to ``length`` (``data`` is None)."""

    seq: int
    offset: int
    data: bytes | None
    length: int
    keep_size: bool = False
    op: int = 0  # the guest op that issued it (0: none)
    prev_len: int = 0  # the file length just before it was issued

    @property
    def is_truncate(self) -> bool:
        return self.data is None

    @property
    def end(self) -> int:
        return self.offset + self.length

    @property
    def extends(self) -> bool:
        return self.data is not None and not self.keep_size and self.end > self.prev_len

    def cuts(self) -> list[int]:
        """Byte counts of this write's first k host sectors, k = 1..n-1 (torn writes)."""
        if self.data is None:
            return []
        first = (self.offset // SECTOR + 1) * SECTOR
        return [b - self.offset for b in range(first, self.end, SECTOR)]

    def describe(self) -> str:
        if self.data is None:
            return f"#{self.seq} truncate({self.length}) [op {self.op}]"
        what = "punch" if self.keep_size else "write"
        return f"#{self.seq} {what} 0x{self.offset:x}+{self.length} [op {self.op}]"


@dataclass(frozen=True, slots=True)
class Barrier:
    """A completed flush; ``durable`` is the whole file after it."""

    seq: int
    durable: bytes
    op: int = 0

    def describe(self) -> str:
        return f"#{self.seq} flush [op {self.op}]"


LogEntry = Write | Barrier


def apply_write(buf: bytearray, w: Write, variant: int = FULL) -> None:
    """Apply one pending change (``variant``: FULL, SIZE_ONLY, or k torn sectors)."""
    if w.data is None:
        if w.length < len(buf):
            del buf[w.length :]
        else:
            buf.extend(bytes(w.length - len(buf)))
        return
    off = w.offset
    if variant == SIZE_ONLY:
        if w.end > len(buf):
            buf.extend(bytes(w.end - len(buf)))
        return
    data = w.data if variant == FULL else w.data[: w.cuts()[variant - 1]]
    if w.keep_size:
        data = data[: max(0, len(buf) - off)]
        if not data:
            return
    end = off + len(data)
    if off > len(buf):
        buf.extend(bytes(off - len(buf)))
    buf[off:end] = data


class CrashStorage:
    """The ``Storage`` protocol in memory, with a log of every change (module docstring)."""

    def __init__(self, durable: bytes | bytearray = b"", *, read_only: bool = False) -> None:
        self.durable = bytearray(durable)
        self._current = bytearray(durable)
        self.pending: list[Write] = []
        self.log: list[LogEntry] = []
        self.op = 0  # set by the workload driver: the guest op in progress
        self._read_only = read_only
        self._seq = 0

    @property
    def read_only(self) -> bool:
        return self._read_only

    @property
    def current(self) -> bytes:
        """What a read sees: durable with every pending change applied."""
        return bytes(self._current)

    def _record(self, w: Write) -> None:
        self.pending.append(w)
        self.log.append(w)
        self._seq += 1

    def pread(self, length: int, offset: int) -> bytes:
        data = bytes(self._current[offset : offset + length])
        return data if len(data) == length else data + bytes(length - len(data))

    def pwrite(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        assert not self._read_only, "write to a read-only CrashStorage"
        raw = bytes(data)
        w = Write(self._seq, offset, raw, len(raw), False, self.op, len(self._current))
        apply_write(self._current, w)
        self._record(w)

    def punch_hole(self, offset: int, length: int) -> bool:
        assert not self._read_only
        w = Write(self._seq, offset, bytes(length), length, True, self.op, len(self._current))
        apply_write(self._current, w)
        self._record(w)
        return True

    def truncate(self, length: int) -> None:
        assert not self._read_only
        w = Write(self._seq, 0, None, length, False, self.op, len(self._current))
        apply_write(self._current, w)
        self._record(w)

    def flush(self) -> None:
        if self.pending:
            self.durable[:] = self._current
            self.pending.clear()
        self.log.append(Barrier(self._seq, bytes(self.durable), self.op))
        self._seq += 1

    def length(self) -> int:
        return len(self._current)

    def close(self) -> None:
        pass


# -- crash states ---------------------------------------------------------------------------

Choice = tuple[int, int]  # (index into the epoch's pending list, variant)


def materialize(durable: bytes, pending: Sequence[Write], choices: Iterable[Choice]) -> bytes:
    buf = bytearray(durable)
    for index, variant in choices:
        apply_write(buf, pending[index], variant)
    return bytes(buf)


def point_choices(
    pending: Sequence[Write], rng: random.Random, full_limit: int = 10, samples: int = 64
) -> Iterator[tuple[Choice, ...]]:
    """Choice sets for a crash right after ``pending[-1]`` (module docstring).

    Yields tuples of (index, variant) sorted by index; duplicates are not yielded.
    """
    n = len(pending)
    last = n - 1
    seen: set[tuple[Choice, ...]] = set()

    def emit(c: Iterable[Choice]) -> Iterator[tuple[Choice, ...]]:
        t = tuple(sorted(c))
        if t not in seen:
            seen.add(t)
            yield t

    everything = [(i, FULL) for i in range(n)]
    if n <= full_limit:
        masks: Iterable[int] = range(1 << last)
    else:
        full = (1 << last) - 1
        chosen = {0, full}
        chosen.update(1 << j for j in range(last))
        chosen.update(full & ~(1 << j) for j in range(last))
        chosen.update((1 << j) - 1 for j in range(last))
        chosen.update(rng.getrandbits(last) for _ in range(samples))
        masks = sorted(chosen)
    for mask in masks:
        yield from emit([(j, FULL) for j in range(last) if mask >> j & 1] + [(last, FULL)])
    # torn writes: the last one with all earlier / alone; each earlier one with the rest
    for k in range(1, len(pending[last].cuts()) + 1):
        yield from emit([*everything[:last], (last, k)])
        yield from emit([(last, k)])
    for j in range(last):
        for k in range(1, len(pending[j].cuts()) + 1):
            yield from emit([*everything[:j], (j, k), *everything[j + 1 :]])
    # an extending write whose size persisted before its data
    for j in range(n):
        if pending[j].extends:
            yield from emit([*everything[:j], (j, SIZE_ONLY), *everything[j + 1 :]])
            if j == last:
                yield from emit([(last, SIZE_ONLY)])


@dataclass(frozen=True, slots=True)
class CrashState:
    point: int  # the log index the crash follows (-1: before any I/O)
    base: bytes  # durable bytes at the epoch's start
    pending: tuple[Write, ...]  # the epoch's writes up to the crash point
    choices: tuple[Choice, ...]
    data: bytes

    def describe(self, log: Sequence[LogEntry]) -> str:
        at = "before any I/O" if self.point < 0 else f"after {log[self.point].describe()}"
        if not self.pending:
            return f"crash {at}; nothing pending"
        kept = []
        for index, variant in self.choices:
            w = self.pending[index]
            how = {FULL: "", SIZE_ONLY: " (size only, no data)"}.get(variant, f" (first {variant} sectors)")
            kept.append(w.describe() + how)
        dropped = [w.describe() for i, w in enumerate(self.pending) if i not in dict(self.choices)]
        return f"crash {at}; pending kept: {kept or 'none'}; dropped: {dropped or 'none'}"


def epoch_of(log: Sequence[LogEntry], point: int, initial: bytes) -> tuple[bytes, list[Write]]:
    """Durable bytes at the last barrier at or before ``point``, and the writes after it."""
    pending: list[Write] = []
    i = point
    while i >= 0:
        entry = log[i]
        if isinstance(entry, Barrier):
            pending.reverse()
            return entry.durable, pending
        pending.append(entry)
        i -= 1
    pending.reverse()
    return initial, pending


def iter_crash_states(
    log: Sequence[LogEntry], points: Iterable[int], initial: bytes, seed: str, full_limit: int = 10
) -> Iterator[CrashState]:
    for point in points:
        base, pending = epoch_of(log, point, initial)
        if point < 0 or isinstance(log[point], Barrier):
            yield CrashState(point, base, (), (), base)
            continue
        rng = random.Random(f"{seed}/{point}")
        frozen = tuple(pending)
        for choices in point_choices(pending, rng, full_limit, samples=256 if SOAK else 64):
            yield CrashState(point, base, frozen, choices, materialize(base, pending, choices))


# -- workloads ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Op:
    name: str
    kind: str  # write, zero, trim, flush, fua, grow, idle
    pos: int = 0
    length: int = 0

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class Config:
    name: str
    table_size: int
    backing: bool

    @property
    def span(self) -> int:
        """Guest bytes one L2 table serves."""
        return CLUSTER * (CLUSTER * self.table_size // 8)

    @property
    def size(self) -> int:
        return 2 * self.span + 64 * KiB  # two L2 tables' worth and a bit of a third

    @property
    def max_size(self) -> int:
        return self.size + self.span  # after GROW

    @property
    def backing_size(self) -> int:
        return self.span + 64 * KiB + 1536 if self.backing else 0  # ends inside a cluster

    @property
    def qemu_can_open(self) -> bool:
        return fmt.qemu_can_open(CLUSTER, self.table_size, self.size)


CONFIGS = (
    Config("ts1", 1, False),
    Config("ts1-backing", 1, True),
    Config("ts2", 2, False),
    Config("ts2-backing", 2, True),
)


def menu(cfg: Config) -> dict[str, Op]:
    """The op menu (short, ACE-style), positions chosen for ``cfg``'s geometry."""
    c, s = CLUSTER, cfg.span
    ops = [
        Op("W0", "write", 0, c),  # cluster 0 whole: allocating, later in place
        Op("WPART", "write", c + 512, 1024),  # part of cluster 1: head and tail copied
        Op("WSPAN", "write", 2 * c + 2048, c),  # across clusters 2 and 3
        Op("WL2", "write", s - 2048, c),  # across the first two L2 tables
        Op("WODD", "write", 300, 700),  # unaligned, sub-sector edges, in cluster 0
        Op("W3", "write", 2 * s + 1024, 1024),  # the third L2 table
        Op("WBEND", "write", s + 64 * KiB + 2048, 512),  # the cluster where the backing file ends
        Op("WG", "write", cfg.size + c, c),  # the grown part (skipped before GROW)
        Op("ZERO", "zero", 0, 2 * c),  # whole clusters 0-1
        Op("ZODD", "zero", c + 1000, 2 * c),  # partial 1, whole 2, partial 3
        Op("ZL2", "zero", s - 2 * c, 4 * c),  # whole clusters across the first two L2 tables
        Op("TRIM", "trim", 0, 4 * c),
        Op("FLUSH", "flush"),
        Op("FUA", "fua", 2 * c + 512, 512),
        Op("GROW", "grow", 0, cfg.max_size),  # resize to this size (again: no change)
        Op("IDLE", "idle"),  # the server's idle timer: flush, clear NEED_CHECK, flush
        Op("REOPEN", "reopen"),  # close (flush, clear NEED_CHECK) and open again
    ]
    return {op.name: op for op in ops}


# Ops after whose return everything written before is durable: each ends in a flush of the
# whole image (a FUA write is a write and a flush; close flushes; resize flushes).
DURABLE_KINDS = frozenset({"flush", "fua", "grow", "reopen"})
CORE = ("W0", "WPART", "WL2", "WODD", "ZODD", "TRIM", "FLUSH", "FUA", "IDLE", "REOPEN")


class Interner:
    """Sector contents ↔ small ints, so models and read-backs are cheap to keep and compare."""

    def __init__(self) -> None:
        self.ids: dict[bytes, int] = {}
        self.values: list[bytes] = []

    def __call__(self, value: bytes) -> int:
        got = self.ids.get(value)
        if got is None:
            got = self.ids[value] = len(self.values)
            self.values.append(value)
        return got


class Env:
    """One configuration's files: the backing file (if any), the fresh image's bytes."""

    def __init__(self, cfg: Config, directory: Path) -> None:
        self.cfg = cfg
        self.dir = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.path = str(directory / "img.qed")
        base = bytearray(cfg.max_size)
        if cfg.backing:
            raw = stamp(0, 0, cfg.backing_size)
            (directory / "base.raw").write_bytes(raw)
            base[: len(raw)] = raw
            create_image(
                self.path,
                cfg.size,
                cluster_size=CLUSTER,
                table_size=cfg.table_size,
                backing_file="base.raw",
                backing_format="raw",
            )
        else:
            create_image(self.path, cfg.size, cluster_size=CLUSTER, table_size=cfg.table_size)
        self.template = Path(self.path).read_bytes()
        self.base = bytes(base)
        self.intern = Interner()
        self.menu = menu(cfg)
        self.base_id = -1  # "the base sector" in sparse maps

    def base_sector(self, s: int) -> bytes:
        return self.base[s * SECTOR : (s + 1) * SECTOR]

    def sector_bytes(self, s: int, ident: int) -> bytes:
        return self.base_sector(s) if ident == self.base_id else self.intern.values[ident]

    # -- sparse models --------------------------------------------------------------------

    def overlay(self, model: dict[int, int], pos: int, data: bytes) -> None:
        end = pos + len(data)
        for s in range(pos // SECTOR, (end + SECTOR - 1) // SECTOR):
            lo = max(pos, s * SECTOR)
            hi = min(end, (s + 1) * SECTOR)
            if hi - lo == SECTOR:
                new = data[lo - pos : hi - pos]
            else:
                cur = bytearray(self.sector_bytes(s, model.get(s, self.base_id)))
                cur[lo - s * SECTOR : hi - s * SECTOR] = data[lo - pos : hi - pos]
                new = bytes(cur)
            if new == self.base_sector(s):
                model.pop(s, None)
            else:
                model[s] = self.intern(new)

    def model_bytes(self, model: dict[int, int], pos: int, length: int) -> bytes:
        out = bytearray(self.base[pos : pos + length])
        for s in range(pos // SECTOR, (pos + length + SECTOR - 1) // SECTOR):
            ident = model.get(s)
            if ident is not None:
                lo = max(pos, s * SECTOR)
                hi = min(pos + length, (s + 1) * SECTOR)
                out[lo - pos : hi - pos] = self.intern.values[ident][lo - s * SECTOR : hi - s * SECTOR]
        return bytes(out)

    # -- read-back -------------------------------------------------------------------------

    def read_back(self, image: QedImage) -> tuple[tuple[int, int], ...]:
        """The image's guest bytes as a sparse diff against the base: ((sector, id), ...).

        Every extent is read except unallocated ones past the backing file's end, which
        the engine's read path fills with zeros without looking at the image (reading
        them would only cost time); the base is zeros there too.
        """
        size = image.size
        base = self.base
        skip_from = self.cfg.backing_size
        chunk = 64 * KiB
        out: list[tuple[int, int]] = []
        for ext in image.block_status(0, size):
            start, end = ext.offset, ext.offset + ext.length
            if ext.kind == Kind.UNALLOCATED:
                end = min(end, max(start, skip_from))
            for big in range(start, end, 16 * chunk):
                data = image.read(big, min(16 * chunk, end - big))
                for rel in range(0, len(data), chunk):
                    got = data[rel : rel + chunk]
                    pos = big + rel
                    if got == base[pos : pos + len(got)]:
                        continue
                    for lo in range(0, len(got), SECTOR):
                        sector = got[lo : lo + SECTOR]
                        if sector != base[pos + lo : pos + lo + SECTOR]:
                            out.append(((pos + lo) // SECTOR, self.intern(sector)))
        out.sort()
        return tuple(out)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass(frozen=True)
class Start:
    """Where a workload begins: the fresh image, or a state recovered after a crash."""

    label: str
    data: bytes
    model: tuple[tuple[int, int], ...] = ()  # its guest bytes (sparse, as read back)


@dataclass
class Trace:
    """A workload's run: the log of its I/O and the guest model after every op."""

    ops: tuple[Op, ...]
    start: Start
    log: list[LogEntry]
    models: list[dict[int, int]]  # models[k]: guest bytes after op k (k=0: before any)
    sizes: list[int]
    durable: list[bool]  # durable[k]: op k is a durability point
    last_entry: list[int]  # last log index of op k, -1 if it did no I/O
    error: str | None = None  # the workload itself failed (a bug outside any crash)

    @property
    def initial(self) -> bytes:
        return self.start.data

    def op_of(self, point: int) -> int:
        return 0 if point < 0 else self.log[point].op

    def oracle(self, point: int) -> tuple[int, int]:
        """(f, c): the last acknowledged durability op, and the op in flight or just done.

        An op whose last I/O is the crash point counts as acknowledged (the stricter
        oracle: the same state is also reachable right after the acknowledgement).
        """
        c = self.op_of(point)
        acked = c if point >= 0 and self.last_entry[c] == point else c - 1
        f = 0
        for k in range(acked, 0, -1):
            if self.durable[k]:
                f = k
                break
        return f, c

    def describe_ops(self) -> str:
        ops = " ; ".join(f"{op.name}({op.kind} 0x{op.pos:x}+{op.length})" for op in self.ops)
        return ops if self.start.label == "fresh" else f"[from {self.start.label}] {ops}"


def fresh(env: Env) -> Start:
    return Start("fresh", env.template)


def run_workload(env: Env, ops: Sequence[Op], start: Start | None = None) -> Trace:
    """Run ``ops`` on a :class:`CrashStorage` holding ``start`` (default: the fresh image)."""
    start = start or fresh(env)
    storage = CrashStorage(start.data)
    clock = FakeClock()
    image = QedImage(storage, env.path, clock=clock)
    model = dict(start.model)
    trace = Trace(tuple(ops), start, storage.log, [dict(model)], [image.size], [False], [-1])
    gen = 0
    try:
        for index, op in enumerate(ops, 1):
            storage.op = index
            clock.now += 0.001
            if op.kind in ("write", "zero", "trim", "fua") and op.pos + op.length > image.size:
                pass  # outside the image (before GROW): the op is left out
            elif op.kind in ("write", "fua"):
                gen += 1
                data = stamp(gen, op.pos, op.length)
                image.write(op.pos, data)
                env.overlay(model, op.pos, data)
                if op.kind == "fua":
                    image.flush()
            elif op.kind == "zero":
                image.write_zeroes(op.pos, op.length)
                env.overlay(model, op.pos, bytes(op.length))
            elif op.kind == "trim":
                before = env.model_bytes(model, op.pos, op.length)
                image.trim(op.pos, op.length)
                after = image.read(op.pos, op.length)
                trim_check(op, before, after)
                env.overlay(model, op.pos, after)
            elif op.kind == "flush":
                image.flush()
            elif op.kind == "grow":
                image.resize(op.length)
            elif op.kind == "idle":
                clock.now += 10.0
                image.poll_idle()
            elif op.kind == "reopen":
                image.close()
                image = QedImage(storage, env.path, clock=clock)
            else:
                raise ValueError(op.kind)
            trace.models.append(dict(model))
            trace.sizes.append(image.size)
            trace.durable.append(op.kind in DURABLE_KINDS)
            did_io = bool(storage.log) and storage.log[-1].op == index
            trace.last_entry.append(len(storage.log) - 1 if did_io else -1)
        storage.op = 0
        got = env.read_back(image)
        if got != tuple(sorted(model.items())) or image.size != trace.sizes[-1]:
            trace.error = "the workload (no crash) does not read back its model"
    except (ImageError, AssertionError) as exc:
        trace.error = f"the workload (no crash) failed: {exc!r}"
    finally:
        if image.backing is not None:
            image.backing.close()
    trace.log = list(storage.log)
    return trace


def trim_check(op: Op, before: bytes, after: bytes) -> None:
    """A trim leaves each whole cluster as it was or zeros, and partial clusters as they were."""
    end = op.pos + op.length
    pos = op.pos
    while pos < end:
        nxt = min(end, (pos // CLUSTER + 1) * CLUSTER)
        old, new = before[pos - op.pos : nxt - op.pos], after[pos - op.pos : nxt - op.pos]
        whole = nxt - pos == CLUSTER
        if new != old and not (whole and new == bytes(len(new))):
            raise AssertionError(f"trim made guest 0x{pos:x} read neither its old bytes nor zeros")
        pos = nxt


# -- checking one state ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StateResult:
    error: str | None  # a structural invariant (C1, C7) failed, or the read failed
    size: int = 0
    diff: tuple[tuple[int, int], ...] = ()
    dirty: bool = False  # NEED_CHECK set in the crash state
    repaired: bool = False  # the open changed more than the header
    final: bytes = b""  # the file after open + repairs (kept only for qemu samples)


def header_of(data: bytes) -> fmt.Header | None:
    if len(data) < fmt.HEADER_BYTES:
        return None
    return fmt.Header.decode(data[: fmt.HEADER_BYTES])


def open_and_check(env: Env, data: bytes, keep_final: bool = False) -> StateResult:
    """C1 (opens; check clean after the auto-repair), the read-back, C7 (repair idempotent)."""
    h = header_of(data)
    dirty = bool(h is not None and h.need_check)
    storage = CrashStorage(data)
    try:
        image = QedImage(storage, env.path, clock=FakeClock())
    except ImageError as exc:
        return StateResult(f"C1: open failed: {exc.message}", dirty=dirty)
    except Exception as exc:
        return StateResult(f"C1: open raised {exc!r}", dirty=dirty)
    try:
        opened = storage.current
        repaired = len(opened) != len(data) or opened[fmt.HEADER_BYTES :] != data[fmt.HEADER_BYTES :]
        report = check(image)
        if report.corruptions or report.check_errors:
            kinds = sorted({f.kind.value for f in report.findings})
            return StateResult(
                f"C1: after open, check finds {report.corruptions} corruptions, "
                f"{report.check_errors} check errors ({', '.join(kinds)})",
                dirty=dirty,
            )
        try:
            diff = env.read_back(image)
        except ImageError as exc:
            return StateResult(f"C1: a read after open failed: {exc.message}", dirty=dirty)
        size = image.size
        if not dirty:
            repair(image, "all")  # the first repair (the open did none)
        first = storage.current
        second = repair(image, "all")
        if storage.current != first:
            return StateResult(f"C7: a second repair changed the file: {second.summary()}", size, diff, dirty)
        if second.after.corruptions or second.after.check_errors:
            return StateResult(f"C7: check after repair: {second.after.corruptions} corruptions", size, diff)
        if first != opened and env.read_back(image) != diff:
            return StateResult("C7: a repair after the open changed what the guest reads", size, diff, dirty)
        return StateResult(None, size, diff, dirty, repaired, storage.current if keep_final else b"")
    except ImageError as exc:
        return StateResult(f"C1/C7: {exc.message}", dirty=dirty)
    except Exception as exc:  # an engine bug: reported with the state that triggers it
        return StateResult(f"C1/C7: raised {exc!r}", dirty=dirty)
    finally:
        if image.backing is not None:
            image.backing.close()


def allowed_violation(
    env: Env, result: StateResult, models: Sequence[dict[int, int]], sizes: Sequence[int]
) -> str | None:
    """C2/C3/C4/C5: each sector reads as one of ``models``, or byte by byte so (docstring)."""
    if result.size not in sizes:
        return f"C2: image size {result.size}, expected one of {sorted(set(sizes))}"
    got = dict(result.diff)
    limit = result.size // SECTOR
    sectors = set(got)
    for m in models:
        sectors.update(s for s in m if s < limit)
    for s in sorted(sectors):
        r = got.get(s, env.base_id)
        cands = {m.get(s, env.base_id) for m in models}
        if r in cands:
            continue
        rb = env.sector_bytes(s, r)
        cb = [env.sector_bytes(s, c) for c in cands]
        bad = [i for i in range(SECTOR) if all(rb[i] != c[i] for c in cb)]
        if not bad:
            continue  # a mix of sub-sector writes, each byte from an allowed write
        word = bad[0] & ~7
        pos = s * SECTOR + word
        what = describe_word(rb[word : word + 8], pos)
        allowed = sorted({describe_word(c[word : word + 8], pos) for c in cb})
        kind = what.split(":")[0] if what.startswith("C4") else "C2/C3/C5"
        return f"{kind}: guest 0x{pos:x} reads {what}; allowed: {allowed}"
    return None


def c6_violation(state: CrashState) -> str | None:
    """C6: with NEED_CHECK clear, no entry is invalid or newer than the data it points at."""
    data = state.data
    h = header_of(data)
    if h is None or h.magic != fmt.MAGIC or h.need_check:
        return None
    try:
        fmt.validate_header(h, len(data))
    except ImageError:
        return None  # C1 reports it
    cs, ts = h.cluster_size, h.table_size
    file_size = fmt.usable_file_size(len(data), cs)
    kept = dict(state.choices)

    def not_durable_before(entry_pos: int, target: int, n: int) -> str | None:
        if data[entry_pos : entry_pos + 8] == state.base[entry_pos : entry_pos + 8]:
            return None  # an old entry: dropped writes behind it are ordinary data loss
        setter = max(
            (
                i
                for i, w in enumerate(state.pending)
                if w.data is not None and w.offset <= entry_pos < w.end and i in kept
            ),
            default=None,
        )
        if setter is None:
            return None
        for i, w in enumerate(state.pending[:setter]):
            if w.data is not None and w.offset < target + n and target < w.end and kept.get(i) != FULL:
                setter_write = state.pending[setter].describe()
                return f"entry at 0x{entry_pos:x} ({setter_write}) is durable before {w.describe()}"
        return None

    l1 = h.l1_table_offset
    n_entries = cs * ts // 8
    for i in range(n_entries):
        pos = l1 + 8 * i
        v = int.from_bytes(data[pos : pos + 8], "little")
        if not v:
            continue
        if not fmt.table_offset_valid(v, h, file_size):
            return f"C6: NEED_CHECK clear but L1[{i}] = 0x{v:x} is invalid (file {len(data)} bytes)"
        bad = not_durable_before(pos, v, cs * ts)
        if bad:
            return f"C6: NEED_CHECK clear but L1[{i}]: {bad}"
        for j in range(n_entries):
            p2 = v + 8 * j
            e = int.from_bytes(data[p2 : p2 + 8], "little")
            if e in (0, 1):
                continue
            if not fmt.cluster_offset_valid(e, h, file_size):
                return (
                    f"C6: NEED_CHECK clear but L2 entry 0x{p2:x} = 0x{e:x} is invalid "
                    f"(file {len(data)} bytes)"
                )
            bad = not_durable_before(p2, e, cs)
            if bad:
                return f"C6: NEED_CHECK clear but L2 entry: {bad}"
    return None


# -- qemu-img check on a sample ---------------------------------------------------------------------


def qemu_check(env: Env, final: bytes, name: str) -> str | None:
    path = env.dir / name
    path.write_bytes(final)
    try:
        proc = subprocess.run(
            ["qemu-img", "check", "-f", "qed", "--output=json", str(path)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        path.unlink()
    try:
        out = json.loads(proc.stdout)
    except ValueError:
        return f"qemu-img check rc={proc.returncode}: {proc.stderr.strip()}"
    if out.get("corruptions", 0) or out.get("check-errors", 0) or proc.returncode not in (0, 3):
        return f"qemu-img check after our repair: {out} (rc {proc.returncode})"
    return None


# -- the enumerator -------------------------------------------------------------------------------------


@dataclass
class Violation:
    invariant: str
    message: str
    config: str
    ops: str
    state: str
    n_ops: int
    n_choices: int

    def __str__(self) -> str:
        return f"[{self.config}] {self.message}\n    ops: {self.ops or '(none)'}\n    {self.state}"


@dataclass
class Stats:
    workloads: int = 0
    enumerated: int = 0  # (crash point, choice set) pairs checked
    distinct: int = 0  # distinct states (by content) opened and checked
    failed: int = 0  # distinct states with at least one violation
    repaired: int = 0  # distinct states whose open had to repair more than the dirty bit
    qemu_checked: int = 0
    seconds: float = 0.0
    violations: list[Violation] = field(default_factory=list)

    @property
    def passed(self) -> int:
        return self.distinct - self.failed

    def add(self, other: Stats) -> None:
        self.workloads += other.workloads
        self.enumerated += other.enumerated
        self.distinct += other.distinct
        self.failed += other.failed
        self.repaired += other.repaired
        self.qemu_checked += other.qemu_checked
        self.seconds += other.seconds
        self.violations += other.violations

    def line(self, label: str) -> str:
        return (
            f"{label}: {self.workloads} workloads, {self.enumerated} crash states enumerated, "
            f"{self.distinct} distinct, {self.passed} passed, {self.failed} failed "
            f"({len(self.violations)} violations), {self.repaired} needed a real repair, "
            f"{self.qemu_checked} also checked by qemu-img, {self.seconds:.1f} s"
        )

    def minimal(self) -> list[Violation]:
        """The smallest reproduction of each kind of violation (per configuration)."""
        best: dict[str, Violation] = {}
        for v in self.violations:
            key = f"{v.invariant}|{v.config}"
            cur = best.get(key)
            if cur is None or (v.n_ops, v.n_choices) < (cur.n_ops, cur.n_choices):
                best[key] = v
        return sorted(best.values(), key=lambda v: (v.invariant, v.config))


def violation_kind(message: str) -> str:
    return message.split(":", 1)[0].strip()


class StateChecker:
    """Opens and checks each distinct state once (by content); keeps the counters."""

    def __init__(self, env: Env, qemu_every: int = 200, qemu_max: int = 20) -> None:
        self.env = env
        self.cache: dict[bytes, StateResult] = {}
        self.failed_keys: set[bytes] = set()
        self.stats = Stats()
        self.qemu_every = qemu_every
        self.qemu_max = qemu_max if env.cfg.qemu_can_open else 0

    def result(self, data: bytes) -> tuple[bytes, StateResult]:
        key = hashlib.blake2b(data, digest_size=16).digest()
        got = self.cache.get(key)
        if got is None:
            n = self.stats.distinct
            sample = self.stats.qemu_checked < self.qemu_max and n % self.qemu_every == 0
            got = open_and_check(self.env, data, keep_final=sample)
            if sample and got.error is None:
                bad = qemu_check(self.env, got.final, f"sample-{n}.qed")
                self.stats.qemu_checked += 1
                if bad:
                    got = StateResult(f"C1 (qemu-img): {bad}", got.size, got.diff, got.dirty, got.repaired)
            if got.final:
                got = StateResult(got.error, got.size, got.diff, got.dirty, got.repaired)
            self.cache[key] = got
            self.stats.distinct += 1
            self.stats.repaired += got.repaired
        return key, got

    def record(
        self,
        key: bytes,
        messages: Sequence[str],
        config: str,
        ops: str,
        state: str,
        n_ops: int,
        n_choices: int,
    ) -> None:
        for msg in messages:
            self.stats.violations.append(
                Violation(violation_kind(msg), msg, config, ops, state, n_ops, n_choices)
            )
        if messages and key not in self.failed_keys:
            self.failed_keys.add(key)
            self.stats.failed += 1


class Enumerator(StateChecker):
    """Enumerates and checks the crash states of workloads on one :class:`Env`."""

    def __init__(self, env: Env, qemu_every: int = 200, qemu_max: int = 20, keep_dirty: int = 0) -> None:
        super().__init__(env, qemu_every, qemu_max)
        self.keep_dirty = keep_dirty
        self.dirty_states: list[tuple[str, bytes]] = []  # for the crash-during-repair test

    def run(self, ops: Sequence[Op], points: str = "last", start: Start | None = None) -> Trace:
        """Check crash points in the last op (``points="last"``: the earlier ops' are the
        prefix's, enumerated when it ran) or everywhere (``"all"``)."""
        trace = run_workload(self.env, ops, start)
        self.stats.workloads += 1
        if trace.error:
            self.record(
                b"workload",
                [f"WORKLOAD: {trace.error}"],
                self.env.cfg.name,
                trace.describe_ops(),
                "no crash",
                len(ops),
                0,
            )
            return trace
        n = len(ops)
        if points == "last" and n:
            crash_points = [i for i, e in enumerate(trace.log) if e.op == n]
        else:
            crash_points = [-1, *range(len(trace.log))]
        seed = f"{self.env.cfg.name}/{trace.describe_ops()}"
        for state in iter_crash_states(trace.log, crash_points, trace.initial, seed):
            self.check_state(trace, state)
        return trace

    def check_state(self, trace: Trace, state: CrashState) -> None:
        self.stats.enumerated += 1
        key, res = self.result(state.data)
        bad: list[str] = []
        if res.error:
            bad.append(res.error)
        else:
            f, c = trace.oracle(state.point)
            msg = allowed_violation(self.env, res, trace.models[f : c + 1], trace.sizes[f : c + 1])
            if msg:
                bad.append(msg)
            if res.repaired and len(self.dirty_states) < self.keep_dirty:
                label = f"{trace.describe_ops()} / {state.describe(trace.log)}"
                self.dirty_states.append((label, state.data))
        c6 = c6_violation(state)
        if c6:
            bad.append(c6)
        self.record(
            key,
            bad,
            self.env.cfg.name,
            trace.describe_ops(),
            state.describe(trace.log),
            len(trace.ops),
            len(state.choices),
        )


def sequences(names: Sequence[str], max_len: int) -> list[tuple[str, ...]]:
    out: list[tuple[str, ...]] = []
    for length in range(1, max_len + 1):
        out += itertools.product(names, repeat=length)
    return out


def plan(names_by_len: Sequence[tuple[Sequence[str], int]]) -> list[tuple[str, ...]]:
    """The union of "every sequence of NAMES up to LEN ops", shortest first, no repeats."""
    seen: set[tuple[str, ...]] = set()
    for names, max_len in names_by_len:
        seen.update(sequences(names, max_len))
    return sorted(seen, key=lambda seq: (len(seq), seq))


@dataclass(frozen=True)
class Job:
    cfg: Config
    directory: Path
    seqs: tuple[tuple[str, ...], ...]
    qemu_every: int = 200
    qemu_max: int = 20


class quiet_repair_log:
    """Recovery logs a line per repaired state; thousands of them are noise here."""

    def __enter__(self) -> None:
        self.logger = logging.getLogger("qednbd.qed.repair")
        self.level = self.logger.level
        self.logger.setLevel(logging.ERROR)

    def __exit__(self, *exc: object) -> None:
        self.logger.setLevel(self.level)


def run_job(job: Job) -> Stats:
    """Every sequence of the job on a fresh image; the initial state too."""
    start = time.monotonic()
    with quiet_repair_log():
        env = Env(job.cfg, job.directory)
        en = Enumerator(env, job.qemu_every, job.qemu_max)
        en.run([], points="all")
        for seq in job.seqs:
            en.run([env.menu[name] for name in seq])
    en.stats.seconds = time.monotonic() - start
    return en.stats


def run_jobs(jobs: Sequence[Job]) -> list[Stats]:
    """Run jobs in parallel processes (one per core, fork), or inline on one core."""
    workers = min(len(jobs), os.cpu_count() or 1)
    if workers <= 1 or "fork" not in multiprocessing.get_all_start_methods():
        return [run_job(job) for job in jobs]
    context = multiprocessing.get_context("fork")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        return list(pool.map(run_job, jobs))


# -- crashes during repair ---------------------------------------------------------------------------


@dataclass
class RepairRun:
    """A clean repair of a damaged image: what it did, its I/O, and what the guest then reads."""

    result: RepairResult
    log: list[LogEntry]
    size: int
    diff: tuple[tuple[int, int], ...]
    kinds: list[Kind]  # each guest cluster's allocation after the repair


def cluster_kinds(image: QedImage) -> list[Kind]:
    kinds: list[Kind] = []
    for ext in image.block_status(0, image.size):
        kinds += [ext.kind] * (-(-(ext.offset + ext.length) // CLUSTER) - len(kinds))
    return kinds


def clean_repair(env: Env, damaged: bytes) -> RepairRun:
    storage = CrashStorage(damaged)
    image = QedImage(storage, env.path, recover=False, clock=FakeClock())
    try:
        result = repair(image, "all")
        return RepairRun(result, list(storage.log), image.size, env.read_back(image), cluster_kinds(image))
    finally:
        if image.backing is not None:
            image.backing.close()


def damaged_reads(env: Env, damaged: bytes) -> dict[int, tuple[Kind, bytes]]:
    """What each guest cluster of a damaged image reads (read-only, no repair); clusters
    whose read fails are left out."""
    image = QedImage(CrashStorage(damaged, read_only=True), env.path, recover=False, clock=FakeClock())
    out: dict[int, tuple[Kind, bytes]] = {}
    try:
        for c in range(-(-image.size // CLUSTER)):
            pos = c * CLUSTER
            n = min(CLUSTER, image.size - pos)
            try:
                kind = image.block_status(pos, n)[0].kind
                out[c] = (kind, image.read(pos, n))
            except ImageError:
                continue
    finally:
        if image.backing is not None:
            image.backing.close()
    return out


class RepairCrashChecker(StateChecker):
    """Crash states of a repair's own I/O must recover to what a clean repair gives."""

    def run(self, label: str, damaged: bytes) -> RepairRun | None:
        self.stats.workloads += 1
        name = self.env.cfg.name
        try:
            before = damaged_reads(self.env, damaged)
            ref = clean_repair(self.env, damaged)
        except ImageError as exc:
            msg = f"REPAIR: a clean repair failed: {exc.message}"
            self.record(b"repair", [msg], name, label, "no crash", 0, 0)
            return None
        after = ref.result.after
        if after.corruptions or after.check_errors:
            self.record(
                b"repair",
                [f"REPAIR: a clean repair leaves {after.corruptions} corruptions"],
                name,
                label,
                "no crash",
                0,
                0,
            )
        kept = self.kept_reads_differ(before, ref)
        if kept:
            self.record(b"repair", [kept], name, label, "no crash", 0, 0)
        seed = f"{name}/{label}"
        for state in iter_crash_states(ref.log, [-1, *range(len(ref.log))], damaged, seed):
            self.stats.enumerated += 1
            key, res = self.result(state.data)
            bad = [res.error] if res.error else []
            if not bad and (res.size, res.diff) != (ref.size, ref.diff):
                bad.append(self.difference(res, ref))
            where = state.describe(ref.log)
            self.record(key, bad, name, f"repair of {label}", where, 1, len(state.choices))
        return ref

    def kept_reads_differ(self, before: dict[int, tuple[Kind, bytes]], ref: RepairRun) -> str | None:
        """A clean repair keeps what every offset it does not clear reads (split duplicates too)."""
        model = dict(ref.diff)
        for c, (kind, data) in sorted(before.items()):
            if ref.kinds[c] == Kind.UNALLOCATED and kind != Kind.UNALLOCATED:
                continue  # the repair cleared this entry
            now = self.env.model_bytes(model, c * CLUSTER, len(data))
            if now != data:
                i = next(i for i in range(len(data)) if now[i] != data[i]) & ~7
                pos = c * CLUSTER + i
                return (
                    f"R1: guest 0x{pos:x} read {describe_word(data[i : i + 8], pos)} before the repair "
                    f"and {describe_word(now[i : i + 8], pos)} after it ({ref.result.summary()})"
                )
        return None

    def difference(self, res: StateResult, ref: RepairRun) -> str:
        if res.size != ref.size:
            return f"R0: image size {res.size} after recovery, {ref.size} after a clean repair"
        got, want = dict(res.diff), dict(ref.diff)
        s = min(x for x in set(got) | set(want) if got.get(x) != want.get(x))
        env = self.env
        a = env.sector_bytes(s, got.get(s, env.base_id))
        b = env.sector_bytes(s, want.get(s, env.base_id))
        i = next(i for i in range(SECTOR) if a[i] != b[i]) & ~7
        pos = s * SECTOR + i
        return (
            f"R0: guest 0x{pos:x} reads {describe_word(a[i : i + 8], pos)} after recovery, "
            f"{describe_word(b[i : i + 8], pos)} after a clean repair"
        )


# -- reporting -----------------------------------------------------------------------------------------------


def report(request: object, line: str) -> None:
    """Show ``line`` on the terminal whatever the capture mode, and keep it for the summary."""
    SUMMARY.append(line)
    config = getattr(request, "config", None)
    reporter = config.pluginmanager.get_plugin("terminalreporter") if config is not None else None
    if reporter is not None:
        reporter.write_line("")
        reporter.write_line(line)
    else:
        print(line, file=sys.__stderr__)


def violations_text(stats: Stats, limit: int = 12) -> str:
    lines = [f"{len(stats.violations)} invariant violations; the smallest reproduction of each kind:"]
    lines += [str(v) for v in stats.minimal()[:limit]]
    return "\n".join(lines)
