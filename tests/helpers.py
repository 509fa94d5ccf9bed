"""Helpers shared by the tests: run a command, drive the QEMU tools and qednbd, peek at headers.

Tests import these directly (``from helpers import run``); pyproject.toml puts ``tests/`` on
pytest's ``pythonpath``.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent

StrPath = str | os.PathLike[str]


class CommandFailed(AssertionError):
    """A command run with ``check=True`` exited non-zero; the message carries its output."""


def run(
    cmd: list[str],
    check: bool = True,
    input: str | None = None,
    timeout: float = 60,
    env: dict[str, str] | None = None,
    cwd: StrPath | None = None,
    preexec_fn: Callable[[], object] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` capturing text stdout/stderr; with ``check``, fail showing both."""
    proc = subprocess.run(
        cmd,
        input=input,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=cwd,
        preexec_fn=preexec_fn,
        check=False,
    )
    if check and proc.returncode != 0:
        raise CommandFailed(
            f"command failed with exit code {proc.returncode}: {' '.join(cmd)}\n"
            f"--- stdout ---\n{proc.stdout}--- stderr ---\n{proc.stderr}"
        )
    return proc


def qemu_img(*args: StrPath, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``qemu-img ARGS...``."""
    return run(["qemu-img", *(os.fspath(a) for a in args)], check=check, timeout=timeout)


def qemu_io(
    path: StrPath, *commands: str, fmt: str = "qed", check: bool = True, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """``qemu-io -f FMT -c CMD ... PATH``.

    qemu-io exits 0 even when a command inside it fails; look at stdout/stderr as well.
    """
    cmd = ["qemu-io", "-f", fmt]
    for c in commands:
        cmd += ["-c", c]
    cmd.append(os.fspath(path))
    return run(cmd, check=check, timeout=timeout)


def qednbd(
    *args: StrPath | int,
    input: str | None = None,
    timeout: float = 60,
    cwd: StrPath | None = None,
    preexec_fn: Callable[[], object] | None = None,
) -> subprocess.CompletedProcess[str]:
    """``python -m qednbd ARGS...`` from this checkout; never raises on exit status."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return run(
        [sys.executable, "-m", "qednbd", *(str(a) if isinstance(a, int) else os.fspath(a) for a in args)],
        check=False,
        input=input,
        timeout=timeout,
        env=env,
        cwd=cwd,
        preexec_fn=preexec_fn,
    )


def stop_process(proc: subprocess.Popen, timeout: float = 10) -> None:  # type: ignore[type-arg]
    """SIGTERM, then SIGKILL after ``timeout`` seconds; returns once the process is gone."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)


def read_features(path: StrPath) -> int:
    """The QED header's ``features`` field: a little-endian u64 at byte 16."""
    with open(path, "rb") as f:
        f.seek(16)
        raw = f.read(8)
    if len(raw) != 8:
        raise ValueError(f"{os.fspath(path)}: too short for a QED header")
    return int.from_bytes(raw, "little")


# -- layer specs for tests/interop/conftest.py's make_layers -------------------------


def qed_layer(name: str, size: str, *ops: str, cs: str | None = None, ts: int | None = None, **kw: object):
    spec: dict[str, object] = {"name": name, "fmt": "qed", "size": size, "ops": list(ops), **kw}
    if cs:
        spec["cluster_size"] = cs
    if ts:
        spec["table_size"] = ts
    return spec


def raw_layer(name: str, size: str, *ops: str) -> dict[str, object]:
    return {"name": name, "fmt": "raw", "size": size, "ops": list(ops)}


def digest(path: StrPath) -> str:
    """A hash of the file's length and of every data extent (holes read as zeros, so a
    sparse file of any size hashes in time proportional to its data)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        fd = f.fileno()
        size = os.fstat(fd).st_size
        h.update(size.to_bytes(8, "little"))
        pos = 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole is left
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            h.update(start.to_bytes(8, "little"))
            f.seek(start)
            left = end - start
            while left > 0:
                block = f.read(min(left, 1 << 20))
                h.update(block)
                left -= len(block)
            pos = end
    return h.hexdigest()


def evict_page_cache(path: StrPath) -> None:
    """Write back and drop a file's pages from the page cache, so the next read goes to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
