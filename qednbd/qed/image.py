"""``QedImage``: open, read, write and close a QED image as QEMU's driver does.

Theory of operation
-------------------
* **Lookup** walks L1 → L2 and returns one homogeneous *run* at a time (all
  unallocated, all zero clusters, or physically contiguous data), clamped to the L2
  table's region. Every table and cluster offset is validated (aligned, after the
  header, before the allocation pointer) before it is followed; a bad one fails that
  request with EIO and never reads another region.
* **Allocation** is a bump pointer starting at the file length rounded down to a
  cluster (``file_size``); nothing is freed or reused, as in QEMU.
* **Allocating write order** (QEMU's, so the same writes give a byte-identical file):
  set NEED_CHECK and flush (first allocation of a dirty period only) → data clusters,
  with the untouched head and tail of partial clusters copied from the backing file or
  zero → flush, if there is a backing file (the copied data must be durable before
  anything points at it) → either a new L2 table written whole, a flush, and the one L1
  sector; or the changed sectors of the existing L2 table.
* Writes into a *zero cluster* copy zeros for the untouched part (QEMU copies from the
  backing file there, which makes zeroed data reappear; we do not).
* **write_zeroes**: whole clusters become zero entries (value 1) where unallocated and
  are zeroed in place where allocated; partial clusters are ordinary writes of zeros.
* **trim** punches host holes in whole allocated clusters and leaves every entry alone,
  so ``qemu-img check`` stays clean and trimmed clusters read as zeros.
* **NEED_CHECK** is set and flushed before the first allocating write of a dirty
  period (also with a backing file, where QEMU does not) and cleared, after a flush, on
  close and by :meth:`QedImage.poll_idle` once no allocating write has happened for
  :data:`IDLE_CLEAR_SECONDS`. A read-write open of a dirty image checks and repairs
  it first (:mod:`qednbd.qed.repair`); without that (``recover=False``) the bit stays
  set until a check has passed.
  A read-only open never writes.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from enum import IntEnum
from typing import TYPE_CHECKING, NamedTuple, Protocol

from qednbd.errors import ImageError, InvalidImage, UnsupportedFeature
from qednbd.qed import format as fmt
from qednbd.qed.backing import (
    MAX_CHAIN_DEPTH,
    LayerRun,
    RawLayer,
    probe_format,
    resolve_backing_path,
)
from qednbd.qed.geometry import Geometry
from qednbd.qed.locking import CREATOR, READER, SHARED_READER, Access, LockConflict
from qednbd.qed.storage import FileStorage, Storage
from qednbd.qed.tables import UNALLOCATED, ZERO_CLUSTER, L1Table, L2Cache, write_zeros

if TYPE_CHECKING:
    from qednbd.qed.repair import RepairResult

IDLE_CLEAR_SECONDS = 5.0  # QEMU's QED_NEED_CHECK_TIMEOUT
DEFAULT_MEMORY_LIMIT = 64 * 1024 * 1024  # bytes for L1 plus the L2 cache, per image
_COW_COMBINE_BYTES = 1 << 20  # below this an allocation is written with one pwrite


class Kind(IntEnum):
    UNALLOCATED = 0
    ZERO = 1
    DATA = 2


@dataclass(frozen=True, slots=True)
class Extent:
    """A run of guest bytes with one allocation state in this image (not its backing)."""

    offset: int
    length: int
    kind: Kind
    host_offset: int | None = None


class ReadPiece(NamedTuple):
    """Part of a read plan: zeros (neither field set), ``data``, or ``length`` bytes at ``host_offset``.

    A NamedTuple: the server builds one per request, three times cheaper than a frozen dataclass."""

    offset: int
    length: int
    host_offset: int | None = None
    data: bytes | None = None

    @property
    def is_zero(self) -> bool:
        return self.host_offset is None and self.data is None


@dataclass(frozen=True, slots=True)
class _Run:
    kind: Kind
    length: int
    host_offset: int  # DATA: host offset of the run's first byte
    l1_missing: bool  # UNALLOCATED because the L1 entry is 0 (no L2 table yet)
    l2_offset: int


class Layer(Protocol):
    """A backing layer: a raw file or a QED image opened read-only."""

    format_name: str
    path: str

    @property
    def size(self) -> int: ...

    @property
    def backing(self) -> Layer | None: ...

    def read(self, pos: int, length: int) -> bytes: ...

    def status(self, pos: int, length: int) -> list[LayerRun]: ...

    def close(self) -> None: ...


class QedImage:
    """One open QED image. Not thread-safe: the owner serializes calls."""

    format_name = "qed"

    def __init__(
        self,
        storage: Storage,
        path: str,
        *,
        open_backing: bool = True,
        memory_limit: int = DEFAULT_MEMORY_LIMIT,
        clock: Callable[[], float] = time.monotonic,
        recover: bool = True,
        recover_progress: Callable[[float], None] | None = None,
        force_share: bool = False,
        _chain: tuple[str, ...] = (),
    ) -> None:
        self.storage = storage
        self.path = path
        self.read_only = storage.read_only
        self._clock = clock
        self._last_alloc = 0.0
        self._backing: Layer | None = None
        self._closed = False
        self._need_check_durable = True  # whether header.need_check is known to be on disk
        file_length = storage.length()
        header = fmt.Header.decode(storage.pread(fmt.HEADER_BYTES, 0))
        fmt.validate_header(header, file_length)
        self.header = header
        self.geometry = Geometry.of(header.cluster_size, header.table_size, header.header_size)
        self._valid_tables: set[int] = set()  # L2 offsets already checked (cleared if the file shrinks)
        self._file_size = fmt.usable_file_size(file_length, header.cluster_size)
        self._data_start = header.header_size * header.cluster_size  # no data cluster before this
        self.backing_name = self._read_backing_name()
        n_l1 = self.geometry.l1_entries_for(header.image_size)
        l1_bytes = -(-n_l1 // 64) * 512
        if l1_bytes > memory_limit:
            raise InvalidImage(
                f"L1 table needs {l1_bytes} bytes, more than the memory limit of {memory_limit}"
            )
        self.l1 = L1Table(storage, header.l1_table_offset, n_l1)
        self.l2 = L2Cache(storage, self.geometry.table_bytes, memory_limit - l1_bytes)
        self.opened_dirty = header.need_check
        self.recovery: RepairResult | None = None  # what the open's check and repair did, if dirty
        if not self.read_only and header.autoclear_features & ~fmt.AUTOCLEAR_FEATURE_MASK:
            self._write_header(
                replace(header, autoclear_features=header.autoclear_features & fmt.AUTOCLEAR_FEATURE_MASK)
            )
            storage.flush()
        if open_backing and self.backing_name:
            self._backing = open_layer(
                resolve_backing_path(path, self.backing_name),
                self.backing_format,
                (*_chain, os.path.realpath(path)),
                force_share=force_share,
            )
        if recover and self.opened_dirty and not self.read_only:
            self._recover(recover_progress)

    @property
    def file_size(self) -> int:
        """Where the next cluster is allocated: the end of the usable file."""
        return self._file_size

    @file_size.setter
    def file_size(self, value: int) -> None:
        if value < self._file_size:  # a repair truncated the file: offsets must be checked again
            self._valid_tables.clear()
        self._file_size = value

    def _recover(self, progress: Callable[[float], None] | None) -> None:
        """A read-write open of a dirty image: check and repair first (QEMU does too)."""
        from qednbd.qed.repair import recover_on_open  # repair builds on this module

        try:
            self.recovery = recover_on_open(self, progress)
        except BaseException:
            if self._backing is not None:
                self._backing.close()
            raise

    # -- opening and closing ---------------------------------------------------------

    @classmethod
    def open(
        cls,
        path: str,
        *,
        read_only: bool = False,
        open_backing: bool = True,
        memory_limit: int = DEFAULT_MEMORY_LIMIT,
        clock: Callable[[], float] = time.monotonic,
        recover: bool = True,
        recover_progress: Callable[[float], None] | None = None,
        access: Access | None = None,
    ) -> QedImage:
        """Open an image; a read-write open of a dirty image checks and repairs it first
        (``recover=False`` leaves that to the caller, as ``qednbd check -r`` does), reporting
        how far it got to ``recover_progress``.

        The file is locked as QEMU locks it (:mod:`qednbd.qed.locking`): as a reader or a
        writer by ``read_only``, or as ``access`` says; an ``access`` that refuses nothing
        (``-U``) opens the backing chain the same way."""
        storage = FileStorage(path, read_only=read_only, access=access)
        try:
            return cls(
                storage,
                path,
                open_backing=open_backing,
                memory_limit=memory_limit,
                clock=clock,
                recover=recover,
                recover_progress=recover_progress,
                force_share=access is not None and not access.refuses,
            )
        except BaseException:
            storage.close()
            raise

    def __enter__(self) -> QedImage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Flush and, if this session made the image dirty, clear NEED_CHECK. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            if not self.read_only:
                self.clear_need_check()
        finally:
            if self._backing is not None:
                self._backing.close()
                self._backing = None
            self.storage.close()

    def _read_backing_name(self) -> str:
        h = self.header
        if not h.features & fmt.F_BACKING_FILE or h.backing_filename_size == 0:
            return ""
        if h.backing_filename_size > fmt.MAX_BACKING_NAME_BYTES:
            raise InvalidImage("Failed to read backing filename")
        raw = self.storage.pread(h.backing_filename_size, h.backing_filename_offset)
        return raw.decode("utf-8", "surrogateescape")

    @property
    def backing_format(self) -> str | None:
        if not self.backing_name:
            return None
        return "raw" if self.header.features & fmt.F_BACKING_FORMAT_NO_PROBE else None

    @property
    def backing(self) -> Layer | None:
        return self._backing

    @property
    def size(self) -> int:
        return self.header.image_size

    @property
    def cluster_size(self) -> int:
        return self.header.cluster_size

    # -- the header and NEED_CHECK ----------------------------------------------------

    def _write_header(self, header: fmt.Header) -> None:
        self.storage.pwrite(header.encode(), 0)
        self.header = header

    def _mark_dirty(self) -> None:
        """Before an allocating write: NEED_CHECK set and durable first."""
        self._last_alloc = self._clock()
        self.set_need_check()

    def set_need_check(self) -> None:
        """Set NEED_CHECK and make it durable (no-op if already set)."""
        self._check_writable()
        if not self.header.need_check or not self._need_check_durable:
            old = self.header.with_features(self.header.features & ~fmt.F_NEED_CHECK)
            try:
                self._write_header(old.with_features(old.features | fmt.F_NEED_CHECK))
                self.storage.flush()
            except BaseException:
                self.header = old  # not known durable: the next allocating write tries again
                raise
            self._need_check_durable = True

    def reload_tables(self) -> None:
        """Forget cached tables after something rewrote them behind the cache (repair)."""
        self.l1.reload()
        self.l2.clear()

    def clear_need_check(self) -> None:
        """Flush, then clear NEED_CHECK — unless the image came to us dirty (unchecked)."""
        self.storage.flush()
        if self.header.need_check and not self.opened_dirty:
            old = self.header
            try:
                self._write_header(old.with_features(old.features & ~fmt.F_NEED_CHECK))
                self.storage.flush()
            except BaseException:
                # The bit on disk is now unknown: the next allocating write sets it again.
                self.header = old
                self._need_check_durable = False
                raise

    def mark_checked(self) -> None:
        """A check found the image consistent: NEED_CHECK may now be cleared as usual."""
        self.opened_dirty = False

    def poll_idle(self) -> bool:
        """Clear NEED_CHECK if no allocating write happened for IDLE_CLEAR_SECONDS.

        The owner calls this periodically (the server from its event loop); it returns
        True when it cleared the bit.
        """
        if self.read_only or not self.header.need_check or self.opened_dirty:
            return False
        if self._clock() - self._last_alloc < IDLE_CLEAR_SECONDS:
            return False
        self.clear_need_check()
        return True

    # -- lookup ----------------------------------------------------------------------

    def _bad_offset(self, what: str, value: int, pos: int) -> ImageError:
        return ImageError(errno.EIO, f"invalid {what} offset 0x{value:x} for guest offset 0x{pos:x}")

    def _entry_at(self, pos: int) -> int:
        """The L2 entry for the cluster holding ``pos``: UNALLOCATED, ZERO_CLUSTER or a validated
        data cluster offset. The one-cluster fast path of reads and writes; same checks and errors
        as :meth:`_find_run`."""
        g = self.geometry
        l2_offset = self.l1.entries[pos >> g.l1_shift]
        if l2_offset == UNALLOCATED:
            return UNALLOCATED
        if l2_offset not in self._valid_tables:
            if not fmt.table_offset_valid(l2_offset, self.header, self.file_size):
                raise self._bad_offset("L2 table", l2_offset, pos)
            self._valid_tables.add(l2_offset)
        index = (pos >> g.cluster_bits) & g.l2_mask
        page_entries = self.l2.page_entries
        entry = self.l2.page(l2_offset, index // page_entries)[index % page_entries]
        # fmt.cluster_offset_valid, inline (this runs for every small READ and WRITE):
        if entry > ZERO_CLUSTER and (
            entry & g.cluster_mask or not self._data_start <= entry < self._file_size
        ):
            raise self._bad_offset("data cluster", entry, pos)
        return entry

    def _find_run(self, pos: int, length: int) -> _Run:
        """The homogeneous run starting at ``pos``, at most ``length`` bytes."""
        g = self.geometry
        length = min(length, g.l2_region_end(pos) - pos)
        l1_index = g.l1_index(pos)
        l2_offset = self.l1[l1_index]
        if l2_offset == UNALLOCATED:
            return _Run(Kind.UNALLOCATED, length, 0, True, 0)
        if not fmt.table_offset_valid(l2_offset, self.header, self.file_size):
            raise self._bad_offset("L2 table", l2_offset, pos)
        index = g.l2_index(pos)
        n_wanted = g.clusters_spanned(pos, length)
        cache = self.l2
        page_entries = cache.page_entries
        page_no, within = divmod(index, page_entries)
        page = cache.page(l2_offset, page_no)
        first = page[within]
        if first in (UNALLOCATED, ZERO_CLUSTER):
            kind = Kind.UNALLOCATED if first == UNALLOCATED else Kind.ZERO
        elif fmt.cluster_offset_valid(first, self.header, self.file_size):
            kind = Kind.DATA
        else:
            raise self._bad_offset("data cluster", first, pos)
        n = 1
        expect = first
        cs = g.cluster_size
        limit = self.file_size
        while n < n_wanted:
            within += 1
            if within == page_entries:
                page_no += 1
                within = 0
                page = cache.page(l2_offset, page_no)
            entry = page[within]
            if kind == Kind.DATA:
                expect += cs
                if entry != expect or expect >= limit:
                    break
            elif entry != first:
                break
            n += 1
        run_length = min(length, n * cs - g.offset_in_cluster(pos))
        host = first + g.offset_in_cluster(pos) if kind == Kind.DATA else 0
        return _Run(kind, run_length, host, False, l2_offset)

    def block_status(self, pos: int, length: int) -> list[Extent]:
        """This image's allocation over [pos, pos+length), contiguous runs merged."""
        self._check_range(pos, length)
        out: list[Extent] = []
        end = pos + length
        while pos < end:
            run = self._find_run(pos, end - pos)
            host = run.host_offset if run.kind == Kind.DATA else None
            if out:
                last = out[-1]
                if last.kind == run.kind and (
                    host is None or (last.host_offset is not None and last.host_offset + last.length == host)
                ):
                    out[-1] = Extent(last.offset, last.length + run.length, last.kind, last.host_offset)
                    pos += run.length
                    continue
            out.append(Extent(pos, run.length, run.kind, host))
            pos += run.length
        return out

    def status(self, pos: int, length: int) -> list[LayerRun]:
        """Block status as a backing layer reports it."""
        names = {Kind.UNALLOCATED: "unallocated", Kind.ZERO: "zero", Kind.DATA: "data"}
        return [LayerRun(e.length, names[e.kind], e.host_offset) for e in self.block_status(pos, length)]

    # -- reading ---------------------------------------------------------------------

    def read_plan(self, pos: int, length: int) -> list[ReadPiece]:
        """How to produce [pos, pos+length): zeros, bytes already read, or host extents.

        Lookups and backing-file reads happen here, on the caller's thread; the host extents
        can then be read with :meth:`read_host` on any thread (a data cluster's host offset
        never changes while the image is open: nothing is freed or moved).
        """
        self._check_range(pos, length)
        if length == 0:
            return []
        backing = self._backing
        g = self.geometry
        within = pos & g.cluster_mask
        if within + length <= g.cluster_size:  # one cluster (the common case)
            entry = self._entry_at(pos)
            if entry > ZERO_CLUSTER:
                return [ReadPiece(pos, length, host_offset=entry + within)]
            if entry == ZERO_CLUSTER or backing is None or pos >= backing.size:
                return [ReadPiece(pos, length)]
            return [ReadPiece(pos, length, data=self._read_backing(pos, length))]
        plan: list[ReadPiece] = []
        for ext in self.block_status(pos, length):
            if ext.kind == Kind.DATA:
                plan.append(ReadPiece(ext.offset, ext.length, host_offset=ext.host_offset))
            elif ext.kind == Kind.ZERO or backing is None or ext.offset >= backing.size:
                plan.append(ReadPiece(ext.offset, ext.length))
            else:
                plan.append(
                    ReadPiece(ext.offset, ext.length, data=self._read_backing(ext.offset, ext.length))
                )
        return plan

    def _data_offset(self, pos: int, length: int) -> int:
        """Where [pos, pos+length) is in the file if it lies in one data cluster of this image,
        else -1: the one lookup of the small-READ and small-WRITE fast paths."""
        g = self.geometry
        within = pos & g.cluster_mask
        if (
            within + length > g.cluster_size
            or length <= 0
            or pos < 0
            or pos + length > self.header.image_size
        ):
            return -1
        entry = self._entry_at(pos)
        return entry + within if entry > ZERO_CLUSTER else -1

    def read_cached(self, pos: int, length: int) -> bytes | bytearray | None:
        """[pos, pos+length) if it lies in one data cluster of this image and the page cache holds
        it, else None (then :meth:`read_plan` says how to produce it). The small-READ fast path:
        one table lookup and one ``preadv(RWF_NOWAIT)``, no plan."""
        host = self._data_offset(pos, length)
        storage = self.storage
        if host < 0 or not isinstance(storage, FileStorage):
            return None
        return storage.pread_nowait(length, host)

    def read_host(self, host_offset: int, length: int) -> bytes:
        """Read bytes of this image's file (a planned data extent). Safe on any thread."""
        return self.storage.pread(length, host_offset)

    def host_cached(self, host_offset: int, length: int) -> bool:
        """Whether a planned data extent is in the page cache (a probe that never waits)."""
        storage = self.storage
        return isinstance(storage, FileStorage) and storage.is_cached(host_offset, length)

    def send_host(self, out_fd: int, host_offset: int, length: int) -> int:
        """Send bytes of this image's file to a non-blocking socket inside the kernel (sendfile);
        returns how many went (the caller sends the rest): the zero-copy READ path."""
        storage = self.storage
        return storage.sendfile(out_fd, host_offset, length) if isinstance(storage, FileStorage) else 0

    def read_host_cached(self, host_offset: int, length: int) -> bytes | bytearray | None:
        """Like :meth:`read_host` if the bytes are in the page cache, else None (never waits
        for the disk), so the caller can read them on another thread instead."""
        storage = self.storage
        return storage.pread_nowait(length, host_offset) if isinstance(storage, FileStorage) else None

    def _check_range(self, pos: int, length: int) -> None:
        if pos < 0 or length < 0 or pos + length > self.header.image_size:
            raise ImageError(
                errno.EINVAL,
                f"request 0x{pos:x}+0x{length:x} is outside the image (size 0x{self.header.image_size:x})",
            )

    def _read_backing(self, pos: int, length: int) -> bytes:
        """Guest bytes from the backing file, zeros where there is none or it is shorter."""
        backing = self._backing
        if backing is None or pos >= backing.size:
            return bytes(length)
        n = min(length, backing.size - pos)
        data = backing.read(pos, n)
        return data if n == length else data + bytes(length - n)

    def read(self, pos: int, length: int) -> bytes:
        """Guest bytes [pos, pos+length): the read plan, carried out on this thread."""
        plan = self.read_plan(pos, length)
        parts = [
            self.read_host(p.host_offset, p.length)
            if p.host_offset is not None
            else p.data
            if p.data is not None
            else bytes(p.length)
            for p in plan
        ]
        return parts[0] if len(parts) == 1 else b"".join(parts)

    # -- writing ---------------------------------------------------------------------

    def _check_writable(self) -> None:
        if self.read_only:
            raise ImageError(errno.EROFS, "image is opened read-only")

    def alloc_clusters(self, n_clusters: int) -> int:
        offset = self.file_size
        self.file_size += n_clusters * self.geometry.cluster_size
        return offset

    def write_in_place(self, pos: int, data: bytes | bytearray) -> bool:
        """Write ``data`` at ``pos`` if that lies in one data cluster of this image (nothing but
        the data changes), else False: then :meth:`write`. The small-WRITE fast path."""
        host = -1 if self.read_only else self._data_offset(pos, len(data))
        if host < 0:
            return False
        self.storage.pwrite(data, host)
        return True

    def write(self, pos: int, data: bytes | bytearray | memoryview) -> None:
        self._check_writable()
        view = memoryview(data).cast("B")
        self._check_range(pos, len(view))
        within = pos & self.geometry.cluster_mask
        if within + len(view) <= self.geometry.cluster_size:  # in place in one cluster: the fast path
            entry = self._entry_at(pos)
            if entry > ZERO_CLUSTER:
                self.storage.pwrite(view, entry + within)
                return
        done = 0
        total = len(view)
        while done < total:
            run = self._find_run(pos + done, total - done)
            chunk = view[done : done + run.length]
            if run.kind == Kind.DATA:
                self.storage.pwrite(chunk, run.host_offset)
            else:
                self._allocating_write(pos + done, chunk, run)
            done += run.length

    def _cow_fill(self, pos: int, length: int, from_backing: bool) -> bytes:
        return self._read_backing(pos, length) if from_backing else bytes(length)

    def _allocating_write(self, pos: int, chunk: memoryview, run: _Run) -> None:
        g = self.geometry
        n = g.clusters_spanned(pos, len(chunk))
        self._mark_dirty()
        start = self.alloc_clusters(n)
        head_pos = g.cluster_start(pos)
        tail_pos = pos + len(chunk)
        tail_len = g.cluster_end(tail_pos) - tail_pos
        from_backing = run.kind == Kind.UNALLOCATED and self._backing is not None
        total = n * g.cluster_size
        if head_pos == pos and tail_len == 0:  # whole clusters: nothing to fill, no copy to make
            self.storage.pwrite(chunk, start)
        elif total <= _COW_COMBINE_BYTES:
            buf = b"".join(
                (
                    self._cow_fill(head_pos, pos - head_pos, from_backing),
                    chunk,
                    self._cow_fill(tail_pos, tail_len, from_backing),
                )
            )
            self.storage.pwrite(buf, start)
        else:
            self._fill(start, head_pos, pos - head_pos, from_backing)
            self.storage.pwrite(chunk, start + pos - head_pos)
            self._fill(start + tail_pos - head_pos, tail_pos, tail_len, from_backing)
        if self._backing is not None:
            self.storage.flush()
        self._update_l2(pos, [start + i * g.cluster_size for i in range(n)], run)

    def _fill(self, host: int, pos: int, length: int, from_backing: bool) -> None:
        if not from_backing:
            write_zeros(self.storage, host, length)
            return
        step = _COW_COMBINE_BYTES
        for off in range(0, length, step):
            n = min(step, length - off)
            self.storage.pwrite(self._read_backing(pos + off, n), host + off)

    def _update_l2(self, pos: int, values: list[int], run: _Run) -> None:
        g = self.geometry
        index = g.l2_index(pos)
        if run.l1_missing:
            table = self.alloc_clusters(g.table_size)
            self.l2.write_new(table, index, values)
            self.storage.flush()
            self.l1.set(g.l1_index(pos), table)
        else:
            self.l2.update(run.l2_offset, index, values)

    def write_zeroes(self, pos: int, length: int) -> None:
        """Zero [pos, pos+length): zero entries for whole clusters, as QEMU does."""
        self._check_writable()
        self._check_range(pos, length)
        g = self.geometry
        end = pos + length
        first_aligned = min(g.cluster_end(pos), end)
        last_aligned = max(g.cluster_start(end), first_aligned)
        if first_aligned > pos:
            self.write(pos, bytes(first_aligned - pos))
        p = first_aligned
        while p < last_aligned:
            run = self._find_run(p, last_aligned - p)
            if run.kind == Kind.DATA:
                write_zeros(self.storage, run.host_offset, run.length)
            elif run.kind == Kind.UNALLOCATED:
                self._mark_dirty()
                self._update_l2(p, [ZERO_CLUSTER] * g.bytes_to_clusters(run.length), run)
            p += run.length
        if end > last_aligned:
            self.write(last_aligned, bytes(end - last_aligned))

    def trim(self, pos: int, length: int) -> None:
        """Give back the host space of whole allocated clusters in the range.

        Entries are untouched (so nothing leaks and check stays clean); a punched cluster
        reads as zeros. Where the filesystem cannot punch holes this does nothing, which
        the NBD protocol allows.
        """
        self._check_writable()
        self._check_range(pos, length)
        g = self.geometry
        p = g.cluster_end(pos)
        end = g.cluster_start(pos + length)
        while p < end:
            run = self._find_run(p, end - p)
            if run.kind == Kind.DATA and not self.storage.punch_hole(run.host_offset, run.length):
                return
            p += run.length

    def flush(self) -> None:
        if not self.read_only:
            self.storage.flush()

    # -- header-only operations ------------------------------------------------------

    def resize(self, new_size: int) -> None:
        """Grow the image; only the header changes, as with qemu-img resize."""
        self._check_writable()
        h = self.header
        if new_size % fmt.SECTOR_SIZE or new_size > fmt.max_image_size(h.cluster_size, h.table_size):
            raise ImageError(errno.EINVAL, "Invalid image size specified")
        if new_size < h.image_size:
            raise ImageError(errno.ENOTSUP, "Shrinking images is currently not supported")
        if self.geometry.l1_entries_for(new_size) > len(self.l1):
            self.l1 = L1Table(self.storage, h.l1_table_offset, self.geometry.l1_entries_for(new_size))
        self._write_header(replace(h, image_size=new_size))
        self.storage.flush()

    def change_backing_file(self, name: str, backing_format: str | None) -> None:
        """Rewrite the backing file name and format bits (``qemu-img rebase -u``)."""
        self._check_writable()
        h = self.header
        if h.compat_features & ~fmt.COMPAT_FEATURE_MASK:
            raise UnsupportedFeature("image has unknown compatible features; cannot change backing file")
        raw_name = name.encode("utf-8", "surrogateescape")
        if name:
            resolve_backing_path(self.path, name)  # refuse protocol names before writing
        if fmt.HEADER_BYTES + len(raw_name) > self.geometry.header_bytes:
            raise ImageError(errno.ENOSPC, "backing file name does not fit in the header")
        features = h.features & ~(fmt.F_BACKING_FILE | fmt.F_BACKING_FORMAT_NO_PROBE)
        if name:
            features |= fmt.F_BACKING_FILE
            if backing_format == "raw":
                features |= fmt.F_BACKING_FORMAT_NO_PROBE
        new = replace(
            h,
            features=features,
            backing_filename_offset=fmt.HEADER_BYTES,
            backing_filename_size=len(raw_name),
        )
        self.storage.pwrite(new.encode() + raw_name, 0)
        self.header = new  # the file has it now, durable or not: later header writes keep it
        self.storage.flush()
        reopen = self._backing is not None  # opened without its chain (rebase -u): leave it so
        if self._backing is not None:
            self._backing.close()
            self._backing = None
        self.backing_name = name
        if name and reopen:
            self._backing = open_layer(
                resolve_backing_path(self.path, name),
                self.backing_format,
                (os.path.realpath(self.path),),
            )


def open_layer(
    path: str, layer_format: str | None, chain: tuple[str, ...], *, force_share: bool = False
) -> Layer:
    """Open one backing layer (and, for QED, its own chain) read-only, locked as QEMU locks a
    backing file (a reader's locks; ``force_share``: refusing nothing)."""
    real = os.path.realpath(path)
    if real in chain:
        raise InvalidImage(f"backing file chain has a loop at '{path}'")
    if len(chain) >= MAX_CHAIN_DEPTH:
        raise InvalidImage(f"backing file chain is deeper than {MAX_CHAIN_DEPTH}")
    access = SHARED_READER if force_share else READER
    try:
        storage = FileStorage(path, read_only=True, access=access)
    except LockConflict as exc:
        raise LockConflict(f"Could not open backing file '{path}': {exc.message}") from None
    except ImageError as exc:
        raise ImageError(exc.errno, f"Could not open backing file: {exc.message}") from exc
    return layer_in(storage, path, layer_format, chain, force_share=force_share)


def layer_in(
    storage: FileStorage,
    path: str,
    layer_format: str | None,
    chain: tuple[str, ...] = (),
    *,
    force_share: bool = False,
) -> RawLayer | QedImage:
    """The raw or QED layer in ``storage`` (open read-only and locked), by ``layer_format`` or
    else by probing; ``storage`` is closed if that fails."""
    try:
        kind = layer_format or probe_format(storage)
        if kind == "raw":
            return RawLayer(path, storage)
        return QedImage(storage, path, force_share=force_share, _chain=chain)
    except BaseException:
        storage.close()
        raise


def create_image(
    path: str,
    size: int,
    *,
    cluster_size: int = fmt.DEFAULT_CLUSTER_SIZE,
    table_size: int = fmt.DEFAULT_TABLE_SIZE,
    backing_file: str = "",
    backing_format: str | None = None,
    storage: Storage | None = None,
) -> None:
    """Write a new image exactly as ``qemu-img create -f qed`` does (size rounded up to 512).

    ``storage``: the empty file, already open and locked, which stays open (``convert``
    goes on to write the image through it); otherwise ``path`` is opened, locked as QEMU's
    create step locks it, emptied and closed here."""
    if not fmt.cluster_size_valid(cluster_size):
        raise ImageError(
            errno.EINVAL, "QED cluster size must be within range [4096, 67108864] and power of 2"
        )
    if not fmt.table_size_valid(table_size):
        raise ImageError(errno.EINVAL, "QED table size must be within range [1, 16] and power of 2")
    size = -(-size // fmt.SECTOR_SIZE) * fmt.SECTOR_SIZE
    limit = fmt.max_image_size(cluster_size, table_size)
    if size > limit:
        raise ImageError(
            errno.EINVAL,
            f"QED image size must be a non-zero multiple of cluster size and less than {limit} bytes",
        )
    name = backing_file.encode("utf-8", "surrogateescape")
    if backing_file:
        resolve_backing_path(path, backing_file)
    if fmt.HEADER_BYTES + len(name) > cluster_size:
        raise ImageError(errno.ENOSPC, "backing file name does not fit in the header cluster")
    header = fmt.new_header(cluster_size, table_size, size, name, backing_format == "raw")
    own = storage is None
    if storage is None:
        storage = FileStorage(path, create=True, access=CREATOR)  # locked, then emptied
    try:
        storage.pwrite(header.encode() + name, 0)
        storage.truncate((1 + table_size) * cluster_size)
        storage.flush()
    finally:
        if own:
            storage.close()
