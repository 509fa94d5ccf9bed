"""``qednbd serve`` start-up and lifecycle, seen through the real clients.

* Listeners: an ephemeral TCP port, a Unix socket, IPv6 loopback, systemd socket activation
  (a socket the test creates, passed as fd 3 with LISTEN_FDS/LISTEN_PID); never the default port
  10809 (``test_config.py`` checks that default without binding it).
* Exports: a single FILE is the default export and is also served under its basename; ``-x`` and
  ``-D``; several FILEs; a TOML ``--config`` with several exports (read-only flags, descriptions,
  the default export) as ``nbdinfo --list --json`` shows them; ``--pid-file``.
* Before listening: a dirty damaged image served read-write is repaired (logged, ``qemu-img check``
  finds no corruption, data reads right); one that cannot be made safe (the repair cannot write,
  the backing file is gone) or a malformed image ends the start-up with exit 1 and one line; a
  read-only export of a dirty image is served unrepaired, its file bytes untouched.
* While serving: NEED_CHECK (read from the file while the server runs) is clear after start, set by
  the first allocating write, cleared again 5-6 s after the last one; a write into an allocated
  cluster leaves it clear.
* SIGTERM/SIGINT with pipelined writes in flight: exit 0, every write the client saw completed is
  in the image, the dirty bit is clear, ``qemu-img check`` is clean; during the shutdown new
  connections are refused and a client still negotiating gets NBD_REP_ERR_SHUTDOWN.

The libnbd Python module is Debian's, so client scripts run under ``/usr/bin/python3``.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import REPO_ROOT, CommandFailed, qednbd, qemu_img, qemu_io, read_features, run
from serverkit import RunningServer, server_command, wait_listening

from qednbd import server as srv

pytestmark = pytest.mark.interop

NBD_PYTHON = "/usr/bin/python3"  # the interpreter that has libnbd's ``nbd`` module
NEED_CHECK = 0x02
DATA = REPO_ROOT / "tests" / "data"
ServerFactory = Callable[..., RunningServer]


# -- client helpers -------------------------------------------------------------------------

_READ = """
import nbd, sys
h = nbd.NBD()
h.connect_uri(sys.argv[1])
sys.stdout.write(h.pread(int(sys.argv[3]), int(sys.argv[2])).hex())
h.shutdown()
"""

_WRITE = """
import nbd, sys
h = nbd.NBD()
h.connect_uri(sys.argv[1])
h.pwrite(bytes.fromhex(sys.argv[3]), int(sys.argv[2]))
h.flush()
h.shutdown()
"""


def nbd_read(uri: str, offset: int, length: int) -> bytes:
    return bytes.fromhex(run([NBD_PYTHON, "-c", _READ, uri, str(offset), str(length)], timeout=30).stdout)


def nbd_write(uri: str, offset: int, data: bytes) -> None:
    run([NBD_PYTHON, "-c", _WRITE, uri, str(offset), data.hex()], timeout=30)


def nbdinfo_json(uri: str, *extra: str) -> dict[str, object]:
    out = run(["nbdinfo", "--json", *extra, uri], timeout=30).stdout
    result: dict[str, object] = json.loads(out)
    return result


def exports_of(uri: str) -> dict[str, dict[str, object]]:
    """``nbdinfo --list --json``: export name -> its details."""
    info = nbdinfo_json(uri, "--list")
    return {str(e["export-name"]): e for e in info["exports"]}  # type: ignore[attr-defined]


def only_export(uri: str) -> dict[str, object]:
    exports = nbdinfo_json(uri)["exports"]
    assert isinstance(exports, list) and len(exports) == 1
    export: dict[str, object] = exports[0]
    return export


def nbdinfo_fails(uri: str) -> str:
    proc = run(["nbdinfo", uri], check=False, timeout=30)
    assert proc.returncode != 0, f"nbdinfo {uri} unexpectedly worked:\n{proc.stdout}"
    return proc.stderr


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check_json(path: Path) -> dict[str, int]:
    """``qemu-img check --output=json``: fails the test on corruption or check errors."""
    proc = qemu_img("check", "--output=json", path, check=False)
    report: dict[str, int] = json.loads(proc.stdout)
    assert report.get("corruptions", 0) == 0 and report.get("check-errors", 0) == 0, proc.stdout
    assert proc.returncode in (0, 3), proc.stdout + proc.stderr  # 3: leaks only
    return report


def set_need_check(path: Path) -> None:
    with open(path, "r+b") as f:
        f.seek(16)
        features = struct.unpack("<Q", f.read(8))[0]
        f.seek(16)
        f.write(struct.pack("<Q", features | NEED_CHECK))


def is_hole(path: Path, offset: int, length: int) -> bool:
    with open(path, "rb") as f:
        try:
            data = os.lseek(f.fileno(), offset, os.SEEK_DATA)
        except OSError:  # ENXIO: no data after offset
            return True
    return data >= offset + length


def one_line_failure(proc: subprocess.CompletedProcess[str], *needles: str) -> str:
    """Exit 1, exactly one ``qednbd:`` line with every needle, no traceback, never listened."""
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert "Traceback" not in out and "internal error" not in out, out
    assert "listening" not in out, out
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("qednbd: "), out
    for needle in needles:
        assert needle in lines[0], out
    return lines[0]


def serve_to_failure(
    tmp_path: Path, *args: str | os.PathLike[str], **kw: object
) -> subprocess.CompletedProcess[str]:
    """Run a ``qednbd serve`` expected to fail before listening (a Unix socket that must not appear)."""
    sock = tmp_path / "fail.sock"
    proc = qednbd("serve", "-k", sock, *args, timeout=30, **kw)  # type: ignore[arg-type]
    assert not sock.exists(), "a failed start created its socket"
    return proc


@pytest.fixture
def img(tmp_path: Path) -> Path:
    """A copy of the corpus's clean image: 8 MiB, 4K clusters; 0x11 at 0, 0x22 at 4k, 0x33 at
    12k, 0x44 at 4M."""
    path = tmp_path / "disk.qed"
    shutil.copyfile(DATA / "clean.qed", path)
    return path


def assert_clean_image_data(uri: str) -> None:
    assert nbd_read(uri, 0, 4096) == b"\x11" * 4096
    assert nbd_read(uri, 4096, 4096) == b"\x22" * 4096
    assert nbd_read(uri, 4 << 20, 4096) == b"\x44" * 4096


# -- listeners and exports -------------------------------------------------------------------


def test_ephemeral_tcp_default_export_and_basename(nbd_server: ServerFactory, img: Path) -> None:
    s = nbd_server(img)
    assert s.base_uri.startswith("nbd://127.0.0.1:")
    assert 0 < s.port != 10809
    assert "'disk.qed'" in s.log() and "(default export)" in s.log()
    default = only_export(s.uri())
    named = only_export(s.uri("disk.qed"))
    assert default["export-size"] == named["export-size"] == 8 << 20
    assert named["export-name"] == "disk.qed"
    assert list(exports_of(s.uri())) == ["disk.qed"]
    assert_clean_image_data(s.uri())
    assert_clean_image_data(s.uri("disk.qed"))
    nbdinfo_fails(s.uri("other"))
    assert s.stop() == 0


def test_name_and_description(nbd_server: ServerFactory, img: Path) -> None:
    s = nbd_server("-x", "vm1", "-D", "the first disk", img)
    export = only_export(s.uri("vm1"))
    assert export["export-name"] == "vm1"
    assert export["description"] == "the first disk"
    assert export["is_read_only"] is False
    assert only_export(s.uri())["description"] == "the first disk"  # still the default export
    listed = exports_of(s.uri())
    assert list(listed) == ["vm1"] and listed["vm1"]["description"] == "the first disk"
    nbdinfo_fails(s.uri("disk.qed"))  # -x replaces the basename
    assert s.stop() == 0


def test_unix_socket(nbd_server: ServerFactory, img: Path) -> None:
    s = nbd_server(img, unix=True)
    assert s.base_uri.startswith("nbd+unix:///?socket=")
    sock = Path(s.socket_path)
    assert sock.is_socket()
    assert only_export(s.uri())["export-size"] == 8 << 20
    assert only_export(s.uri("disk.qed"))["export-name"] == "disk.qed"
    assert s.uri("disk.qed") == f"nbd+unix:///disk.qed?socket={sock}"
    assert_clean_image_data(s.uri("disk.qed"))
    assert s.stop() == 0
    assert not sock.exists(), "the Unix socket was left behind"


def _ipv6_loopback_reason() -> str | None:
    if not socket.has_ipv6:
        return "Python was built without IPv6"
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError as exc:
        return f"cannot bind [::1]:0 on this machine: {exc}"
    return None


def test_ipv6_loopback(nbd_server: ServerFactory, img: Path) -> None:
    reason = _ipv6_loopback_reason()
    if reason:
        pytest.skip(reason)
    s = nbd_server("-b", "::1", img)  # the later -b wins over the fixture's 127.0.0.1
    assert s.base_uri.startswith("nbd://[::1]:"), s.log()
    assert only_export(s.uri("disk.qed"))["export-size"] == 8 << 20
    assert_clean_image_data(s.uri())
    assert s.stop() == 0


def test_several_files(nbd_server: ServerFactory, tmp_path: Path, img: Path) -> None:
    other = tmp_path / "small.qed"
    qemu_img("create", "-q", "-f", "qed", other, "1M")
    s = nbd_server(img, other)
    listed = exports_of(s.uri("disk.qed"))
    assert sorted(listed) == ["disk.qed", "small.qed"]
    assert listed["disk.qed"]["export-size"] == 8 << 20
    assert listed["small.qed"]["export-size"] == 1 << 20
    assert only_export(s.uri("small.qed"))["export-size"] == 1 << 20
    nbdinfo_fails(s.uri())  # two exports: the empty name selects none
    assert s.stop() == 0


def test_config_file_exports(nbd_server: ServerFactory, tmp_path: Path, img: Path) -> None:
    conf_dir = tmp_path / "etc"
    conf_dir.mkdir()
    ro_img = tmp_path / "ro.qed"
    shutil.copyfile(img, ro_img)
    scratch = conf_dir / "scratch.qed"
    qemu_img("create", "-q", "-f", "qed", scratch, "2M")
    conf = conf_dir / "serve.toml"
    conf.write_text(
        f"""
default = "golden"

[exports.work]
file = "{img}"
description = "read-write disk"

[exports.golden]
file = "{ro_img}"
read-only = true
description = "the golden image"

[exports.scratch]
file = "scratch.qed"   # relative to the config file
"""
    )
    before = sha256(ro_img)
    s = nbd_server("--config", conf)
    listed = exports_of(s.uri())
    assert sorted(listed) == ["golden", "scratch", "work"]
    assert listed["work"]["is_read_only"] is False
    assert listed["work"]["description"] == "read-write disk"
    assert listed["golden"]["is_read_only"] is True
    assert listed["golden"]["description"] == "the golden image"
    assert listed["scratch"]["is_read_only"] is False
    assert listed["scratch"]["export-size"] == 2 << 20
    default = only_export(s.uri())  # default = "golden"
    assert default["is_read_only"] is True and default["description"] == "the golden image"
    # writes: the read-only export refuses them, the others take them
    proc = run([NBD_PYTHON, "-c", _WRITE, s.uri("golden"), "0", "aa" * 512], check=False, timeout=30)
    assert proc.returncode != 0 and "Operation not permitted" in proc.stderr, proc.stderr
    nbd_write(s.uri("scratch"), 0, b"\x5a" * 512)
    assert nbd_read(s.uri("scratch"), 0, 512) == b"\x5a" * 512
    assert s.stop() == 0
    assert sha256(ro_img) == before
    qemu_io(scratch, "read -P 0x5a 0 512")


def test_pid_file(nbd_server: ServerFactory, tmp_path: Path, img: Path) -> None:
    pid_file = tmp_path / "run" / "qednbd.pid"
    pid_file.parent.mkdir()
    s = nbd_server("--pid-file", pid_file, img)
    deadline = time.monotonic() + 5
    while not pid_file.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert pid_file.read_text() == f"{s.pid}\n"
    assert s.stop() == 0
    assert not pid_file.exists(), "the pid file was not removed on exit"


def test_pid_file_that_cannot_be_written(tmp_path: Path, img: Path) -> None:
    """An unwritable --pid-file: exit non-zero with a reason naming the pid file, and no Unix
    socket left behind (the server must not stay half-started or leave debris)."""
    sock = tmp_path / "p.sock"
    pid_file = tmp_path / "no-such-dir" / "qednbd.pid"
    proc = qednbd("serve", "-k", sock, "--pid-file", pid_file, img, timeout=30)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert "Traceback" not in out, out
    last = proc.stderr.splitlines()[-1]
    assert "qednbd.pid" in last, f"the failure does not name the pid file: {last!r}"
    assert not sock.exists(), "the Unix socket was left behind"


def test_port_in_use(tmp_path: Path, img: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        before = sha256(img)
        proc = qednbd("serve", "-b", "127.0.0.1", "-p", port, img, timeout=30)
    one_line_failure(proc, "address already in use")
    assert sha256(img) == before


def test_socket_path_taken_by_a_file(tmp_path: Path, img: Path) -> None:
    path = tmp_path / "not-a-socket"
    path.write_text("keep me\n")
    proc = qednbd("serve", "-k", path, img, timeout=30)
    one_line_failure(proc, os.fspath(path), "already in use")
    assert path.read_text() == "keep me\n"


def test_systemd_listen_fds_rules() -> None:
    """sd_listen_fds semantics: only for the pid named, fds from 3."""
    assert srv.systemd_listen_fds({"LISTEN_PID": "42", "LISTEN_FDS": "2"}, 42) == [3, 4]
    assert srv.systemd_listen_fds({"LISTEN_PID": "41", "LISTEN_FDS": "1"}, 42) == []
    assert srv.systemd_listen_fds({"LISTEN_FDS": "1"}, 42) == []
    assert srv.systemd_listen_fds({"LISTEN_PID": "42", "LISTEN_FDS": "x"}, 42) == []


@pytest.mark.parametrize("family", ["tcp", "unix"])
def test_systemd_socket_activation(tmp_path: Path, img: Path, family: str) -> None:
    """The test plays systemd: it listens, then starts the server with that socket as fd 3."""
    if family == "tcp":
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.bind(("127.0.0.1", 0))
        uri = f"nbd://127.0.0.1:{listener.getsockname()[1]}"
    else:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        path = tmp_path / "activated.sock"
        listener.bind(os.fspath(path))
        uri = f"nbd+unix:///?socket={path}"
    listener.listen(16)
    fd = listener.fileno()

    def as_fd_3() -> None:  # runs in the child between fork and exec
        if fd == 3:
            os.set_inheritable(3, True)
        else:
            os.dup2(fd, 3)  # inheritable; ``fd`` itself is close-on-exec

    env = dict(os.environ, LISTEN_FDS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.fspath(REPO_ROOT), env.get("PYTHONPATH")]))
    # LISTEN_PID must be the server's own pid: sh sets it to $$, then execs the server in place.
    cmd = ["sh", "-c", 'LISTEN_PID=$$ exec "$@"', "sh", *server_command(img)]
    log_path = tmp_path / "activated.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
            close_fds=False, preexec_fn=as_fd_3,
        )  # fmt: skip
    listener.close()  # the server holds its own copy
    s = RunningServer(proc, log_path)
    try:
        wait_listening(s)
        assert s.uris == [uri], s.log()  # the inherited socket, not a listener of its own
        assert only_export(uri)["export-size"] == 8 << 20
        assert_clean_image_data(uri)
        nbd_write(uri, 8192, b"\x77" * 4096)
        assert s.stop() == 0, s.log()
    finally:
        s.stop(signal.SIGKILL)
    assert "10809" not in s.log()
    qemu_io(img, "read -P 0x77 8k 4k")
    assert not read_features(img) & NEED_CHECK


# -- before listening: repair, refusal, read-only ------------------------------------------


def test_dirty_damaged_image_is_repaired_before_listening(nbd_server: ServerFactory, tmp_path: Path) -> None:
    path = tmp_path / "dirty-damaged.qed"
    shutil.copyfile(DATA / "dirty-damaged.qed", path)
    assert read_features(path) & NEED_CHECK
    s = nbd_server(path)
    log = s.log()
    repaired = log.index("was not closed cleanly; repaired:")
    assert repaired < log.index("listening on"), log  # repaired first, then listened
    assert not read_features(path) & NEED_CHECK  # the repair left it clean, while serving
    uri = s.uri()
    assert nbd_read(uri, 0, 4096) == b"\x11" * 4096
    assert nbd_read(uri, 4096, 4096) == b"\x22" * 4096
    assert nbd_read(uri, 8192, 8192) == bytes(8192)  # the entry past the end and the dropped one
    assert nbd_read(uri, 4 << 20, 4096) == b"\x44" * 4096
    nbd_write(uri, 8192, b"\x99" * 4096)  # an allocation after the repair
    assert s.stop() == 0
    report = check_json(path)
    # The interior leak (0x7000, guest 12k's dropped cluster) is punched, not moved: qemu-img
    # still counts the hole as a leaked cluster. Nothing else may be left.
    assert report.get("leaks", 0) <= 1, report
    if report.get("leaks", 0):
        assert is_hole(path, 0x7000, 0x1000)
    assert not read_features(path) & NEED_CHECK
    qemu_io(path, "read -P 0x11 0 4k", "read -P 0x99 8k 4k", "read -P 0 12k 4k", "read -P 0x44 4M 4k")


def test_repair_that_cannot_write_refuses_to_start(nbd_server: ServerFactory, tmp_path: Path) -> None:
    """dirty-duplicate.qed needs a new cluster to split the shared one; with RLIMIT_FSIZE at the
    file's length the repair cannot write it: the server must exit with the reason, never listen,
    and leave the image marked dirty. Without the limit the same image then starts fine."""
    path = tmp_path / "dirty-duplicate.qed"
    shutil.copyfile(DATA / "dirty-duplicate.qed", path)
    size = path.stat().st_size

    def limit_file_size() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))  # Python ignores SIGXFSZ: EFBIG

    proc = serve_to_failure(tmp_path, path, preexec_fn=limit_file_size)
    one_line_failure(proc, os.fspath(path), "File too large")
    assert read_features(path) & NEED_CHECK, "a failed repair cleared the dirty bit"

    s = nbd_server(path)  # no limit: the repair completes
    assert "was not closed cleanly; repaired:" in s.log()
    assert nbd_read(s.uri(), 0, 12288) == b"\x11" * 4096 + b"\x22" * 4096 + b"\x22" * 4096
    assert s.stop() == 0
    check_json(path)
    assert not read_features(path) & NEED_CHECK


def test_dirty_image_with_missing_backing_refuses_to_start(tmp_path: Path) -> None:
    base = tmp_path / "base.raw"
    overlay = tmp_path / "overlay.qed"
    qemu_img("create", "-q", "-f", "raw", base, "1M")
    qemu_img("create", "-q", "-f", "qed", "-b", base, "-F", "raw", overlay, "1M")
    qemu_io(overlay, "write -P 0x42 0 4k")
    set_need_check(overlay)
    base.unlink()
    before = sha256(overlay)
    proc = serve_to_failure(tmp_path, overlay)
    one_line_failure(proc, "Could not open backing file", "base.raw")
    assert sha256(overlay) == before


def test_read_only_dirty_image_is_served_unrepaired(nbd_server: ServerFactory, tmp_path: Path) -> None:
    path = tmp_path / "dirty-damaged.qed"
    shutil.copyfile(DATA / "dirty-damaged.qed", path)
    before = sha256(path)
    s = nbd_server("-r", path)
    assert "served read-only without repair" in s.log()
    assert "repaired" not in s.log()
    assert only_export(s.uri())["is_read_only"] is True
    assert nbd_read(s.uri(), 0, 8192) == b"\x11" * 4096 + b"\x22" * 4096
    assert nbd_read(s.uri(), 4 << 20, 4096) == b"\x44" * 4096
    assert read_features(path) & NEED_CHECK
    assert s.stop() == 0
    assert sha256(path) == before, "a read-only export changed the file"
    assert read_features(path) & NEED_CHECK


def _poke(path: Path, offset: int, fmt: str, value: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, value))


MALFORMED: dict[str, tuple[Callable[[Path], None], str]] = {
    "not a QED file": (lambda p: p.write_bytes(b"\0" * 65536), "not in QED format"),
    "header cut short": (lambda p: p.write_bytes(p.read_bytes()[:40]), ""),
    "cluster size 3000": (lambda p: _poke(p, 4, "<I", 3000), "cluster size is invalid"),
    "table size 3": (lambda p: _poke(p, 8, "<I", 3), "table size is invalid"),
    "unknown feature": (lambda p: _poke(p, 16, "<Q", 0x100 | NEED_CHECK), "Unsupported QED features"),
    "L1 past the end": (lambda p: _poke(p, 40, "<Q", 1 << 30), "table offset is invalid"),
    "empty file": (lambda p: p.write_bytes(b""), ""),
}


@pytest.mark.parametrize("read_only", [False, True], ids=["rw", "ro"])
@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_image_refuses_to_start(tmp_path: Path, img: Path, case: str, read_only: bool) -> None:
    damage, reason = MALFORMED[case]
    damage(img)
    before = sha256(img)
    proc = serve_to_failure(tmp_path, *(["-r"] if read_only else []), img)
    one_line_failure(proc, os.fspath(img), reason)
    assert sha256(img) == before


# -- the dirty bit while serving -------------------------------------------------------------


def _wait_for(predicate: Callable[[], bool], timeout: float, step: float = 0.05) -> float | None:
    """Poll until ``predicate()``; the time it became true (monotonic), or None after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return time.monotonic()
        if time.monotonic() > deadline:
            return None
        time.sleep(step)


@pytest.mark.slow
def test_dirty_bit_set_by_allocation_and_cleared_when_idle(nbd_server: ServerFactory, tmp_path: Path) -> None:
    path = tmp_path / "fresh.qed"
    qemu_img("create", "-q", "-f", "qed", path, "64M")  # 64K clusters

    def dirty() -> bool:
        return bool(read_features(path) & NEED_CHECK)

    s = nbd_server(path)
    uri = s.uri()
    assert not dirty(), "NEED_CHECK set right after start"
    nbd_write(uri, 0, b"\x01" * 512)  # first allocating write: the bit is durable before the reply
    t0 = time.monotonic()
    assert dirty(), "NEED_CHECK not set by the first allocating write"
    nbd_write(uri, 1 << 20, b"\x02" * 512)  # a second allocation restarts the idle timer
    t_last = time.monotonic()
    time.sleep(max(0.0, t_last + 3.0 - time.monotonic()))
    assert dirty(), "NEED_CHECK cleared less than 3 s after an allocating write"
    cleared = _wait_for(lambda: not dirty(), timeout=t_last + 9.0 - time.monotonic())
    assert cleared is not None, f"NEED_CHECK still set {time.monotonic() - t_last:.1f} s after the last write"
    assert 4.0 <= cleared - t_last <= 8.0, f"cleared {cleared - t_last:.1f} s after the last allocating write"
    assert cleared - t0 > 5.0  # not timed from the first write

    # A write into an allocated cluster is not an allocation: the bit stays clear.
    nbd_write(uri, 4096, b"\x03" * 4096)
    assert not dirty()
    time.sleep(1.5)
    assert not dirty(), "a non-allocating write set NEED_CHECK"

    # A new dirty period starts with the next allocation; SIGTERM's close clears it.
    nbd_write(uri, 2 << 20, b"\x04" * 512)
    assert dirty()
    assert s.stop() == 0
    assert not dirty(), "NEED_CHECK left set after a clean shutdown"
    assert qemu_img("check", path).returncode == 0
    qemu_io(path, "read -P 1 0 512", "read -P 3 4k 4k", "read -P 2 1M 512", "read -P 4 2M 512")


# -- SIGTERM / SIGINT -----------------------------------------------------------------------

# Pipelined 4 KiB writes, 16 in flight, one per 64 KiB cluster (every one allocates), each block
# filled with its index + 1; every 8th with FUA (its reply waits for a flush). It runs until
# the connection dies and writes what completed successfully to a JSON file.
_WRITER = r"""
import json, sys, nbd
uri, out = sys.argv[1], sys.argv[2]
BLOCK, STRIDE = 4096, 65536
h = nbd.NBD()
h.connect_uri(uri)
limit = h.get_size() // STRIDE
done, inflight, issued, error = [], {}, 0, ""
announced = False
try:
    while issued < limit or inflight:
        while issued < limit and len(inflight) < 16:
            i = issued
            buf = (i + 1).to_bytes(4, "little") * (BLOCK // 4)
            flags = nbd.CMD_FLAG_FUA if i % 8 == 7 else 0
            inflight[h.aio_pwrite(buf, i * STRIDE + (i % 16) * BLOCK, flags=flags)] = (i, buf)
            issued += 1
        h.poll(-1)
        for cookie in list(inflight):
            if h.aio_command_completed(cookie):
                done.append(inflight.pop(cookie)[0])
        if not announced and len(done) >= 64:
            print("running", flush=True)
            announced = True
except nbd.Error as exc:
    error = str(exc)
with open(out, "w") as f:
    json.dump({"done": done, "issued": issued, "limit": limit, "error": error}, f)
"""


def _block(i: int) -> tuple[int, bytes]:
    return i * 65536 + (i % 16) * 4096, (i + 1).to_bytes(4, "little") * 1024


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_with_writes_in_flight(nbd_server: ServerFactory, tmp_path: Path, sig: int) -> None:
    path = tmp_path / "busy.qed"
    qemu_img("create", "-q", "-f", "qed", path, "1G")
    s = nbd_server(path)
    result_file = tmp_path / "writer.json"
    writer = subprocess.Popen(
        [NBD_PYTHON, "-c", _WRITER, s.uri(), os.fspath(result_file)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert writer.stdout is not None
        line = writer.stdout.readline()  # bounded: the writer stops at the image's end
        assert line == "running\n", writer.stderr.read() if writer.stderr else ""
        code = s.stop(sig, timeout=30)
        writer.wait(timeout=30)
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
    log = s.log()
    assert code == 0, log
    assert f"{signal.Signals(sig).name}: shutting down" in log
    assert "Traceback" not in log, log
    result = json.loads(result_file.read_text())
    assert result["issued"] < result["limit"], "the writer ran out of image before the signal"
    done = set(result["done"])
    assert len(done) >= 64
    assert result["error"], "the writer was not cut off by the shutdown"
    print(f"{len(done)} writes completed of {result['issued']} issued; the client saw: {result['error']}")
    assert not read_features(path) & NEED_CHECK, "dirty bit left set after a signal"
    assert qemu_img("check", path).returncode == 0
    raw = tmp_path / "busy.raw"
    qemu_img("convert", "-f", "qed", "-O", "raw", path, raw)
    bad = []
    with open(raw, "rb") as f:
        for i in range(result["issued"]):
            offset, expected = _block(i)
            f.seek(offset)
            got = f.read(4096)
            if got != expected and (i in done or got != bytes(4096)):
                bad.append(i)  # a completed write is missing, or a block holds garbage
    assert not bad, f"{len(bad)} blocks wrong, e.g. {bad[:10]} (completed: {len(done)})"


# Like _WRITER, but it records how every request ended, stops issuing at the first error (a client
# told NBD_ESHUTDOWN must soft-disconnect) and then disconnects with NBD_CMD_DISC.
_ANSWER_WRITER = r"""
import errno, json, sys, nbd
uri, out = sys.argv[1], sys.argv[2]
h = nbd.NBD()
h.connect_uri(uri)
limit = h.get_size() // 65536
status, issued, error, announced = {}, 0, "", False

def completion(i):
    def done(err):
        status[i] = err.value
        return 1
    return done

try:
    while issued < limit and not any(status.values()):
        while issued < limit and h.aio_in_flight() < 16:
            h.aio_pwrite(b"\x5a" * 4096, issued * 65536, completion=completion(issued))
            issued += 1
        h.poll(-1)
        if not announced and len(status) >= 64:
            print("running", flush=True)
            announced = True
    while h.aio_in_flight():
        h.poll(-1)
    h.shutdown()
except nbd.Error as exc:
    error = str(exc)
names = {i: errno.errorcode.get(v, str(v)) if v else "ok" for i, v in status.items()}
with open(out, "w") as f:
    json.dump({"issued": issued, "status": names, "error": error}, f)
"""


def test_shutdown_answers_every_request_sent(nbd_server: ServerFactory, tmp_path: Path) -> None:
    """SIGTERM while a client has requests in flight: each request the client sent is finished or
    answered NBD_ESHUTDOWN (nbd.md §1.11 item 9, the issue's "finish requests in flight"); none
    may be lost with the connection (ENOTCONN/ECONNRESET on the client's side)."""
    path = tmp_path / "busy.qed"
    qemu_img("create", "-q", "-f", "qed", path, "1G")
    s = nbd_server(path)
    result_file = tmp_path / "answers.json"
    writer = subprocess.Popen(
        [NBD_PYTHON, "-c", _ANSWER_WRITER, s.uri(), os.fspath(result_file)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert writer.stdout is not None
        line = writer.stdout.readline()
        assert line == "running\n", writer.stderr.read() if writer.stderr else ""
        code = s.stop(signal.SIGTERM, timeout=30)
        writer.wait(timeout=30)
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
    assert code == 0, s.log()
    result = json.loads(result_file.read_text())
    outcomes: dict[str, list[int]] = {}
    for i in range(result["issued"]):
        outcomes.setdefault(result["status"].get(str(i), "never completed"), []).append(i)
    lost = {name: ids for name, ids in outcomes.items() if name not in ("ok", "ESHUTDOWN")}
    summary = {name: len(ids) for name, ids in outcomes.items()}
    assert not lost, f"requests lost at shutdown: {summary}; the client saw: {result['error']!r}"


def test_shutdown_refuses_new_connections(nbd_server: ServerFactory, img: Path) -> None:
    """A client still negotiating holds the shutdown open (up to its grace time): meanwhile the
    listener is closed and that client's next option gets NBD_REP_ERR_SHUTDOWN."""
    s = nbd_server(img)
    held = socket.create_connection(("127.0.0.1", s.port), timeout=10)
    try:
        greeting = b""
        while len(greeting) < 18:
            chunk = held.recv(18 - len(greeting))
            assert chunk, "server closed during the greeting"
            greeting += chunk
        assert greeting[:8] == b"NBDMAGIC"
        held.sendall(struct.pack(">I", 3))  # FIXED_NEWSTYLE | NO_ZEROES
        time.sleep(0.2)  # let the server read the flags: the client is now choosing options
        s.proc.send_signal(signal.SIGTERM)

        def refused() -> bool:
            try:
                socket.create_connection(("127.0.0.1", s.port), timeout=2).close()
            except ConnectionRefusedError:
                return True
            return False

        assert _wait_for(refused, timeout=5), "new connections still accepted after SIGTERM"
        assert s.alive(), "the server did not wait for the negotiating client"
        held.sendall(struct.pack(">QII", 0x49484156454F5054, 3, 0))  # NBD_OPT_LIST
        reply = b""
        while len(reply) < 20:
            chunk = held.recv(20 - len(reply))
            assert chunk, "no reply to an option during the shutdown"
            reply += chunk
        magic, option, reply_type, _length = struct.unpack(">QIII", reply)
        assert (magic, option) == (0x3E889045565A9, 3)
        assert reply_type == (1 << 31) | 7, hex(reply_type)  # NBD_REP_ERR_SHUTDOWN
    finally:
        held.close()
    assert s.stop(timeout=15) == 0
    with pytest.raises(CommandFailed):
        run(["nbdinfo", s.uri()], timeout=30)
