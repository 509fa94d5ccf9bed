"""Image locks that QEMU's tools and qednbd both honour (issue 7), in each direction.

qednbd holding an image (``qednbd serve``, read-write or read-only) must make QEMU's tools
refuse what QEMU's own locks would refuse, and QEMU holding an image (``qemu-nbd``, a
``qemu-io`` session) must make qednbd refuse the same; ``-U`` inspects an image in use; the
locks go with their holder, also when it is killed with SIGKILL. Every refusal is checked
for its one-line message and its exit status, and for leaving the image untouched.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import digest, qednbd, qemu_img, qemu_io, run, stop_process

pytestmark = pytest.mark.interop

WRITE_LOCK = 'Failed to get "write" lock'
SHARED_WRITE_LOCK = 'Failed to get shared "write" lock'


@pytest.fixture
def chain(tmp_path: Path) -> tuple[Path, Path]:
    """top.qed (with data of its own) over base.qed (with data), both 64 MiB."""
    base, top = tmp_path / "base.qed", tmp_path / "top.qed"
    qemu_img("create", "-q", "-f", "qed", base, "64M")
    qemu_io(base, "write -P 0xbb 0 1M")
    qemu_img("create", "-q", "-f", "qed", "-b", "base.qed", "-F", "qed", top)
    qemu_io(top, "write -P 0xcc 1M 64k")
    return top, base


def held_bytes(pid: int, path: Path) -> set[int]:
    """The lock bytes process ``pid`` holds on ``path`` (from /proc/PID/fdinfo)."""
    st = os.stat(path)
    key = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    out: set[int] = set()
    for fd in os.listdir(f"/proc/{pid}/fdinfo"):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/fdinfo/{fd}") as f:
            for line in f:
                words = line.split()
                if words[:1] == ["lock:"] and key in words:
                    at = words.index(key)
                    out.update(range(int(words[at + 1]), int(words[at + 2]) + 1))
    return out


def locks_on(path: Path) -> list[str]:
    """Every line of /proc/locks about ``path``."""
    st = os.stat(path)
    key = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    with open("/proc/locks") as f:
        return [line for line in f if key in line.split()]


def assert_refused(proc: subprocess.CompletedProcess[str], lock: str, *also: str) -> None:
    """A non-zero exit and, for qednbd, exactly one line naming the lock and the holder."""
    assert proc.returncode != 0, proc
    assert lock in proc.stderr, proc.stderr
    for text in also:
        assert text in proc.stderr, proc.stderr


def assert_one_line(proc: subprocess.CompletedProcess[str]) -> None:
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("qednbd: "), proc.stderr
    assert "Traceback" not in proc.stderr


@contextlib.contextmanager
def qemu_nbd(image: Path, *args: str, force_share: bool = False) -> Iterator[subprocess.Popen[bytes]]:
    """``qemu-nbd -t -f qed ARGS IMAGE`` on a Unix socket, once it serves; killed at the end.
    qemu-nbd 7.2 has no -U: ``force_share`` says force-share=on in --image-opts instead.

    "Serves" means a client completed the handshake: qemu-nbd creates its socket before it
    sets up the export, whose permissions may still change the image's locks."""
    sock = image.parent / f"qemu-nbd-{time.monotonic_ns()}.sock"
    what = ["-f", "qed", str(image)]
    if force_share:
        what = ["--image-opts", f"driver=qed,file.driver=file,file.filename={image},force-share=on"]
    proc = subprocess.Popen(
        ["qemu-nbd", "-t", *args, "-k", str(sock), *what],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        uri = f"nbd+unix:///?socket={sock}"
        _wait_for(
            lambda: proc.poll() is not None
            or (sock.exists() and run(["nbdinfo", "--size", uri], check=False).returncode == 0),
            "qemu-nbd to serve",
        )
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        yield proc
    finally:
        stop_process(proc)


@contextlib.contextmanager
def qemu_io_session(image: Path, *args: str) -> Iterator[subprocess.Popen[str]]:
    """An interactive qemu-io holding ``image`` open (it waits for commands on stdin)."""
    proc = subprocess.Popen(
        ["qemu-io", "-f", "qed", *args, str(image)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        _wait_for(lambda: bool(locks_on(image)) or proc.poll() is not None, "qemu-io to open the image")
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        yield proc
    finally:
        stop_process(proc)


def _wait_for(ready: object, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():  # type: ignore[operator]
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


# -- qednbd holds the image; QEMU's tools and a second qednbd are refused ------------------------


def test_qednbd_serve_refuses_qemu_writers_and_a_second_server(nbd_server, chain) -> None:  # type: ignore[no-untyped-def]
    top, base = chain
    server = nbd_server(top, unix=True)
    before = digest(top)

    assert_refused(qemu_img("check", "-r", "all", top, check=False), WRITE_LOCK)
    assert_refused(qemu_io(top, "write -P 0x11 0 4k", check=False), WRITE_LOCK)
    assert_refused(qemu_img("resize", top, "+1M", check=False), WRITE_LOCK)
    assert_refused(qemu_img("info", top, check=False), SHARED_WRITE_LOCK)
    # the backing file is held as a reader: QEMU may read it, not write it
    assert_refused(qemu_io(base, "write -P 0x11 0 4k", check=False), WRITE_LOCK)
    read = run(["qemu-io", "-r", "-f", "qed", "-c", "read -P 0xbb 0 4k", str(base)])
    assert "read 4096/4096" in read.stdout, read

    second = qednbd("serve", "-k", top.parent / "second.sock", top)
    assert_refused(second, WRITE_LOCK, "open for writing", f"pid {server.pid}")
    assert_one_line(second)
    reader = qednbd("serve", "-r", "-k", top.parent / "third.sock", top)
    assert_refused(reader, SHARED_WRITE_LOCK, "open for writing", f"pid {server.pid}")
    assert_one_line(reader)

    # -U inspects it
    info = qemu_img("info", "-U", "--output=json", top)
    assert '"format": "qed"' in info.stdout
    ours = qednbd("info", "-U", top)
    assert ours.returncode == 0 and "file format: qed" in ours.stdout, ours

    # the server served throughout, and nothing the refused tools did reached the image
    assert server.alive()
    assert server.stop() == 0
    assert digest(top) == before
    qemu_img("check", top)
    assert qemu_io(top, "read -P 0xcc 1M 64k").returncode == 0


def test_qednbd_read_only_export_lets_readers_in_and_keeps_writers_out(nbd_server, chain) -> None:  # type: ignore[no-untyped-def]
    top, _ = chain
    server = nbd_server("-r", top, unix=True)
    assert_refused(qemu_io(top, "write 0 4k", check=False), WRITE_LOCK)
    assert_refused(qemu_img("check", "-r", "all", top, check=False), WRITE_LOCK)
    writer = qednbd("serve", "-k", top.parent / "w.sock", top)
    assert_refused(writer, WRITE_LOCK, "open read-only and does not share write access", f"pid {server.pid}")
    assert_one_line(writer)
    # readers share: qemu-io -r, qemu-img check, a second read-only qednbd
    assert (
        "read 65536/65536"
        in run(["qemu-io", "-r", "-f", "qed", "-c", "read -P 0xcc 1M 64k", str(top)]).stdout
    )
    qemu_img("check", top)
    assert nbd_server("-r", top, unix=True).alive()
    assert server.alive()


def test_an_export_that_is_another_exports_backing_file(nbd_server, chain, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Serving base.qed read-write beside top.qed (whose backing file it is) would change what
    top.qed's clients read: refused, and the message says the other open is this server's."""
    top, base = chain
    proc = qednbd("serve", "-k", tmp_path / "s.sock", base, top)
    assert_refused(
        proc, SHARED_WRITE_LOCK, "this process (another of its opens) has the image open for writing"
    )
    assert "Could not open backing file" in proc.stderr
    assert_one_line(proc)
    readers = nbd_server("-r", base, top, unix=True)  # read-only, both: readers share
    assert "export 'base.qed'" in readers.log() and "export 'top.qed'" in readers.log()


def test_qednbd_check_r_refuses_while_qemu_io_reads(chain) -> None:  # type: ignore[no-untyped-def]
    top, _ = chain
    with qemu_io_session(top, "-r"):
        repair = qednbd("check", "-r", "all", top)
        assert_refused(repair, WRITE_LOCK, "open read-only and does not share write access", "qemu-io")
        assert_one_line(repair)
        assert qednbd("check", top).returncode == 0  # a reader beside a reader


# -- QEMU holds the image; qednbd is refused -------------------------------------------------------


def test_qemu_nbd_refuses_qednbd_serve_and_repair(chain, tmp_path) -> None:  # type: ignore[no-untyped-def]
    top, _ = chain
    before = digest(top)
    with qemu_nbd(top) as holder:
        for args in (
            ("serve", "-k", tmp_path / "a.sock", top),
            ("check", "-r", "all", top),
            ("resize", top, "+1M"),
            ("rebase", "-u", "-b", "", top),
            ("create", "-f", "qed", top, "1M"),
        ):
            proc = qednbd(*args)
            assert_refused(proc, WRITE_LOCK, "open for writing", f"qemu-nbd, pid {holder.pid}")
            assert_one_line(proc)
        for args in (("serve", "-r", "-k", tmp_path / "b.sock", top), ("check", top), ("info", top)):
            proc = qednbd(*args)
            assert_refused(proc, SHARED_WRITE_LOCK, "open for writing", f"qemu-nbd, pid {holder.pid}")
            assert_one_line(proc)
        # -U inspects an image in use
        info = qednbd("info", "-U", top)
        assert info.returncode == 0 and "virtual size: 64 MiB" in info.stdout, info
        assert qednbd("check", "-U", top).returncode == 0
        assert qednbd("map", "-U", top).returncode == 0
        out = tmp_path / "copy.raw"
        assert qednbd("convert", "-U", "-O", "raw", top, out).returncode == 0
        assert out.stat().st_size == 64 << 20
        # -U is for reading only
        bad = qednbd("check", "-U", "-r", "all", top)
        assert bad.returncode != 0 and "read-only" in bad.stderr
        assert_one_line(bad)
        bad = qednbd("serve", "-U", "-k", tmp_path / "c.sock", top)
        assert bad.returncode != 0 and "read-only" in bad.stderr
        assert holder.poll() is None
    assert digest(top) == before


def test_qemu_io_session_refuses_qednbd(chain, tmp_path) -> None:  # type: ignore[no-untyped-def]
    top, base = chain
    with qemu_io_session(top) as holder:
        serve = qednbd("serve", "-k", tmp_path / "a.sock", top)
        assert_refused(serve, WRITE_LOCK, "open for writing", f"qemu-io, pid {holder.pid}")
        assert_one_line(serve)
        repair = qednbd("check", "-r", "all", top)
        assert_refused(repair, WRITE_LOCK, "open for writing", f"qemu-io, pid {holder.pid}")
        assert qednbd("info", "-U", top).returncode == 0
        # qemu-io holds the backing file as a reader: qednbd may read it, not write it
        assert_refused(qednbd("resize", base, "+1M"), WRITE_LOCK, "open read-only")
        assert qednbd("check", base).returncode == 0


def test_convert_never_touches_a_destination_in_use(chain, tmp_path) -> None:  # type: ignore[no-untyped-def]
    top, _ = chain
    dest = tmp_path / "dest.qed"
    qemu_img("create", "-q", "-f", "qed", dest, "8M")
    qemu_io(dest, "write -P 0x5a 0 64k")
    before = digest(dest)
    with qemu_nbd(dest):
        for fmt in ("qed", "raw"):
            proc = qednbd("convert", "-O", fmt, top, dest)
            assert_refused(proc, WRITE_LOCK, "open for writing", "qemu-nbd")
            assert_one_line(proc)
            assert dest.exists() and digest(dest) == before
    # a source that cannot be opened leaves an existing destination alone as well
    missing = qednbd("convert", "-O", "qed", tmp_path / "missing.qed", dest)
    assert missing.returncode != 0 and dest.exists() and digest(dest) == before


# -- locks go with their holder --------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_qednbd_locks_vanish_when_the_server_exits(nbd_server, chain, sig) -> None:  # type: ignore[no-untyped-def]
    top, base = chain
    server = nbd_server(top, unix=True)
    assert held_bytes(server.pid, top) == {100, 101, 103, 201, 203}
    assert held_bytes(server.pid, base) == {100, 201, 203}
    server.stop(sig)
    assert locks_on(top) == [] and locks_on(base) == []
    # QEMU may now repair (the SIGKILLed server left it dirty) and write it
    qemu_img("check", "-r", "all", top)
    qemu_io(top, "write -P 0x22 0 4k")
    qemu_io(base, "write -P 0x22 0 4k")


def test_qemu_locks_vanish_after_sigkill(chain, nbd_server) -> None:  # type: ignore[no-untyped-def]
    top, base = chain
    with qemu_nbd(top) as holder:
        assert held_bytes(holder.pid, top) == {100, 101, 103, 201, 203}
        assert qednbd("check", "-r", "all", top).returncode != 0
        holder.kill()
        holder.wait(10)
        assert locks_on(top) == [] and locks_on(base) == []
        server = nbd_server(top, unix=True)
        assert held_bytes(server.pid, top) == {100, 101, 103, 201, 203}


def test_the_same_bytes_as_qemu_nbd(nbd_server, chain, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """qednbd serve holds exactly what qemu-nbd holds, read-write, read-only and read-only -U."""
    top, base = chain
    for ours, theirs, share in ((), (), False), (("-r",), ("-r",), False), (("-r", "-U"), ("-r",), True):
        with qemu_nbd(top, *theirs, force_share=share) as q:
            expected = (held_bytes(q.pid, top), held_bytes(q.pid, base))
        server = nbd_server(*ours, top, unix=True)
        assert (held_bytes(server.pid, top), held_bytes(server.pid, base)) == expected, ours
        server.stop()


def test_copy_of_an_image_in_use_is_its_own_file(chain, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Locks belong to the file, not its name or contents: a copy is free."""
    top, _ = chain
    copy = tmp_path / "copy.qed"
    with qemu_nbd(top):
        shutil.copy(top, copy)
        assert qednbd("check", "-r", "all", copy).returncode == 0


# -- a filesystem without OFD locks: one line in the log, and on ------------------------------------

SECCOMP_NOLOCK = Path(__file__).resolve().parent.parent / "seccomp_nolock.py"
LOCKLESS = "does not support image locking"


def _without_locks(errno_name: str, *command: str | os.PathLike[str]) -> list[str]:
    """``command`` with every OFD lock call failing with ``errno_name`` (a seccomp filter)."""
    probe = run(["/usr/bin/python3", "-c", "import seccomp"], check=False)
    if probe.returncode != 0:
        pytest.fail("Debian's python3-seccomp is missing: run scripts/test.sh, which installs it")
    return ["/usr/bin/python3", str(SECCOMP_NOLOCK), errno_name, *(os.fspath(c) for c in command)]


@pytest.mark.parametrize("errno_name", ["ENOLCK", "EINVAL"])
def test_server_without_locks_says_so_once_and_serves(chain, tmp_path, errno_name) -> None:  # type: ignore[no-untyped-def]
    import sys

    from helpers import REPO_ROOT
    from serverkit import RunningServer, wait_listening

    top, base = chain
    sock, log_path = tmp_path / "s.sock", tmp_path / "server.log"
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            _without_locks(errno_name, sys.executable, "-m", "qednbd", "serve", "-k", sock, top),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
    server = RunningServer(proc, log_path)
    try:
        wait_listening(server)
        assert locks_on(top) == [] and locks_on(base) == []
        uri = f"nbd+unix:///?socket={sock}"
        run(["qemu-io", "-f", "raw", "-c", "write -P 0x77 0 64k", uri])
        assert "read 65536/65536" in run(["qemu-io", "-f", "raw", "-c", "read -P 0x77 0 64k", uri]).stdout
        assert server.stop() == 0
    finally:
        if server.alive():
            server.stop(signal.SIGKILL)
    lines = [line for line in server.log().splitlines() if LOCKLESS in line]
    assert len(lines) == 1, server.log()  # two files on one filesystem: said once
    assert "going on without locks" in lines[0]
    qemu_img("check", top)


def test_commands_without_locks_warn_once_and_work(chain, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import sys

    from helpers import REPO_ROOT

    top, _ = chain
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    for args in (
        ("check", "-r", "all", top),
        ("map", top),
        ("convert", "-O", "qed", top, tmp_path / "c.qed"),
    ):
        cmd = _without_locks("ENOLCK", sys.executable, "-m", "qednbd", *args)
        proc = run(cmd, env=env)
        warnings = [line for line in proc.stderr.splitlines() if LOCKLESS in line]
        assert len(warnings) == 1 and warnings[0].startswith("qednbd: warning: "), proc.stderr
    qemu_img("check", tmp_path / "c.qed")
