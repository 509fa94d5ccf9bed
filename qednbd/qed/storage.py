"""The storage seam: the only code that touches an image's file descriptor.

Everything above this module sees a :class:`Storage` — positioned reads and writes,
flush, hole punching, length. Tests substitute recording or failing implementations
here to enumerate crash states and inject I/O errors; the QED rules never call ``os``
directly. Reads past the end of the file return zeros, as a block device padded to its
length would (QEMU's file driver does the same).

OS errors become :class:`ImageError` with the same errno, so callers deal in one type.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
from collections.abc import Callable
from typing import Protocol, cast

from qednbd.errors import ImageError
from qednbd.qed import locking
from qednbd.qed.locking import READER, WRITER, Access

_FALLOC_FL_KEEP_SIZE = 0x01
_preadv = os.preadv  # bound once: the small-READ fast path calls it per request
_RWF_NOWAIT = getattr(os, "RWF_NOWAIT", 0)
_FALLOC_FL_PUNCH_HOLE = 0x02


class Storage(Protocol):
    """What the QED layer needs from the file holding an image."""

    @property
    def read_only(self) -> bool: ...

    def pread(self, length: int, offset: int) -> bytes: ...

    def pwrite(self, data: bytes | bytearray | memoryview, offset: int) -> None: ...

    def flush(self) -> None: ...

    def punch_hole(self, offset: int, length: int) -> bool:
        """Deallocate host space; the range then reads as zeros. False if unsupported."""
        ...

    def length(self) -> int: ...

    def truncate(self, length: int) -> None: ...

    def close(self) -> None: ...


@functools.cache
def _libc_fallocate() -> Callable[[int, int, int, int], int] | None:
    """libc's fallocate(2), loaded on the first hole punch (most processes never punch)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)  # the C library already in the process
        func = libc.fallocate64
    except (OSError, AttributeError):
        return None
    func.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    func.restype = ctypes.c_int
    return cast(Callable[[int, int, int, int], int], func)


def _fallocate(fd: int, mode: int, offset: int, length: int) -> int:
    func = _libc_fallocate()
    if func is None:
        ctypes.set_errno(errno.ENOSYS)
        return -1
    return func(fd, mode, offset, length)


def _io_error(exc: OSError, what: str) -> ImageError:
    return ImageError(exc.errno or errno.EIO, f"{what}: {exc.strerror or exc}")


class FileStorage:
    """A regular file (or block device) opened with ``os.open``."""

    def __init__(
        self, path: str, read_only: bool = False, create: bool = False, access: Access | None = None
    ) -> None:
        """Open ``path`` and take QEMU's image locks for ``access`` (default: a reader's or a
        writer's, by ``read_only``) before anything is read. ``create`` makes the file or
        empties it, but only once the locks are ours: a file another program has open is
        refused, not truncated (QEMU's order too)."""
        flags = os.O_RDONLY if read_only else os.O_RDWR
        if create:
            flags |= os.O_CREAT
        flags |= getattr(os, "O_CLOEXEC", 0)
        try:
            self._fd = os.open(path, flags, 0o644)
        except OSError as exc:
            raise _io_error(exc, f"Could not open '{path}'") from exc
        self.path = path
        try:
            self.lock(access or (READER if read_only else WRITER))
            if create:
                os.ftruncate(self._fd, 0)
        except OSError as exc:
            os.close(self._fd)
            raise _io_error(exc, f"Could not open '{path}'") from exc
        except BaseException:
            os.close(self._fd)
            raise
        self._read_only = read_only
        self._can_punch = True
        self._flush_failed = False
        self._nowait = hasattr(os, "RWF_NOWAIT")

    @property
    def read_only(self) -> bool:
        return self._read_only

    def lock(self, access: Access) -> None:
        """Take ``access``'s image locks too (see :func:`locking.lock`), as QEMU does when it
        opens a file it has just created."""
        locking.lock(self._fd, self.path, access)

    @property
    def fd(self) -> int:
        return self._fd

    def pread(self, length: int, offset: int) -> bytes:
        try:
            data = os.pread(self._fd, length, offset)
            while len(data) < length:
                more = os.pread(self._fd, length - len(data), offset + len(data))
                if not more:
                    return data + bytes(length - len(data))
                data += more
        except OSError as exc:
            raise _io_error(exc, "read failed") from exc
        return data

    def pread_nowait(self, length: int, offset: int) -> bytearray | None:
        """All ``length`` bytes if the page cache holds them, else None: never waits for the disk
        (``preadv`` with ``RWF_NOWAIT``). None also where the kernel or filesystem lacks it."""
        if not self._nowait:
            return None
        buf = bytearray(length)
        try:
            n = _preadv(self._fd, [buf], offset, _RWF_NOWAIT)
        except BlockingIOError:
            return None
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                self._nowait = False
                return None
            raise _io_error(exc, "read failed") from exc
        return buf if n == length else None  # short: part uncached, or the end of the file

    def is_cached(self, offset: int, length: int) -> bool:
        """Whether the first and last byte of the range are in the page cache (a cheap probe
        with ``RWF_NOWAIT``; readahead makes the middle follow). False where it cannot tell."""
        if not self._nowait or length <= 0:
            return False
        probe = bytearray(1)
        try:
            return all(
                os.preadv(self._fd, [probe], at, os.RWF_NOWAIT) == 1 for at in (offset, offset + length - 1)
            )
        except OSError:
            return False

    def sendfile(self, out_fd: int, offset: int, length: int) -> int:
        """Copy up to ``length`` bytes at ``offset`` to the (non-blocking) socket ``out_fd`` inside
        the kernel; returns how many went before the socket was full (0 if sendfile is refused)."""
        sent = 0
        try:
            while sent < length:
                n = os.sendfile(out_fd, self._fd, offset + sent, length - sent)
                if n == 0:  # end of file: the caller sends the rest (zeros) itself
                    break
                sent += n
        except BlockingIOError:
            pass
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                raise _io_error(exc, "sendfile failed") from exc
        return sent

    def pwrite(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        view = memoryview(data)
        try:
            while view:
                written = os.pwrite(self._fd, view, offset)
                view = view[written:]
                offset += written
        except OSError as exc:
            raise _io_error(exc, "write failed") from exc

    def flush(self) -> None:
        """fdatasync; once it has failed, every later flush fails too.

        After a failed fdatasync Linux may mark the unwritten pages clean, so a second
        fdatasync would "succeed" for data that never reached the disk (QEMU's file
        driver refuses later flushes for the same reason).
        """
        if self._flush_failed:
            raise ImageError(errno.EIO, "flush failed earlier; data written since may be lost")
        try:
            os.fdatasync(self._fd)
        except OSError as exc:
            self._flush_failed = True
            raise _io_error(exc, "flush failed") from exc

    def punch_hole(self, offset: int, length: int) -> bool:
        if not self._can_punch or length <= 0:
            return False
        mode = _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE
        if _fallocate(self._fd, mode, offset, length) == 0:
            return True
        err = ctypes.get_errno()
        if err in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            self._can_punch = False
            return False
        raise ImageError(err, f"hole punch failed: {os.strerror(err)}")

    def length(self) -> int:
        try:
            return os.fstat(self._fd).st_size
        except OSError as exc:
            raise _io_error(exc, "stat failed") from exc

    def data_runs(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        """(offset, length, is_data) runs over [offset, offset+length), by SEEK_DATA/SEEK_HOLE.

        Holes read as zeros. Where the filesystem cannot tell, everything is data.
        """
        end = offset + length
        runs: list[tuple[int, int, bool]] = []
        pos = offset
        while pos < end:
            try:
                data = os.lseek(self._fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # no data after pos: a hole up to the end
                    data = end
                else:
                    return [(offset, length, True)]
            data = min(data, end)
            if data > pos:
                runs.append((pos, data - pos, False))
                pos = data
                continue
            try:
                hole = min(os.lseek(self._fd, pos, os.SEEK_HOLE), end)
            except OSError:
                return [(offset, length, True)]
            if hole <= pos:  # the file changed under us; call the rest data
                hole = end
            runs.append((pos, hole - pos, True))
            pos = hole
        return runs

    def allocated_bytes(self) -> int:
        """Host bytes the file occupies (``actual-size`` in qemu-img info)."""
        return os.fstat(self._fd).st_blocks * 512

    def truncate(self, length: int) -> None:
        try:
            os.ftruncate(self._fd, length)
        except OSError as exc:
            raise _io_error(exc, "truncate failed") from exc

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
