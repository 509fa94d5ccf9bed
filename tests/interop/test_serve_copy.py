"""``nbdcopy`` through ``qednbd serve`` both ways: upload a random raw file into fresh QED exports
(one connection and four), download it again (to a file and to a pipe), copy export to export,
and compare every byte; afterwards the image files themselves match the source (``qemu-img
compare``) and ``qemu-img check`` is clean."""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
from pathlib import Path

import pytest
from helpers import qemu_img, run

pytestmark = pytest.mark.interop

M = 1 << 20
SIZE = 24 * M


def random_raw(path: Path, seed: int) -> str:
    """A SIZE-byte raw file: random data with a zero run, a sparse hole and data in the last
    sector (so nbdcopy sends WRITE, WRITE_ZEROES and reads holes back). Returns its sha256."""
    rng = random.Random(seed)
    with open(path, "wb") as f:
        f.write(rng.randbytes(5 * M + 123))
        f.write(bytes(2 * M))  # zeroes written out (not a hole)
        f.write(rng.randbytes(3 * M))
        f.seek(16 * M)  # a hole up to 16M
        f.write(rng.randbytes(4 * M - 7))
        f.seek(SIZE - 512)
        f.write(rng.randbytes(512))
    assert path.stat().st_size == SIZE
    return sha256_file(path)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def sha256_stream(uri: str, *options: str) -> str:
    """``nbdcopy URI -`` (to stdout), hashed."""
    proc = subprocess.run(["nbdcopy", *options, uri, "-"], capture_output=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    assert len(proc.stdout) == SIZE
    return hashlib.sha256(proc.stdout).hexdigest()


def check_clean(path: Path) -> None:
    out = qemu_img("check", "-f", "qed", path)
    assert "No errors were found" in out.stdout, out.stdout


def test_nbdcopy_both_ways(tmp_path: Path, nbd_server) -> None:  # type: ignore[no-untyped-def]
    src1, src4 = tmp_path / "src1.raw", tmp_path / "src4.raw"
    digest1, digest4 = random_raw(src1, 1), random_raw(src4, 4)
    images = {name: tmp_path / f"{name}.qed" for name in ("up1", "up4", "copy")}
    for image in images.values():
        qemu_img("create", "-f", "qed", image, str(SIZE))
    server = nbd_server(*images.values())
    uri = {name: server.uri(f"{name}.qed") for name in images}

    run(["nbdcopy", os.fspath(src1), uri["up1"], "--flush"])  # upload, one connection
    run(["nbdcopy", "--connections=4", "--requests=16", os.fspath(src4), uri["up4"], "--flush"])

    out1 = tmp_path / "out1.raw"
    run(["nbdcopy", uri["up1"], os.fspath(out1)])  # download to a file (sparse-aware)
    assert sha256_file(out1) == digest1
    assert sha256_stream(uri["up1"]) == digest1  # download to a pipe
    assert sha256_stream(uri["up4"], "--connections=4") == digest4
    assert sha256_stream(uri["up4"], "--connections=1", "--request-size=65536") == digest4

    run(["nbdcopy", "--connections=4", uri["up4"], uri["copy"], "--flush"])  # export to export
    assert sha256_stream(uri["copy"]) == digest4

    assert server.stop() == 0
    for name, source in (("up1", src1), ("up4", src4), ("copy", src4)):
        compared = qemu_img("compare", "-f", "raw", "-F", "qed", source, images[name], check=False)
        assert compared.returncode == 0 and "Images are identical." in compared.stdout, compared.stdout
        check_clean(images[name])


def test_nbdcopy_unix_socket_overwrite(tmp_path: Path, nbd_server) -> None:  # type: ignore[no-untyped-def]
    """Upload over a Unix socket into an image that already holds data (rewrites allocated
    clusters and zeroes them where the source has zeroes), then read it back."""
    src = tmp_path / "src.raw"
    digest = random_raw(src, 7)
    image = tmp_path / "disk.qed"
    qemu_img("create", "-f", "qed", image, str(SIZE))
    run(["qemu-io", "-f", "qed", "-c", f"write -P 0xee 0 {SIZE}", os.fspath(image)])
    server = nbd_server(image, unix=True)
    run(["nbdcopy", "--connections=2", os.fspath(src), server.uri(), "--flush"])
    assert sha256_stream(server.uri()) == digest
    assert server.stop() == 0
    compared = qemu_img("compare", "-f", "raw", "-F", "qed", src, image, check=False)
    assert compared.returncode == 0, compared.stdout
    check_clean(image)
