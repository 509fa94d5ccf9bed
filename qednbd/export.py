"""One QED image behind an NBD export name: where the protocol meets the image.

Theory of operation
-------------------
* :class:`Export` owns an open :class:`~qednbd.qed.image.QedImage` and says what the handshake
  advertises about it (:meth:`Export.info`). :meth:`Export.handle` turns one *valid* request
  (:class:`~qednbd.nbd.transmission.Request` with ``error == 0``) into reply buffers for the
  connection's :class:`~qednbd.nbd.transmission.ReplyEncoder`. It runs on the server's event-loop
  thread and calls the image synchronously: the image is not thread-safe, and doing every image
  call on one thread is what serializes allocation across connections (multi-conn is honest
  because every connection shares this one image object and its tables).
* The one slow call is fdatasync. ``handle`` never makes it: a reply that must wait for stable
  storage (FLUSH, and any request with FUA) comes back with ``flush_first=True``, and the server
  runs :meth:`Export.flush` off the loop before sending it. A FLUSH therefore covers every write
  whose reply was sent before it, on any connection: those writes were already in the file.
* Errors: every failure of the image is an :class:`~qednbd.errors.ImageError` (or an ``OSError``)
  carrying a host errno; :func:`nbd_errno` is the one place that maps it to the NBD set. An
  unexpected exception is the server's to log and answer with EIO.
* READ is planned on the loop (:meth:`QedImage.read_plan`: table lookups, backing-file reads)
  and the plan's host extents are read there too when small and in the page cache (a one-extent
  read tries ``preadv(RWF_NOWAIT)``), or on a worker thread when they are not cached or add up to
  :data:`BACKGROUND_READ_BYTES` (a data cluster's host offset never changes, so that is safe
  while other requests go on). With structured replies each run is a chunk: data as
  OFFSET_DATA, zero clusters and unallocated ranges with nothing below them as OFFSET_HOLE; with
  DF the whole range is one chunk. BLOCK_STATUS maps the backing chain (:mod:`qednbd.qed.mapping`):
  ``base:allocation`` is 0 for data and HOLE|ZERO for everything else, as qemu-nbd reports QED;
  ``qemu:allocation-depth`` is the layer (1 = this image) or 0 where no layer has the range.
"""

from __future__ import annotations

import errno
import functools
import logging
from collections.abc import Callable
from typing import Final, NamedTuple

from qednbd.errors import ImageError
from qednbd.metrics import ExportStats
from qednbd.nbd.constants import (
    BASE_ALLOCATION,
    QEMU_ALLOCATION_DEPTH,
    U32_MAX,
    Command,
    CommandFlag,
    Errno,
    TransmissionFlag,
)
from qednbd.nbd.handshake import DEFAULT_EXPORT_FLAGS, ExportInfo, MetaContext
from qednbd.nbd.transmission import Buffer, ReplyEncoder, ReplyMode, Request, command_name
from qednbd.qed.image import Kind, QedImage, ReadPiece
from qednbd.qed.mapping import map_image

log = logging.getLogger("qednbd.export")

# One BLOCK_STATUS reply describes at most this much of the export: the client's length is a hint,
# and walking more tables than this in one go would hold up every other request on the loop.
MAX_BLOCK_STATUS_BYTES: Final = 1 << 30
# A READ with at least this many bytes to read from the file is read on a worker thread, so it
# does not hold up other clients (a 32 MiB pread from the page cache takes ~10-100 ms here); below
# it, the ~50 us thread hop and GIL hand-offs cost more than the read (1 MiB: 1.4-1.7x qemu-nbd's
# throughput inline against 1.1x on a worker). Smaller reads go to a worker only when the page
# cache does not hold their data (preadv RWF_NOWAIT), so a cold read never blocks the loop.
BACKGROUND_READ_BYTES: Final = 4 * 1024 * 1024
# Cached single-extent READs from this size up are offered to the server for sendfile: the data
# goes from the page cache to the socket inside the kernel, with no copy through Python.
ZERO_COPY_BYTES: Final = 64 * 1024
# Extents per BLOCK_STATUS chunk (the spec asks for at most 2^20).
MAX_EXTENTS: Final = 1 << 16

# A read-only export does not offer the commands it would refuse (qemu-nbd -r does the same).
READ_ONLY_EXPORT_FLAGS: Final = DEFAULT_EXPORT_FLAGS & ~(
    TransmissionFlag.SEND_TRIM | TransmissionFlag.SEND_WRITE_ZEROES | TransmissionFlag.SEND_FAST_ZERO
)

_DF: Final = int(CommandFlag.DF)  # plain ints: IntFlag arithmetic runs Python code per request
_FAST_ZERO: Final = int(CommandFlag.FAST_ZERO)
_REQ_ONE: Final = int(CommandFlag.REQ_ONE)

STATE_HOLE: Final = 1
STATE_ZERO: Final = 2

_ERRNO_MAP: Final = {
    errno.EPERM: Errno.EPERM,
    errno.EROFS: Errno.EPERM,
    errno.EACCES: Errno.EPERM,
    errno.EIO: Errno.EIO,
    errno.ENOMEM: Errno.ENOMEM,
    errno.EINVAL: Errno.EINVAL,
    errno.ENOSPC: Errno.ENOSPC,
    errno.EDQUOT: Errno.ENOSPC,
    errno.EFBIG: Errno.ENOSPC,
    errno.EOVERFLOW: Errno.EOVERFLOW,
    errno.ENOTSUP: Errno.ENOTSUP,
    errno.ESHUTDOWN: Errno.ESHUTDOWN,
}


def nbd_errno(exc: BaseException) -> int:
    """The NBD error for a failure: the host errno mapped onto the protocol's set, else EIO."""
    code = getattr(exc, "errno", None)
    if isinstance(code, int):
        return int(_ERRNO_MAP.get(code, Errno.EIO))
    return int(Errno.EIO)


class ZeroCopy(NamedTuple):
    """A READ reply the server may send with sendfile: ``header``, then ``length`` bytes of the
    image file at ``host_offset`` (:meth:`Export.send_file`; :meth:`Export.read_file` for the rest)."""

    header: bytes
    host_offset: int
    length: int


class Reply(NamedTuple):
    """What to send for one request (a NamedTuple: one is built per request).

    ``buffers`` go out at once, unless ``flush_first`` (send them only after :meth:`Export.flush`
    succeeded) or ``background`` is set: then the server calls ``background()`` off the event loop
    and sends what it returns. Either may raise; the server answers with :meth:`Export.error_reply`.
    """

    buffers: list[Buffer]
    flush_first: bool = False
    background: Callable[[], list[Buffer]] | None = None
    zero_copy: ZeroCopy | None = None
    failed: bool = False  # an error reply (not counted as data moved)


class Export:
    """An open image served under ``name``. See the module docstring."""

    def __init__(
        self,
        name: str,
        image: QedImage,
        *,
        description: str = "",
        read_only: bool = False,
        tls_only: bool = False,
        multi_conn: bool = True,
    ) -> None:
        self.name = name
        self.image = image
        self.read_only = read_only or image.read_only
        self.stats = ExportStats()  # kept by the server, read by --metrics
        self._info = ExportInfo(
            name=name,
            size=image.size,
            read_only=self.read_only,
            description=description,
            flags=(READ_ONLY_EXPORT_FLAGS if self.read_only else DEFAULT_EXPORT_FLAGS)
            & ~(0 if multi_conn else TransmissionFlag.CAN_MULTI_CONN),
            tls_only=tls_only,
        )

    @property
    def info(self) -> ExportInfo:
        return self._info

    # --- the server's interface ---------------------------------------------------------------

    def flush(self) -> None:
        """Make every completed write durable (thread-safe: only fdatasync on the image's fd)."""
        self.image.flush()

    def send_file(self, out_fd: int, host_offset: int, length: int) -> int:
        """Zero-copy part of a :class:`ZeroCopy` reply; returns the bytes sent."""
        return self.image.send_host(out_fd, host_offset, length)

    def read_file(self, host_offset: int, length: int) -> bytes:
        """The rest of a :class:`ZeroCopy` reply that sendfile did not take."""
        return self.image.read_host(host_offset, length)

    def poll_idle(self) -> bool:
        """Clear the dirty bit after an idle period (see :meth:`QedImage.poll_idle`)."""
        return False if self.read_only else self.image.poll_idle()

    def close(self) -> None:
        self.image.close()

    def error_reply(self, request: Request, replies: ReplyEncoder, exc: BaseException) -> Reply:
        message = getattr(exc, "message", None) or str(exc) or type(exc).__name__
        return Reply([replies.error(request, nbd_errno(exc), message)], failed=True)

    def handle(self, request: Request, replies: ReplyEncoder, contexts: tuple[MetaContext, ...]) -> Reply:
        """Carry out one valid request; failures of the image become error replies (and a log
        line: they mean a damaged image or a failing disk, not a client's mistake)."""
        try:
            return self._dispatch(request, replies, contexts)
        except (ImageError, OSError) as exc:
            name = command_name(request.command)
            log.warning(
                "export %r: %s of %d bytes at %d failed: %s",
                self.name,
                name,
                request.length,
                request.offset,
                exc,
            )
            return self.error_reply(request, replies, exc)

    # --- commands -----------------------------------------------------------------------------

    def _dispatch(self, request: Request, replies: ReplyEncoder, contexts: tuple[MetaContext, ...]) -> Reply:
        command = request.command
        image = self.image
        if command == Command.READ:
            return self._read(request, replies)
        if command == Command.WRITE:
            assert request.payload is not None  # the framing layer attaches it to every valid WRITE
            image.write(request.offset, request.payload)
        elif command == Command.FLUSH:
            return Reply([replies.ok(request)], flush_first=not self.read_only)
        elif command == Command.TRIM:
            image.trim(request.offset, request.length)
        elif command == Command.WRITE_ZEROES:
            if request.flags & _FAST_ZERO and not self._zeroes_are_fast(request):
                return Reply(
                    [replies.error(request, Errno.ENOTSUP, "zeroing this range needs data writes")],
                    failed=True,
                )
            image.write_zeroes(request.offset, request.length)
        elif command == Command.CACHE:
            pass  # a hint; the tables it would warm are read on demand anyway
        elif command == Command.BLOCK_STATUS:
            return Reply([self._block_status(request, replies, contexts)])
        else:  # the framing layer only passes commands it validated
            return Reply(
                [replies.error(request, Errno.EINVAL, f"command {command} is not supported")], failed=True
            )
        return Reply([replies.ok(request)], flush_first=request.fua and not self.read_only)

    def _zeroes_are_fast(self, request: Request) -> bool:
        """FAST_ZERO: only whole unallocated or zero clusters (entries, no data writes)."""
        cs = self.image.cluster_size
        if request.offset % cs or request.length % cs:
            return False
        return all(e.kind != Kind.DATA for e in self.image.block_status(request.offset, request.length))

    def write_inline(self, request: Request) -> bool:
        """Carry out a WRITE without FUA that overwrites data of one cluster; False (nothing
        done) for anything else, and on errors: then :meth:`handle` it."""
        payload = request.payload
        if request.flags or payload is None:
            return False
        try:
            return self.image.write_in_place(request.offset, payload)
        except (ImageError, OSError):
            return False  # handle() meets the same error and answers it

    def read_inline(self, request: Request, replies: ReplyEncoder) -> list[Buffer] | None:
        """The reply to a small READ of one cached data cluster, or None: then :meth:`handle`
        it (holes, several clusters, uncached data, zero-copy sizes, errors)."""
        length = request.length
        if length >= ZERO_COPY_BYTES:
            return None
        try:
            data = self.image.read_cached(request.offset, length)
        except (ImageError, OSError):
            return None  # handle() meets the same error and answers it
        if data is None:
            return None
        return [replies.read_header(request), data]

    def _read(self, request: Request, replies: ReplyEncoder) -> Reply:
        plan = self.image.read_plan(request.offset, request.length)
        host_bytes = 0
        for piece in plan:
            if piece.host_offset is not None:
                host_bytes += piece.length
        if host_bytes >= BACKGROUND_READ_BYTES:
            return Reply([], background=functools.partial(self._read_reply, request, replies, plan))
        if len(plan) == 1 and plan[0].host_offset is not None:  # the common case: one extent
            host = plan[0].host_offset
            if request.length >= ZERO_COPY_BYTES and self.image.host_cached(host, request.length):
                header = replies.data_header(request, request.offset, request.length, done=True)
                return Reply([], zero_copy=ZeroCopy(header, host, request.length))
            data = self.image.read_host_cached(host, request.length)
            if data is None:  # not in the page cache: wait for the disk on a worker, not here
                return Reply([], background=functools.partial(self._read_reply, request, replies, plan))
            return Reply(replies.read_data(request, request.offset, data, done=True))
        return Reply(self._read_reply(request, replies, plan))

    def _read_reply(self, request: Request, replies: ReplyEncoder, plan: list[ReadPiece]) -> list[Buffer]:
        """The reply buffers for a planned READ; only reads the file, so any thread may run it."""
        image = self.image
        pos, length = request.offset, request.length
        if len(plan) == 1 and plan[0].host_offset is not None:  # the common case: one extent, no copy
            return replies.read_data(request, pos, image.read_host(plan[0].host_offset, length), done=True)
        simple = replies.mode is ReplyMode.SIMPLE
        if simple or (request.flags & _DF and len(plan) > 1 and not all(p.is_zero for p in plan)):
            buf = bytearray(length)
            for piece in plan:
                at = piece.offset - pos
                if piece.host_offset is not None:
                    buf[at : at + piece.length] = image.read_host(piece.host_offset, piece.length)
                elif piece.data is not None:
                    buf[at : at + piece.length] = piece.data
            if simple:
                return replies.read_data(request, pos, buf, done=True)
            return [*replies.read_data(request, pos, buf, done=False), replies.done(request)]
        out: list[Buffer] = []
        merged: list[ReadPiece] = []  # neighbouring zero pieces become one OFFSET_HOLE chunk
        for piece in plan:
            if merged and piece.is_zero and merged[-1].is_zero:
                merged[-1] = ReadPiece(merged[-1].offset, merged[-1].length + piece.length)
            else:
                merged.append(piece)
        last = len(merged) - 1
        for i, piece in enumerate(merged):
            if piece.is_zero:
                out.append(replies.read_hole(request, piece.offset, piece.length, done=i == last))
                continue
            if piece.host_offset is not None:
                data = image.read_host(piece.host_offset, piece.length)
            else:
                assert piece.data is not None
                data = piece.data
            out.extend(replies.read_data(request, piece.offset, data, done=i == last))
        return out

    def _block_status(
        self, request: Request, replies: ReplyEncoder, contexts: tuple[MetaContext, ...]
    ) -> bytes:
        image = self.image
        limit = U32_MAX if replies.mode is not ReplyMode.EXTENDED else MAX_BLOCK_STATUS_BYTES
        length = min(request.length, MAX_BLOCK_STATUS_BYTES, limit)
        extents = map_image(image, request.offset, length)
        out: list[bytes] = []
        for i, context in enumerate(contexts):
            pairs: list[tuple[int, int]] = []
            for ext in extents:
                if context.name == BASE_ALLOCATION:
                    status = 0 if ext.data else STATE_HOLE | STATE_ZERO
                elif context.name == QEMU_ALLOCATION_DEPTH:
                    status = ext.depth + 1 if ext.present else 0
                else:
                    status = 0
                if pairs and pairs[-1][1] == status:
                    pairs[-1] = (pairs[-1][0] + ext.length, status)
                elif len(pairs) < MAX_EXTENTS:
                    pairs.append((ext.length, status))
                else:
                    break
            if request.flags & _REQ_ONE:
                pairs = [(min(pairs[0][0], request.length), pairs[0][1])]
            out.append(replies.block_status(request, context.id, pairs, done=i == len(contexts) - 1))
        return b"".join(out)
