"""``qednbd serve`` driven by ``nbdsh`` (libnbd 1.14's Python shell): every command and flag a
client can send, the errors the spec prescribes (with libnbd's strict mode off so the bad
requests actually leave the client), option negotiation, and simple replies.

libnbd's Python module is Debian's: ``nbdsh`` runs ``python3 -m nbd``, so /usr/bin goes first on
PATH. libnbd checks every reply (chunk bounds, extents, ids), which makes it a strict oracle.
"""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest
from helpers import qemu_img, qemu_io, run

pytestmark = pytest.mark.interop

M = 1 << 20
NBDSH_ENV = {**os.environ, "PATH": "/usr/bin:" + os.environ.get("PATH", "")}

# Shared by every script: fails(ERRNO_NAME, call, *args) runs one request that must fail so.
PRELUDE = """
def fails(name, call, *args, **kwargs):
    try:
        call(*args, **kwargs)
    except nbd.Error as exc:
        assert exc.errno == name, f"{call.__name__}{args}: wanted {name}, got {exc.errno}: {exc.string}"
    else:
        raise AssertionError(f"{call.__name__}{args}: wanted {name}, it succeeded")

def extents(offset, length, flags=0, context="base:allocation"):
    got = []
    def cb(meta, off, entries, err):
        if meta == context:
            got.append((off, list(entries)))
        return 0
    h.block_status(length, offset, cb, flags)
    assert len(got) == 1 and got[0][0] == offset, got
    return got[0][1]
"""


def nbdsh(script: str, *options: str, timeout: float = 60) -> str:
    """``nbdsh OPTIONS -c PRELUDE+SCRIPT``; a failed assert inside makes it exit non-zero."""
    code = PRELUDE + textwrap.dedent(script)
    return run(["nbdsh", *options, "-c", code], env=NBDSH_ENV, timeout=timeout).stdout


def qemu_io_ok(path: Path, *commands: str) -> None:
    out = qemu_io(path, *commands)
    text = out.stdout + out.stderr
    assert "fail" not in text.lower() and "error" not in text.lower(), text


def check_clean(path: Path) -> None:
    out = qemu_img("check", "-f", "qed", path)
    assert "No errors were found" in out.stdout, out.stdout


def make_qed(path: Path, size: str, *ops: str) -> Path:
    qemu_img("create", "-f", "qed", path, size)
    if ops:
        qemu_io_ok(path, *ops)
    return path


def test_commands_and_flags(tmp_path: Path, nbd_server) -> None:  # type: ignore[no-untyped-def]
    image = make_qed(tmp_path / "disk.qed", "16M")
    server = nbd_server(image)
    nbdsh(
        f"""
        M = {M}
        C = 65536
        assert h.get_size() == 16 * M
        assert h.pread(C, 0) == bytes(C)                       # unallocated: zeroes

        data = bytes(range(256)) * 20
        h.pwrite(data, 1000)                                   # unaligned, within one cluster
        assert h.pread(len(data), 1000) == data
        assert h.pread(1000, 0) == bytes(1000)
        h.flush()

        h.pwrite(b"\\x5a" * 4096, 2 * M + 512, nbd.CMD_FLAG_FUA)
        assert h.pread(4608, 2 * M) == bytes(512) + b"\\x5a" * 4096
        h.pwrite(b"\\x66" * 8, C - 4)                          # across a cluster boundary
        assert h.pread(16, C - 8) == bytes(4) + b"\\x66" * 8 + bytes(4)

        h.pwrite(b"\\x77" * (3 * C), M)
        h.trim(C, M)                                           # a whole allocated cluster
        assert h.pread(C, M) == bytes(C)
        assert h.pread(C, M + C) == b"\\x77" * C
        h.zero(4096, M + C + 8192)                             # inside a data cluster
        h.zero(4096, M + C + 16384, nbd.CMD_FLAG_NO_HOLE)
        expect = bytearray(b"\\x77" * C)
        expect[8192:12288] = bytes(4096)
        expect[16384:20480] = bytes(4096)
        assert h.pread(C, M + C) == expect

        h.zero(3 * C, 4 * M, nbd.CMD_FLAG_FAST_ZERO)           # nothing allocated there: fast
        assert h.pread(3 * C, 4 * M) == bytes(3 * C)
        fails("ENOTSUP", h.zero, C, M + 2 * C, nbd.CMD_FLAG_FAST_ZERO)  # data: not fast ...
        assert h.pread(C, M + 2 * C) == b"\\x77" * C           # ... and nothing changed
        h.zero(C, M + 2 * C)                                   # without FAST_ZERO it is done
        assert h.pread(C, M + 2 * C) == bytes(C)

        h.cache(2 * M, 0)
        h.cache(100, 12345)

        h.pwrite(b"\\xee" * 512, 16 * M - 512, nbd.CMD_FLAG_FUA)  # the last sector
        assert h.pread(1024, 16 * M - 1024) == bytes(512) + b"\\xee" * 512

        h.flush()
        """,
        "-u",
        server.uri(),
    )
    assert server.stop() == 0
    qemu_io_ok(
        image,
        "read -P 0 0 1000",
        "read -P 0x5a 2097664 4096",
        "read -P 0x66 65532 8",
        "read -P 0 1048576 65536",
        "read -P 0x77 1114112 8192",
        "read -P 0 1122304 4096",
        "read -P 0x77 1126400 4096",
        "read -P 0 1130496 4096",
        "read -P 0x77 1134592 45056",
        "read -P 0 1179648 65536",
        "read -P 0 4M 192k",
        "read -P 0xee 16776704 512",
    )
    check_clean(image)


def test_block_status(tmp_path: Path, nbd_server) -> None:  # type: ignore[no-untyped-def]
    image = make_qed(
        tmp_path / "disk.qed", "16M", "write -P 0x11 0 128k", "write -z 1M 64k", "write -P 0x12 16773120 4096"
    )
    server = nbd_server(image)
    nbdsh(
        f"""
        M = {M}
        C = 65536
        assert h.can_meta_context("base:allocation")
        e = extents(0, 16 * M)
        assert sum(e[0::2]) >= 16 * M and e[1] == 0, e
        assert e[0] == 2 * C, e                               # data, then ...
        assert all(flags == 3 for flags in e[3:-2:2]), e      # ... hole,zero (zero cluster too) ...
        assert e[-1] == 0 and e[-2] == C, e                   # ... data in the last cluster

        one = extents(0, 16 * M, nbd.CMD_FLAG_REQ_ONE)
        assert len(one) == 2 and one[1] == 0 and 0 < one[0] <= 2 * C, one
        one = extents(1000, 10, nbd.CMD_FLAG_REQ_ONE)          # unaligned, inside a data cluster
        assert len(one) == 2 and one[1] == 0 and one[0] >= 10, one
        one = extents(M, 4096, nbd.CMD_FLAG_REQ_ONE)           # a zero cluster
        assert len(one) == 2 and one[1] == 3, one
        one = extents(5 * M, M, nbd.CMD_FLAG_REQ_ONE)          # unallocated
        assert one == [M, 3], one
        one = extents(16 * M - 512, 512, nbd.CMD_FLAG_REQ_ONE)
        assert one == [512, 0], one
        """,
        "--base-allocation",
        "-u",
        server.uri(),
    )


def test_strict_mode_violations(tmp_path: Path, nbd_server) -> None:  # type: ignore[no-untyped-def]
    image = make_qed(tmp_path / "disk.qed", "16M", "write -P 0x42 0 64k")
    rw = nbd_server(image)
    nbdsh(
        f"""
        h.set_strict_mode(0)                                   # let bad requests leave the client
        size = {16 * M}
        def alive():
            assert h.pread(4, 0) == b"\\x42" * 4
        fails("EINVAL", h.pread, 512, size); alive()           # read past the end
        fails("EINVAL", h.pread, 1024, size - 512); alive()    # read straddling the end
        fails("ENOSPC", h.pwrite, b"x" * 512, size); alive()   # write past the end
        fails("ENOSPC", h.pwrite, b"x" * 1024, size - 512); alive()
        fails("ENOSPC", h.zero, 512, size); alive()
        fails("EINVAL", h.trim, 512, size); alive()
        fails("EINVAL", h.cache, 512, size); alive()
        fails("EINVAL", h.pread, 512, 0, nbd.CMD_FLAG_NO_HOLE); alive()   # flags not for READ
        fails("EINVAL", h.pwrite, b"y" * 512, 0, nbd.CMD_FLAG_REQ_ONE); alive()
        fails("EINVAL", h.pread, 512, 0, 0x80); alive()         # an unknown flag bit
        fails("EINVAL", h.pread, 0, 0); alive()                # zero length
        assert h.pread(512, size - 512) == bytes(512)          # the edge itself is fine
        assert h.pread(65536, 0) == b"\\x42" * 65536            # nothing was written
        """,
        "-u",
        rw.uri(),
    )
    assert rw.stop() == 0

    ro = nbd_server(image, "-r")
    nbdsh(
        """
        assert h.is_read_only()
        h.set_strict_mode(0)
        fails("EPERM", h.pwrite, b"x" * 512, 0)
        fails("EPERM", h.pwrite, b"x" * 512, 0, nbd.CMD_FLAG_FUA)
        fails("EPERM", h.zero, 4096, 0)
        fails("EPERM", h.trim, 65536, 0)
        assert h.pread(512, 0) == b"\\x42" * 512               # still serving
        h.flush()
        """,
        "-u",
        ro.uri(),
    )
    assert ro.stop() == 0
    qemu_io_ok(image, "read -P 0x42 0 64k")
    check_clean(image)


def test_opt_mode(tmp_path: Path, nbd_server) -> None:  # type: ignore[no-untyped-def]
    make_qed(tmp_path / "a.qed", "64M", "write -P 0xaa 0 4k")
    make_qed(tmp_path / "b.qed", "3M", "write -P 0xbb 0 4k")
    config = tmp_path / "exports.toml"
    config.write_text(
        '[exports.alpha]\nfile = "a.qed"\ndescription = "first"\n'
        '[exports.beta]\nfile = "b.qed"\nread-only = true\n'
    )
    server = nbd_server("--config", config)
    nbdsh(
        f"""
        h.set_opt_mode(True)
        h.connect_uri({server.base_uri!r})
        assert h.aio_is_negotiating()
        listed = []
        h.opt_list(lambda name, desc: listed.append((name, desc)))
        assert sorted(listed) == [("alpha", "first"), ("beta", "")], listed

        contexts = []
        h.set_export_name("alpha")                              # LIST_META_CONTEXT names an export
        h.opt_list_meta_context(lambda name: contexts.append(name))
        assert {{"base:allocation", "qemu:allocation-depth"}} <= set(contexts), contexts

        h.set_export_name("nonexistent")
        try:
            h.opt_info()
        except nbd.Error:
            pass
        else:
            raise AssertionError("INFO on an unknown export succeeded")
        assert h.aio_is_negotiating()                           # negotiation goes on

        h.set_full_info(True)
        for name, size in (("alpha", {64 * M}), ("beta", {3 * M})):
            h.set_export_name(name)
            h.opt_info()
            assert h.get_size() == size, (name, h.get_size())
            assert h.get_canonical_export_name() == name

        h.set_export_name("alpha")
        h.opt_info()
        info_size, info_desc = h.get_size(), h.get_export_description()
        h.opt_go()
        assert not h.aio_is_negotiating()
        assert h.get_size() == info_size == {64 * M} and info_desc == "first"
        assert h.pread(4096, 0) == b"\\xaa" * 4096
        assert not h.is_read_only()
        h.shutdown()
        """,
    )


def test_simple_replies(tmp_path: Path, nbd_server) -> None:  # type: ignore[no-untyped-def]
    image = make_qed(
        tmp_path / "d.qed", "8M", "write -P 0x31 0 100k", "write -z 1M 64k", "write -P 0x32 7M 512"
    )
    server = nbd_server(image, unix=True)
    nbdsh(
        f"""
        M = {M}
        h.set_request_structured_replies(False)
        h.connect_uri({server.uri()!r})
        assert not h.get_structured_replies_negotiated()
        assert not h.can_df()                                   # DF needs structured replies
        whole = h.pread(8 * M, 0)
        expect = bytearray(8 * M)
        expect[0:102400] = b"\\x31" * 102400
        expect[7 * M:7 * M + 512] = b"\\x32" * 512
        assert whole == expect
        assert h.pread(1000, 102000) == b"\\x31" * 400 + bytes(600)
        h.pwrite(b"\\x33" * 3000, M + 100)                       # into the zero cluster
        assert h.pread(3200, M) == bytes(100) + b"\\x33" * 3000 + bytes(100)
        h.set_strict_mode(0)
        fails("EINVAL", h.pread, 512, 8 * M)                     # errors in simple replies too
        assert h.pread(512, 7 * M) == b"\\x32" * 512
        h.flush()
        """,
    )
    assert server.stop() == 0
    qemu_io_ok(
        image, "read -P 0x31 0 100k", "read -P 0 1M 100", "read -P 0x33 1048676 3000", "read -P 0x32 7M 512"
    )
    check_clean(image)


def test_df_reads(tmp_path: Path, nbd_server) -> None:  # type: ignore[no-untyped-def]
    image = make_qed(tmp_path / "d.qed", "8M", "write -P 0x31 0 100k", "write -z 1M 64k")
    server = nbd_server(image)
    nbdsh(
        f"""
        M = {M}
        assert h.can_df()
        chunks = []
        def chunk(buf, offset, status, err):
            chunks.append((offset, status, len(buf)))
            return 0
        data = h.pread_structured(2 * M, 0, chunk, nbd.CMD_FLAG_DF)
        assert len(chunks) == 1 and chunks[0][0] == 0, chunks  # DF: one chunk
        assert data[:102400] == b"\\x31" * 102400 and data[102400:] == bytes(2 * M - 102400)
        chunks.clear()
        data = h.pread_structured(2 * M, 0, chunk)             # without DF holes may be chunks
        assert data[:102400] == b"\\x31" * 102400 and data[102400:] == bytes(2 * M - 102400)
        assert any(status == nbd.READ_HOLE for _, status, _ in chunks), chunks
        """,
        "-u",
        server.uri(),
    )
