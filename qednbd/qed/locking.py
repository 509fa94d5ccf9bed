"""Image locks that QEMU understands: open-file-description byte locks on the image file.

QEMU (``block/file-posix.c``) marks what each open of an image does with shared
``F_OFD_SETLK`` read locks on single bytes of the file, far past anything it reads as
data locks (the bytes are only lock names; nothing is read or written there):

- byte ``100 + i``: this open *uses* permission ``i``;
- byte ``200 + i``: this open *refuses to share* permission ``i`` with anyone else;

with the permissions consistent read (0), write (1), write unchanged (2), resize (3).
An open first takes its bytes, then tests (``F_OFD_GETLK`` with a write lock, which any
other open's read lock conflicts with) byte ``200 + i`` for each permission it uses and
byte ``100 + i`` for each it refuses; a hit means another open refuses what we need, or
uses what we refuse, and the open fails with QEMU's words (``Failed to get "write"
lock``). Taking before testing means two opens racing cannot both miss each other.

What QEMU holds on a QED image (read off its tools with strace and /proc/locks):

====================  ======  =====================  =========================
open                  uses    refuses to share       QEMU tools that hold it
====================  ======  =====================  =========================
read-write            read,   write, resize          qemu-nbd, qemu-io,
                      write,                         qemu-img check -r/resize/
                      resize                         rebase, a VM's disk
read-only             read    write, resize          qemu-nbd -r, qemu-io -r,
                                                     qemu-img check/map/convert
                                                     (source), backing files
header only           --      write, resize          qemu-img info
force-share (``-U``)  read    --                     ``-U`` on read-only opens
create                write,  resize                 qemu-img create, convert's
                      resize                         destination before copying
raw write             read,   --                     convert's raw destination
                      write                          (taken on top of create's)
====================  ======  =====================  =========================

So a writer excludes every other open but ``-U`` readers, readers exclude writers, and
``-U`` inspects anything. The locks belong to the open file description, not the
process: they last while its descriptor is open and vanish when it is closed, also when
the process is killed. A second open of the same file inside one process is "another
process" here, as it is for QEMU.

A filesystem that refuses these locks (NFS without a lock manager, some FUSE and 9p
mounts, a kernel before 3.15) is reported once in the log and the image is used without
locks, as QEMU's ``locking=auto`` does.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
from dataclasses import dataclass
from enum import IntFlag

from qednbd.errors import ImageError

log = logging.getLogger("qednbd.locking")

PERM_BASE = 100  # QEMU's RAW_LOCK_PERM_BASE: libvirt owns byte 0, QEMU starts higher
SHARED_BASE = 200  # QEMU's RAW_LOCK_SHARED_BASE
_UNSUPPORTED = frozenset({errno.EINVAL, errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS})
_HELD = frozenset({errno.EAGAIN, errno.EACCES})  # someone holds a write lock on the byte


class Perm(IntFlag):
    """QEMU's block permissions, in its bit order (the lock byte is the base plus the bit's index)."""

    CONSISTENT_READ = 0x1
    WRITE = 0x2
    WRITE_UNCHANGED = 0x4
    RESIZE = 0x8


_PERM_NAMES = {
    Perm.CONSISTENT_READ: "consistent read",
    Perm.WRITE: "write",
    Perm.WRITE_UNCHANGED: "write unchanged",
    Perm.RESIZE: "resize",
}
_ALL = tuple(Perm)
_LOCK_BYTES = (*range(PERM_BASE, PERM_BASE + len(_ALL)), *range(SHARED_BASE, SHARED_BASE + len(_ALL)))


@dataclass(frozen=True, slots=True)
class Access:
    """What one open of an image uses, and what it refuses to share with other opens."""

    name: str
    uses: Perm
    refuses: Perm


NO_PERMS = Perm(0)
WRITER = Access("read-write", Perm.CONSISTENT_READ | Perm.WRITE | Perm.RESIZE, Perm.WRITE | Perm.RESIZE)
READER = Access("read-only", Perm.CONSISTENT_READ, Perm.WRITE | Perm.RESIZE)
INSPECTOR = Access("header only", NO_PERMS, Perm.WRITE | Perm.RESIZE)
SHARED_READER = Access("read-only, force-share", Perm.CONSISTENT_READ, NO_PERMS)
# QEMU's file-create step (before it writes a new image: create, convert's destination), and
# what it holds on a raw convert destination while it copies
CREATOR = Access("create", Perm.WRITE | Perm.RESIZE, Perm.RESIZE)
RAW_WRITER = Access("read-write, raw", Perm.CONSISTENT_READ | Perm.WRITE, NO_PERMS)
SHARED_INSPECTOR = Access("header only, force-share", NO_PERMS, NO_PERMS)


def shared(access: Access) -> Access:
    """The same open with ``-U``: nothing refused to others. Only read-only opens may ask."""
    if access.uses & (Perm.WRITE | Perm.RESIZE):
        raise ImageError(errno.EINVAL, "force-share=on can only be used with read-only images")
    return SHARED_READER if access.uses else SHARED_INSPECTOR


class LockConflict(ImageError):
    """Another open of the image holds what this one needs, or needs what this one refuses."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.EAGAIN, message)


class _Flock(ctypes.Structure):
    """``struct flock`` as the kernel lays it out (ctypes supplies the padding)."""

    _fields_ = [
        ("l_type", ctypes.c_short),
        ("l_whence", ctypes.c_short),
        ("l_start", ctypes.c_int64),
        ("l_len", ctypes.c_int64),
        ("l_pid", ctypes.c_int),  # must be 0 for OFD locks
    ]


def _fcntl(fd: int, command: int, lock_type: int, start: int, length: int = 1) -> int:
    """One OFD lock call on [start, start + length); returns the l_type the kernel gives back."""
    request = _Flock(lock_type, os.SEEK_SET, start, length, 0)
    answer = fcntl.fcntl(fd, command, bytes(request))
    return int(_Flock.from_buffer_copy(answer).l_type)


def _held_by_others(fd: int, byte: int) -> bool:
    """Whether any other open file description holds a lock on ``byte``."""
    return _fcntl(fd, fcntl.F_OFD_GETLK, fcntl.F_WRLCK, byte) != fcntl.F_UNLCK


# The filesystems (st_dev) already named in the log as refusing locks: process-wide by
# nature, since the log should say it once.
_reported_devices: set[int] = set()


def lock(fd: int, path: str, access: Access) -> None:
    """Take ``access``'s locks on the open file ``fd`` as QEMU does, or raise :class:`LockConflict`.

    Locks ``fd`` already holds are kept (QEMU's create step, then the image's own open), but a
    conflict drops all of them. They last until ``fd`` is closed. Where the filesystem has no
    OFD locks this says so in the log (once per filesystem) and returns holding none.
    """
    mine = [PERM_BASE + i for i, p in enumerate(_ALL) if p & access.uses]
    mine += [SHARED_BASE + i for i, p in enumerate(_ALL) if p & access.refuses]
    try:
        for byte in mine:
            try:
                _fcntl(fd, fcntl.F_OFD_SETLK, fcntl.F_RDLCK, byte)
            except OSError as exc:
                if exc.errno not in _HELD:
                    raise
                _release(fd)
                raise LockConflict(_conflict(fd, f"Failed to lock byte {byte}")) from None
        problem = _first_conflict(fd, access)
    except OSError as exc:
        if exc.errno in _UNSUPPORTED:
            _report_unsupported(fd, path, exc)
            return
        raise ImageError(exc.errno or errno.EIO, f"Failed to lock '{path}': {exc.strerror}") from exc
    if problem is not None:
        _release(fd)  # first, so that /proc shows only the others' locks
        raise LockConflict(_conflict(fd, problem))


def _first_conflict(fd: int, access: Access) -> str | None:
    """QEMU's test, in QEMU's order: what we use against what others refuse, then the reverse."""
    for i, perm in enumerate(_ALL):
        if perm & access.uses and _held_by_others(fd, SHARED_BASE + i):
            return f'Failed to get "{_PERM_NAMES[perm]}" lock'
    for i, perm in enumerate(_ALL):
        if perm & access.refuses and _held_by_others(fd, PERM_BASE + i):
            return f'Failed to get shared "{_PERM_NAMES[perm]}" lock'
    return None


def _release(fd: int) -> None:
    """Drop every lock this open holds on QEMU's bytes (nothing else of ours is locked)."""
    _fcntl(fd, fcntl.F_OFD_SETLK, fcntl.F_UNLCK, PERM_BASE, _LOCK_BYTES[-1] + 1 - PERM_BASE)


def _conflict(fd: int, what: str) -> str:
    """QEMU's words, then what the other opens are doing and, where /proc shows it, who they are."""
    others = {b for b in _LOCK_BYTES if _held_by_others(fd, b)}
    holders = find_holders(os.fstat(fd), others)
    ours = bool(holders) and all(pid == os.getpid() for _, pid in holders)  # e.g. an export and
    who = "this process (another of its opens)" if ours else "another process"  # a backing file
    if PERM_BASE + 1 in others:  # someone writes
        doing = f"{who} has the image open for writing"
    elif PERM_BASE in others:  # someone reads
        doing = f"{who} has the image open read-only"
        if SHARED_BASE + 1 in others:
            doing += " and does not share write access"
    elif others & {SHARED_BASE + 1, SHARED_BASE + 3}:
        doing = (
            f"{who} has the image open (header only, such as qemu-img info) and does not share write access"
        )
    else:
        doing = f"{who} is using the image"
    named = "; ".join(f"{name}, pid {pid}" for name, pid in holders)
    return f"{what}: {doing}" + (f" ({named})" if named else "")


def find_holders(target: os.stat_result, offsets: set[int], limit: int = 4) -> list[tuple[str, int]]:
    """(name, pid) of the processes whose open descriptors of the file lock any of ``offsets``.

    Read from ``/proc/PID/fdinfo`` (which lists an open file's OFD locks); processes we
    may not look into, or in another PID namespace, are not found. Only called after a
    conflict, so its cost (a stat per open descriptor on the machine) is paid rarely.
    """
    key = f"{os.major(target.st_dev):02x}:{os.minor(target.st_dev):02x}:{target.st_ino}"
    found: list[tuple[str, int]] = []
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return found
    for pid in pids:
        if len(found) >= limit:
            break
        if _locks_in(pid, target, key, offsets):
            found.append((_process_name(pid), int(pid)))
    return found


def _locks_in(pid: str, target: os.stat_result, key: str, offsets: set[int]) -> bool:
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            st = os.stat(f"/proc/{pid}/fd/{fd}")
            if (st.st_dev, st.st_ino) != (target.st_dev, target.st_ino):
                continue
            with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                info = f.read()
        except OSError:
            continue
        for line in info.splitlines():
            # lock:	1: OFDLCK ADVISORY  READ -1 fe:00:2146470 100 101
            words = line.split()
            if words[:1] != ["lock:"] or key not in words:
                continue
            at = words.index(key)
            try:
                start, end = int(words[at + 1]), int(words[at + 2])
            except (IndexError, ValueError):
                continue
            if any(start <= b <= end for b in offsets):
                return True
    return False


def _process_name(pid: str) -> str:
    """The command's name; for a Python program (``python -m qednbd``, a script) the program's."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return "?"
    if not argv:
        return "?"
    name = os.path.basename(argv[0])
    if name.startswith("python") and len(argv) > 1:
        rest = argv[1:]
        while rest and rest[0].startswith("-") and rest[0] != "-m":
            rest = rest[1:]
        if rest[:1] == ["-m"] and len(rest) > 1:
            return rest[1]
        if rest:
            return os.path.basename(rest[0])
    return name


def _report_unsupported(fd: int, path: str, exc: OSError) -> None:
    try:
        device = os.fstat(fd).st_dev
    except OSError:
        device = -1
    if device in _reported_devices:
        return
    _reported_devices.add(device)
    log.warning(
        "%s: the filesystem does not support image locking (%s); going on without locks, as QEMU does",
        path,
        exc.strerror or exc,
    )
