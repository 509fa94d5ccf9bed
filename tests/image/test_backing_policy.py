"""Which backing files we follow, and how we fail when we will not (qed.md §5, backing.py).

* Names that are not plain paths (URLs, ``json:``, ``protocol:`` prefixes, NUL bytes) are
  refused with one line, both by ``qednbd create -b`` and when an existing image names them;
  the refusal writes nothing.
* A relative name resolves against the image's directory, whatever the working directory.
* A missing backing file, a loop, or a chain deeper than ``MAX_CHAIN_DEPTH`` is one clear
  line, never a RecursionError or a leaked file descriptor.
* Probing: a backing file with another format's magic and no NO_PROBE bit is refused rather
  than read as raw; a file declared raw (NO_PROBE) is read as raw even if it starts with the
  QED magic.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import struct
import subprocess
from pathlib import Path

import pytest
from helpers import qednbd, qemu_img, read_features

from qednbd.errors import ImageError, InvalidImage
from qednbd.qed.backing import MAX_CHAIN_DEPTH
from qednbd.qed.image import QedImage, create_image

MiB = 1 << 20
F_BACKING_FILE = 0x1
F_NO_PROBE = 0x4

REFUSED_NAMES = {
    "nbd-url": "nbd://host/x",
    "nbd-unix-url": "nbd+unix:///x?socket=/tmp/s",
    "http-url": "http://x",
    "https-url": "https://example.com/disk.img",
    "json": 'json:{"file": {"driver": "file", "filename": "x"}}',
    "file-prefix": "file:x",
    "file-prefix-absolute": "file:/etc/passwd",
    "nbd-legacy": "nbd:localhost:10809",
    "host-device": "host_device:/dev/sda",
}
NUL_NAMES = {"nul-inside": "a\0b", "nul-trailing": "base.raw\0"}


def qednbd_in(cwd: Path, *args: str | Path | int, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``python -m qednbd ARGS`` run from ``cwd``."""
    return qednbd(*args, timeout=timeout, cwd=cwd)


def assert_one_line_failure(proc: subprocess.CompletedProcess[str], subject: object) -> str:
    output = proc.stdout + proc.stderr
    assert "Traceback" not in output, output
    assert "RecursionError" not in output, output
    assert "internal error" not in output, output
    assert proc.returncode == 1, (proc.args, proc.returncode, output)
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"qednbd: {subject}: "), lines[0]
    return lines[0]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def set_backing(path: Path, name: bytes, features: int) -> None:
    """Write ``name`` at offset 64 and point the header at it, as qemu-img rebase -u does."""
    with open(path, "r+b") as f:
        f.seek(16)
        f.write(struct.pack("<Q", features))
        f.seek(56)
        f.write(struct.pack("<II", 64, len(name)))
        f.seek(64)
        f.write(name)


def raw_file(path: Path, size: int, byte: int) -> Path:
    path.write_bytes(bytes([byte]) * size)
    return path


# -- names we refuse ---------------------------------------------------------------------


@pytest.mark.parametrize("backing_format", ["raw", "qed"])
@pytest.mark.parametrize("name", list(REFUSED_NAMES.values()), ids=list(REFUSED_NAMES))
def test_create_refuses_non_path_backing_names(name, backing_format, tmp_path):
    target = tmp_path / "t.qed"
    proc = qednbd_in(tmp_path, "create", "-b", name, "-F", backing_format, target, "1M")
    assert_one_line_failure(proc, target)
    assert not target.exists()
    # an existing file at the target is not clobbered by a refused create
    target.write_bytes(b"precious" * 1000)
    proc = qednbd_in(tmp_path, "create", "-b", name, "-F", backing_format, target, "1M")
    assert_one_line_failure(proc, target)
    assert target.read_bytes() == b"precious" * 1000


@pytest.mark.parametrize(
    "name", [*REFUSED_NAMES.values(), *NUL_NAMES.values()], ids=[*REFUSED_NAMES, *NUL_NAMES]
)
def test_create_image_api_refuses_non_path_backing_names(name, tmp_path):
    target = tmp_path / "t.qed"
    with pytest.raises(ImageError) as info:
        create_image(str(target), MiB, backing_file=name, backing_format="raw")
    assert "\n" not in str(info.value)
    assert not target.exists()


@pytest.mark.parametrize("features", [F_BACKING_FILE, F_BACKING_FILE | F_NO_PROBE], ids=["probe", "raw"])
@pytest.mark.parametrize(
    "name", [*REFUSED_NAMES.values(), *NUL_NAMES.values()], ids=[*REFUSED_NAMES, *NUL_NAMES]
)
def test_existing_image_naming_a_non_path_backing_is_refused(name, features, tmp_path):
    # a decoy that the name would hit if it were taken as a relative path
    raw_file(tmp_path / "x", MiB, 0xDD)
    path = tmp_path / "t.qed"
    create_image(str(path), MiB)
    set_backing(path, name.encode(), features)
    before = digest(path)
    fds = open_fds()
    for read_only in (True, False):
        with pytest.raises(ImageError) as info:
            QedImage.open(str(path), read_only=read_only)
        assert "\n" not in str(info.value)
    assert open_fds() == fds
    assert_one_line_failure(qednbd_in(tmp_path, "map", path), path)
    out = tmp_path / "out.raw"
    assert_one_line_failure(qednbd_in(tmp_path, "convert", "-O", "raw", path, out), path)
    assert not out.exists()
    proc = qednbd_in(tmp_path, "info", path)  # info names the backing file but does not open it
    assert "Traceback" not in proc.stdout + proc.stderr
    assert proc.returncode in (0, 1)
    assert digest(path) == before


@pytest.mark.parametrize("name", list(REFUSED_NAMES.values()), ids=list(REFUSED_NAMES))
def test_rebase_refuses_non_path_backing_names_and_writes_nothing(name, tmp_path):
    path = tmp_path / "t.qed"
    create_image(str(path), MiB)
    before = digest(path)
    assert_one_line_failure(qednbd_in(tmp_path, "rebase", "-u", "-b", name, "-F", "raw", path), path)
    assert digest(path) == before


def test_plain_names_with_colons_after_a_slash_are_paths(tmp_path):
    """Only a colon *before the first slash* is a protocol prefix: ``dir/a:b`` is a file."""
    (tmp_path / "dir").mkdir()
    raw_file(tmp_path / "dir" / "a:b", MiB, 0x3C)
    path = tmp_path / "t.qed"
    proc = qednbd_in(tmp_path, "create", "-b", "dir/a:b", "-F", "raw", path)
    assert proc.returncode == 0, proc.stderr
    with QedImage.open(str(path), read_only=True) as image:
        assert image.size == MiB
        assert image.read(0, 4096) == b"\x3c" * 4096


# -- where names resolve -----------------------------------------------------------------


def test_relative_backing_name_resolves_against_the_image_directory(tmp_path):
    images, elsewhere = tmp_path / "images", tmp_path / "elsewhere"
    images.mkdir()
    elsewhere.mkdir()
    raw_file(images / "base.raw", 2 * MiB, 0xBB)
    raw_file(elsewhere / "base.raw", 3 * MiB, 0xCC)  # what a cwd-relative lookup would find

    proc = qednbd_in(elsewhere, "create", "-b", "base.raw", "-F", "raw", "../images/top.qed")
    assert proc.returncode == 0, proc.stderr
    top = images / "top.qed"
    with open(top, "rb") as f:
        f.seek(56)
        offset, size = struct.unpack("<II", f.read(8))
        f.seek(offset)
        assert f.read(size) == b"base.raw", "the name must be stored verbatim"
    assert read_features(top) == F_BACKING_FILE | F_NO_PROBE

    proc = qednbd_in(elsewhere, "info", "--output=json", "../images/top.qed")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["virtual-size"] == 2 * MiB, "the size came from the wrong base.raw"
    assert info["backing-filename"] == "base.raw"
    assert os.path.samefile(os.path.join(elsewhere, info["full-backing-filename"]), images / "base.raw")

    proc = qednbd_in(elsewhere, "convert", "-O", "raw", "../images/top.qed", "out.raw")
    assert proc.returncode == 0, proc.stderr
    assert (elsewhere / "out.raw").read_bytes() == b"\xbb" * (2 * MiB)

    proc = qednbd_in(elsewhere, "map", "--output=json", "../images/top.qed")
    assert proc.returncode == 0, proc.stderr
    extents = json.loads(proc.stdout)
    assert [(e["depth"], e["data"]) for e in extents] == [(1, True)]

    # and through the API, from yet another cwd
    old = os.getcwd()
    os.chdir(elsewhere)
    try:
        with QedImage.open("../images/top.qed", read_only=True) as image:
            assert image.read(2 * MiB - 4096, 4096) == b"\xbb" * 4096
    finally:
        os.chdir(old)


def test_relative_names_chain_from_each_layer_directory(tmp_path):
    """top (in a/) names ``../b/mid.qed``; mid names ``base.raw``, which is b/base.raw."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "cwd").mkdir()
    raw_file(tmp_path / "b" / "base.raw", MiB, 0x42)
    raw_file(tmp_path / "a" / "base.raw", MiB, 0x24)  # decoy beside the top image
    create_image(str(tmp_path / "b" / "mid.qed"), MiB, backing_file="base.raw", backing_format="raw")
    create_image(str(tmp_path / "a" / "top.qed"), MiB, backing_file="../b/mid.qed", backing_format="qed")
    proc = qednbd_in(tmp_path / "cwd", "convert", "-O", "raw", "../a/top.qed", "out.raw")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "cwd" / "out.raw").read_bytes() == b"\x42" * MiB


def test_missing_backing_file_is_one_line(tmp_path):
    path = tmp_path / "t.qed"
    proc = qednbd_in(tmp_path, "create", "-b", "nonexistent.raw", "-F", "raw", path, "1M")
    assert_one_line_failure(proc, path)
    assert not path.exists()

    create_image(str(path), MiB, backing_file="nonexistent.raw", backing_format="raw")
    before = digest(path)
    line = assert_one_line_failure(qednbd_in(tmp_path, "map", path), path)
    assert "nonexistent.raw" in line
    out = tmp_path / "out.raw"
    assert_one_line_failure(qednbd_in(tmp_path, "convert", "-O", "raw", path, out), path)
    assert not out.exists()
    fds = open_fds()
    with pytest.raises(ImageError) as info:
        QedImage.open(str(path))
    assert info.value.errno == errno.ENOENT
    assert open_fds() == fds
    assert digest(path) == before


# -- loops and depth ---------------------------------------------------------------------


@pytest.mark.interop
def test_backing_loop_set_with_qemu_img_rebase_is_a_clear_error(tmp_path):
    a, b = tmp_path / "a.qed", tmp_path / "b.qed"
    qemu_img("create", "-f", "qed", a, "1M")
    qemu_img("create", "-f", "qed", b, "1M")
    qemu_img("rebase", "-u", "-b", "b.qed", "-F", "qed", a)
    qemu_img("rebase", "-u", "-b", "a.qed", "-F", "qed", b)
    assert read_features(a) == read_features(b) == F_BACKING_FILE
    before = (digest(a), digest(b))
    for image in (a, b):
        line = assert_one_line_failure(qednbd_in(tmp_path, "map", image), image)
        assert "loop" in line
        out = tmp_path / "out.raw"
        assert_one_line_failure(qednbd_in(tmp_path, "convert", "-O", "raw", image, out), image)
        assert not out.exists()
    fds = open_fds()
    for read_only in (True, False):
        with pytest.raises(InvalidImage, match="loop"):
            QedImage.open(str(a), read_only=read_only)
    assert open_fds() == fds
    assert (digest(a), digest(b)) == before


def test_image_that_is_its_own_backing_file_is_a_clear_error(tmp_path):
    (tmp_path / "sub").mkdir()
    a = tmp_path / "a.qed"
    # three spellings of the same file: itself, via a symlink, via ./sub/..
    (tmp_path / "link.qed").symlink_to("a.qed")
    for name in ("a.qed", "link.qed", "./sub/../a.qed"):
        create_image(str(a), MiB, backing_file=name, backing_format="qed")
        line = assert_one_line_failure(qednbd_in(tmp_path, "map", a), a)
        assert "loop" in line, name
        with pytest.raises(InvalidImage, match="loop"):
            QedImage.open(str(a), read_only=True)


def make_chain(tmp_path: Path, n_qed: int) -> Path:
    """base.raw (0x77) under ``n_qed`` QED layers l1.qed..lN.qed; returns the top."""
    raw_file(tmp_path / "base.raw", MiB, 0x77)
    below, fmt_below = "base.raw", "raw"
    for i in range(1, n_qed + 1):
        create_image(str(tmp_path / f"l{i}.qed"), MiB, backing_file=below, backing_format=fmt_below)
        below, fmt_below = f"l{i}.qed", "qed"
    return tmp_path / below


def test_chain_within_the_depth_limit_opens(tmp_path):
    # MAX_CHAIN_DEPTH images in all (one raw base, MAX_CHAIN_DEPTH-1 QED layers)
    top = make_chain(tmp_path, MAX_CHAIN_DEPTH - 1)
    with QedImage.open(str(top), read_only=True) as image:
        assert image.read(0, 4096) == b"\x77" * 4096
    proc = qednbd_in(tmp_path, "map", "--output=json", top)
    assert proc.returncode == 0, proc.stderr
    assert [e["depth"] for e in json.loads(proc.stdout)] == [MAX_CHAIN_DEPTH - 1]


def test_chain_deeper_than_the_limit_is_a_clear_error(tmp_path):
    top = make_chain(tmp_path, MAX_CHAIN_DEPTH + 1)
    fds = open_fds()
    with pytest.raises(InvalidImage) as info:
        QedImage.open(str(top), read_only=True)
    assert str(MAX_CHAIN_DEPTH) in str(info.value)
    assert open_fds() == fds, "the layers opened before the failure were not closed"
    line = assert_one_line_failure(qednbd_in(tmp_path, "map", top), top)
    assert str(MAX_CHAIN_DEPTH) in line
    out = tmp_path / "out.raw"
    assert_one_line_failure(qednbd_in(tmp_path, "convert", "-O", "raw", top, out), top)
    assert not out.exists()


# -- probing -----------------------------------------------------------------------------


def test_backing_with_qcow2_magic_and_no_no_probe_bit_is_refused(tmp_path):
    fake = tmp_path / "b.qcow2"
    fake.write_bytes(b"QFI\xfb" + bytes(MiB - 4))
    path = tmp_path / "t.qed"
    create_image(str(path), MiB)
    set_backing(path, b"b.qcow2", F_BACKING_FILE)
    before = digest(path)
    with pytest.raises(ImageError):
        QedImage.open(str(path), read_only=True)
    assert_one_line_failure(qednbd_in(tmp_path, "map", path), path)
    out = tmp_path / "out.raw"
    assert_one_line_failure(qednbd_in(tmp_path, "convert", "-O", "raw", path, out), path)
    assert not out.exists()
    assert digest(path) == before
    # declaring it raw is the user's explicit choice, and is honoured
    set_backing(path, b"b.qcow2", F_BACKING_FILE | F_NO_PROBE)
    with QedImage.open(str(path), read_only=True) as image:
        assert image.read(0, 8) == b"QFI\xfb" + bytes(4)


@pytest.mark.interop
def test_real_qcow2_backing_named_by_qemu_img_is_refused(tmp_path):
    qemu_img("create", "-f", "qcow2", tmp_path / "b.qcow2", "1M")
    path = tmp_path / "t.qed"
    qemu_img("create", "-f", "qed", "-b", "b.qcow2", "-F", "qcow2", path)
    assert read_features(path) == F_BACKING_FILE
    assert_one_line_failure(qednbd_in(tmp_path, "map", path), path)
    assert_one_line_failure(qednbd_in(tmp_path, "create", "-b", "b.qcow2", "-F", "qed", "x.qed"), "x.qed")
    assert not (tmp_path / "x.qed").exists()


def qed_looking_raw(path: Path) -> bytes:
    """A raw file whose bytes are a valid QED image, with a marker after the header."""
    create_image(str(path), MiB)
    with open(path, "r+b") as f:
        f.seek(4096)
        f.write(b"\xab" * 4096)
    return path.read_bytes()


def test_raw_backing_declared_raw_is_read_raw_despite_qed_magic(tmp_path):
    content = qed_looking_raw(tmp_path / "b.raw")
    assert content[:4] == b"QED\0"
    path = tmp_path / "t.qed"
    proc = qednbd_in(tmp_path, "create", "-b", "b.raw", "-F", "raw", path, str(len(content)))
    assert proc.returncode == 0, proc.stderr
    assert read_features(path) == F_BACKING_FILE | F_NO_PROBE
    with QedImage.open(str(path), read_only=True) as image:
        assert image.read(0, len(content)) == content
    proc = qednbd_in(tmp_path, "convert", "-O", "raw", path, "out.raw")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out.raw").read_bytes() == content
    # the same file without the NO_PROBE bit is probed, and is then a QED image of zeros
    with open(path, "r+b") as f:
        f.seek(16)
        f.write(struct.pack("<Q", F_BACKING_FILE))
    with QedImage.open(str(path), read_only=True) as image:
        assert image.backing is not None and image.backing.format_name == "qed"
        assert image.read(0, 8192) == bytes(8192)


@pytest.mark.interop
def test_raw_backing_with_qed_magic_reads_like_qemu(tmp_path):
    content = qed_looking_raw(tmp_path / "b.raw")
    path = tmp_path / "t.qed"
    qemu_img("create", "-f", "qed", "-b", "b.raw", "-F", "raw", path, str(len(content)))
    ref = tmp_path / "ref.raw"
    qemu_img("convert", "-f", "qed", "-O", "raw", path, ref)
    assert ref.read_bytes() == content
    with QedImage.open(str(path), read_only=True) as image:
        assert image.read(0, len(content)) == content
