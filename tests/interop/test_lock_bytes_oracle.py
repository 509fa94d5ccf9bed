"""Issue 7: every qednbd command takes exactly the OFD lock bytes its QEMU counterpart takes.

QEMU is the oracle. Each pair runs on its own fresh copies of one chain (``top.qed`` over
``base.qed``, both made by qemu-img), in its own directory, once per tool:

* one-shot commands (info, check, map, resize, rebase, convert, create) run under
  ``strace -f -e trace=openat,fcntl``; from the log we take, per file basename, the set of
  ``l_start`` values of every ``F_OFD_SETLK`` with ``l_type=F_RDLCK, l_len=1`` that returned 0
  (a successful lock of any other shape is recorded too, spelled ``F_WRLCK:START+LEN``, so it
  can only cause a mismatch). That is the *union of the bytes each file was locked on over the
  whole run*, for both tools alike: convert's destination and create's file get some bytes in
  QEMU's "create" step and more when the target is opened, and only the union is compared.
  ``F_OFD_GETLK`` probes, unlocks and files other than the test's images (``/dev/null``...)
  are ignored;
* servers (``qemu-nbd`` / ``qednbd serve``) run until they are ready; then the ``lock:`` lines
  of ``/proc/PID/fdinfo/*`` give the bytes they hold (ranges of adjacent bytes are expanded),
  mapped to files by inode, and the server is stopped.

The sets must be equal for every file either tool locked: the image, its backing file,
convert's destination.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import REPO_ROOT, qemu_img, qemu_io

pytestmark = pytest.mark.interop

TRACKED = ("base.qed", "top.qed", "new.qed", "out.raw", "out.qed")
LockMap = dict[str, set[str]]  # file basename -> lock tokens ("100", or "F_WRLCK:100+1" for odd shapes)

_LINE_RE = re.compile(r"^(\d+)\s+(.*)$")
_OPENAT_RE = re.compile(r'^openat\((?:AT_FDCWD|\d+), "((?:[^"\\]|\\.)*)"(?:\.\.\.)?, .*\) = (\d+)$')
_SETLK_RE = re.compile(
    r"^fcntl\((\d+), F_OFD_SETLKW?, \{l_type=(\w+), l_whence=SEEK_SET, "
    r"l_start=(-?\d+), l_len=(-?\d+)(?:, l_pid=\d+)?\}\) = 0$"
)
_UNFINISHED = " <unfinished ...>"
_RESUMED_RE = re.compile(r"^<\.\.\. \w+ resumed>(.*)$")


# -- parsing ---------------------------------------------------------------------------


def _token(l_type: str, start: int, length: int) -> str:
    return str(start) if l_type == "F_RDLCK" and length == 1 else f"{l_type}:{start}+{length}"


def parse_strace(text: str) -> tuple[LockMap, set[str]]:
    """``strace -f`` output -> (locks per tracked basename, tracked basenames opened).

    Both tools are one process (threads share one descriptor table), so a descriptor names
    the file its latest successful ``openat`` returned it for, whichever thread opened it.
    Calls split by another thread (``<unfinished ...>`` / ``<... fcntl resumed>``) are joined.
    """
    pending: dict[str, str] = {}
    fd_file: dict[int, str] = {}
    locks: LockMap = defaultdict(set)
    opened: set[str] = set()
    for raw in text.splitlines():
        match = _LINE_RE.match(raw)
        if match is None:
            continue
        pid, call = match.groups()
        if call.endswith(_UNFINISHED):
            pending[pid] = call[: -len(_UNFINISHED)]
            continue
        resumed = _RESUMED_RE.match(call)
        if resumed is not None:
            call = pending.pop(pid, "") + resumed.group(1)
        if (m := _OPENAT_RE.match(call)) is not None:
            name = os.path.basename(m.group(1))
            fd_file[int(m.group(2))] = name
            if name in TRACKED:
                opened.add(name)
        elif (m := _SETLK_RE.match(call)) is not None:
            fd, l_type, start, length = int(m.group(1)), m.group(2), int(m.group(3)), int(m.group(4))
            name = fd_file.get(fd, "")
            if l_type != "F_UNLCK" and name in TRACKED:
                locks[name].add(_token(l_type, start, length))
    return dict(locks), opened


def parse_fdinfo_locks(pid: int, inodes: dict[int, str]) -> LockMap:
    """The OFD locks a live process holds, from ``/proc/PID/fdinfo/*``:
    ``lock:\\t1: OFDLCK ADVISORY  READ -1 fe:00:INODE START END`` (END inclusive, maybe ``EOF``)."""
    locks: LockMap = defaultdict(set)
    fdinfo = Path(f"/proc/{pid}/fdinfo")
    for entry in fdinfo.iterdir():
        try:
            text = entry.read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue  # closed meanwhile
        for line in text.splitlines():
            if not line.startswith("lock:"):
                continue
            fields = line.split()
            kind, mode, dev_ino, start, end = fields[2], fields[4], fields[6], fields[7], fields[8]
            name = inodes.get(int(dev_ino.rsplit(":", 1)[1]))
            if name is None:
                continue
            l_type = {"READ": "F_RDLCK", "WRITE": "F_WRLCK"}.get(mode, mode)
            if kind != "OFDLCK" or end == "EOF":
                locks[name].add(f"{kind}:{l_type}:{start}-{end}")
                continue
            for byte in range(int(start), int(end) + 1):
                locks[name].add(_token(l_type, byte, 1))
    return dict(locks)


# -- running the tools ---------------------------------------------------------------


def _qednbd_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


def traced(
    cmd: list[str], cwd: Path, log: Path, env: dict[str, str] | None = None
) -> tuple[LockMap, set[str]]:
    """Run ``cmd`` in ``cwd`` under strace; it must succeed. Returns :func:`parse_strace` of its log."""
    full = ["strace", "-f", "-qq", "-s", "4096", "-e", "trace=openat,fcntl", "-o", str(log), *cmd]
    proc = subprocess.run(full, cwd=cwd, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, (
        f"{' '.join(cmd)} (in {cwd.name}/) exited {proc.returncode}\n{proc.stdout}{proc.stderr}"
    )
    return parse_strace(log.read_text(errors="replace"))


def _inodes(directory: Path) -> dict[int, str]:
    return {os.stat(directory / name).st_ino: name for name in TRACKED if (directory / name).exists()}


def qemu_nbd_locks(directory: Path, args: tuple[str, ...]) -> LockMap:
    """Start ``qemu-nbd --fork`` (its parent exits once the export is set up), read the
    daemon's locks, stop it by its pid."""
    pid_file, sock = directory / "qemu-nbd.pid", directory / "qemu-nbd.sock"
    log = directory / "qemu-nbd.log"
    cmd = ["qemu-nbd", "--fork", "--pid-file", str(pid_file), "-k", str(sock), *args]
    with open(log, "wb") as err:
        parent = subprocess.run(
            cmd,
            cwd=directory,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
            timeout=30,
            check=False,
        )
    pid = int(pid_file.read_text().strip()) if pid_file.exists() else None
    try:
        assert parent.returncode == 0 and pid is not None, (
            f"{' '.join(cmd)} exited {parent.returncode}:\n{log.read_text(errors='replace')}"
        )
        return parse_fdinfo_locks(pid, _inodes(directory))
    finally:
        if pid is not None:
            _stop_pid(pid)


def _stop_pid(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if not _alive(pid):
            return
        time.sleep(0.02)
    os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    """False once the process has exited (a daemon's zombie waits for init to reap it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


# -- the pairs ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Pair:
    qemu: tuple[str, ...]  # qemu-img ARGS, or qemu-nbd ARGS but -k (server pairs)
    ours: tuple[str, ...]  # qednbd ARGS, or qednbd serve ARGS but -k and top.qed (server pairs)
    opens: str = "top.qed"  # a file both tools must open (proves the trace was parsed)
    existing: bool = False  # new.qed exists beforehand (a copy of base.qed)
    server: bool = False


def same(*args: str, opens: str = "top.qed", existing: bool = False) -> Pair:
    """A one-shot command spelled alike: ``qemu-img ARGS`` and ``qednbd ARGS``."""
    return Pair(args, args, opens=opens, existing=existing)


PAIRS = {
    "info": same("info", "top.qed"),
    "info-U": same("info", "-U", "top.qed"),
    "check": same("check", "top.qed"),
    "check-U": same("check", "-U", "top.qed"),
    "check-r-all": same("check", "-r", "all", "top.qed"),
    "map": same("map", "top.qed"),
    "map-U": same("map", "-U", "top.qed"),
    "resize": same("resize", "top.qed", "+1M"),
    "rebase-u": same("rebase", "-u", "-b", "base.qed", "-F", "qed", "top.qed"),
    "convert-raw": same("convert", "-O", "raw", "top.qed", "out.raw"),
    "convert-qed": same("convert", "-O", "qed", "top.qed", "out.qed"),
    "convert-U-raw": same("convert", "-U", "-O", "raw", "top.qed", "out.raw"),
    "create": same("create", "-f", "qed", "new.qed", "1M", opens="new.qed"),
    "create-existing": same("create", "-f", "qed", "new.qed", "1M", opens="new.qed", existing=True),
    "serve-rw": Pair(("-f", "qed", "top.qed"), (), server=True),
    "serve-r": Pair(("-r", "-f", "qed", "top.qed"), ("-r",), server=True),
    # qemu-nbd 7.2 has no -U; force-share=on is the block-layer option qemu-img -U sets (children inherit it)
    "serve-r-U": Pair(
        ("-r", "--image-opts", "driver=qed,force-share=on,file.filename=top.qed"), ("-r", "-U"), server=True
    ),
}


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``top.qed`` (data in both layers) over ``base.qed``, made once by the QEMU tools."""
    directory = tmp_path_factory.mktemp("lock-template")
    qemu_img("create", "-q", "-f", "qed", directory / "base.qed", "4M")
    qemu_io(directory / "base.qed", "write -P 0x11 0 256k")
    qemu_img("create", "-q", "-f", "qed", "-b", "base.qed", "-F", "qed", directory / "top.qed", "4M")
    qemu_io(directory / "top.qed", "write -P 0x22 128k 256k")
    return directory


def _fresh(template: Path, directory: Path, pair: Pair) -> Path:
    directory.mkdir()
    for name in ("base.qed", "top.qed"):
        shutil.copyfile(template / name, directory / name)
    if pair.existing:
        shutil.copyfile(template / "base.qed", directory / "new.qed")
    return directory


def _show(locks: LockMap) -> dict[str, list[str]]:
    def key(token: str) -> tuple[int, str]:
        return (int(token), "") if token.isdigit() else (1 << 30, token)

    return {name: sorted(tokens, key=key) for name, tokens in sorted(locks.items()) if tokens}


@pytest.mark.parametrize("name", list(PAIRS))
def test_lock_bytes_match_qemu(name: str, template: Path, tmp_path: Path, nbd_server) -> None:  # type: ignore[no-untyped-def]
    pair = PAIRS[name]
    theirs_dir = _fresh(template, tmp_path / "qemu", pair)
    ours_dir = _fresh(template, tmp_path / "qednbd", pair)
    if pair.server:
        theirs = qemu_nbd_locks(theirs_dir, pair.qemu)
        server = nbd_server(*pair.ours, ours_dir / "top.qed", unix=True)
        try:
            ours = parse_fdinfo_locks(server.pid, _inodes(ours_dir))
        finally:
            server.stop(signal.SIGTERM, timeout=20)
        assert theirs.get("top.qed"), f"qemu-nbd {' '.join(pair.qemu)} held no lock on top.qed: {theirs}"
    else:
        if shutil.which("strace") is None:
            pytest.fail("strace is missing: run scripts/test.sh, which installs it", pytrace=False)
        theirs, theirs_opened = traced(["qemu-img", *pair.qemu], theirs_dir, tmp_path / "qemu.strace")
        ours, ours_opened = traced(
            [sys.executable, "-m", "qednbd", *pair.ours],
            ours_dir,
            tmp_path / "qednbd.strace",
            env=_qednbd_env(),
        )
        assert pair.opens in theirs_opened, f"no openat of {pair.opens} seen in qemu-img's trace"
        assert pair.opens in ours_opened, f"no openat of {pair.opens} seen in qednbd's trace"
    assert _show(ours) == _show(theirs), (
        f"{name}: lock bytes per file differ\n"
        f"  qemu:   {' '.join(pair.qemu)} -> {_show(theirs)}\n"
        f"  qednbd: {' '.join(pair.ours)} -> {_show(ours)}"
    )
