"""R11 and R6: ``qednbd resize`` and ``qednbd rebase -u`` write what qemu-img writes.

Both are header-only operations: the same command on two copies of one image must leave
byte-identical files, and a refused command must leave the file untouched.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from helpers import qednbd, qemu_img, qemu_io, read_features

pytestmark = pytest.mark.interop

K, M, G = 1 << 10, 1 << 20, 1 << 30


def _twins(tmp_path: Path, fresh: Path) -> tuple[Path, Path]:
    theirs, ours = tmp_path / "qemu.qed", tmp_path / "ours.qed"
    shutil.copyfile(fresh, theirs)
    shutil.copyfile(fresh, ours)
    return theirs, ours


def _image(tmp_path: Path, size: str, cluster_size: int, table_size: int) -> Path:
    fresh = tmp_path / "fresh.qed"
    qemu_img("create", "-f", "qed", "-o", f"cluster_size={cluster_size},table_size={table_size}", fresh, size)
    if size != "0":
        qemu_io(fresh, "write -P 0x11 0 8k", "write -z 32k 32k")
    return fresh


def _one_line(text: str) -> None:
    lines = text.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qednbd: "), text


RESIZES = [
    pytest.param(64 * K, 4, "4M", "16M", 16 * M, id="64K-4-grow"),
    pytest.param(64 * K, 4, "4M", "+1M", 5 * M, id="64K-4-grow-relative"),
    pytest.param(64 * K, 4, "4M", "4194816", 4 * M + 512, id="64K-4-grow-512"),
    pytest.param(64 * K, 4, "4M", "4M", 4 * M, id="64K-4-same-size"),
    pytest.param(64 * K, 4, "0", "1G", 1 * G, id="64K-4-from-0"),
    pytest.param(4 * K, 2, "4M", "4G", 4 * G, id="4K-2-to-max"),
    pytest.param(4 * K, 16, "100000", "10G", 10 * G, id="4K-16-unaligned-to-10G"),
]


@pytest.mark.parametrize(("cluster_size", "table_size", "size", "new_size", "expected"), RESIZES)
def test_resize_matches_qemu_img(tmp_path, qemu_check, cluster_size, table_size, size, new_size, expected):
    fresh = _image(tmp_path, size, cluster_size, table_size)
    theirs, ours = _twins(tmp_path, fresh)
    qemu_img("resize", "-f", "qed", theirs, new_size)
    proc = qednbd("resize", ours, new_size)
    assert proc.returncode == 0, proc.stderr
    assert ours.read_bytes() == theirs.read_bytes()
    before, after = fresh.read_bytes(), ours.read_bytes()
    assert int.from_bytes(after[48:56], "little") == expected
    assert after[:48] == before[:48] and after[56:] == before[56:]  # only image_size changed
    qemu_check(ours)


REFUSED = [
    pytest.param("4M", "1M", id="shrink"),
    pytest.param("4M", "4194404", id="not-multiple-of-512"),
    pytest.param("4M", "8G", id="beyond-max-4K-2"),
]


@pytest.mark.parametrize(("size", "new_size"), REFUSED)
def test_resize_refused_like_qemu_img(tmp_path, size, new_size):
    fresh = _image(tmp_path, size, 4 * K, 2)
    theirs, ours = _twins(tmp_path, fresh)
    assert qemu_img("resize", "-f", "qed", theirs, new_size, check=False).returncode == 1
    proc = qednbd("resize", ours, new_size)
    assert proc.returncode == 1, proc.stdout
    _one_line(proc.stderr)
    assert ours.read_bytes() == fresh.read_bytes() == theirs.read_bytes()


def test_resize_negative_relative_size_refused(tmp_path):
    fresh = _image(tmp_path, "4M", 64 * K, 4)
    theirs, ours = _twins(tmp_path, fresh)
    assert qemu_img("resize", "-f", "qed", theirs, "-1M", check=False).returncode == 1
    assert qednbd("resize", ours, "-1M").returncode == 1
    assert ours.read_bytes() == fresh.read_bytes()


@pytest.fixture
def rebase_dir(tmp_path: Path) -> Path:
    """b.raw, b2.qed and a longer-named raw file to point overlays at."""
    (tmp_path / "b.raw").write_bytes(b"\xbb" * M)
    (tmp_path / "a-much-longer-backing-file-name.raw").write_bytes(bytes(M))
    qemu_img("create", "-f", "qed", tmp_path / "b2.qed", "1M")
    return tmp_path


def _overlay(directory: Path, backing: str | None, backing_fmt: str | None) -> Path:
    fresh = directory / "fresh.qed"
    args: list[str] = ["create", "-f", "qed"]
    if backing:
        args += ["-b", backing, "-F", backing_fmt or "qed"]
    qemu_img(*args, fresh, "8M")
    qemu_io(fresh, "write -P 0x11 0 4k")
    return fresh


def test_rebase_r6_sequence(rebase_dir, qemu_check):
    """qed backing → raw → none: features 0x1 → 0x5 → 0x0, name offset stays 64, stale name bytes stay."""
    fresh = _overlay(rebase_dir, "b2.qed", "qed")
    theirs, ours = _twins(rebase_dir, fresh)
    assert read_features(ours) == 0x1

    qemu_img("rebase", "-u", "-b", "b.raw", "-F", "raw", "-f", "qed", theirs)
    proc = qednbd("rebase", "-u", "-b", "b.raw", "-F", "raw", ours)
    assert proc.returncode == 0, proc.stderr
    assert ours.read_bytes() == theirs.read_bytes()
    assert read_features(ours) == 0x5
    assert ours.read_bytes()[64:69] == b"b.raw"

    qemu_img("rebase", "-u", "-b", "", "-f", "qed", theirs)
    proc = qednbd("rebase", "-u", "-b", "", ours)
    assert proc.returncode == 0, proc.stderr
    assert ours.read_bytes() == theirs.read_bytes()
    header = ours.read_bytes()[:128]
    assert read_features(ours) == 0x0
    assert int.from_bytes(header[56:60], "little") == 64  # backing_filename_offset kept
    assert int.from_bytes(header[60:64], "little") == 0
    assert header[64:69] == b"b.raw"  # the old name is left behind
    qemu_check(ours)


REBASES = [
    pytest.param(None, None, "b.raw", "raw", id="none-to-raw"),
    pytest.param(None, None, "b2.qed", "qed", id="none-to-qed"),
    pytest.param("b.raw", "raw", "b2.qed", "qed", id="raw-to-qed"),
    pytest.param("b2.qed", "qed", "b.raw", "raw", id="qed-to-raw"),
    pytest.param("b.raw", "raw", "", None, id="raw-to-none"),
    pytest.param("a-much-longer-backing-file-name.raw", "raw", "b.raw", "raw", id="shorter-name"),
    pytest.param("b.raw", "raw", "a-much-longer-backing-file-name.raw", "raw", id="longer-name"),
    pytest.param("b.raw", "raw", "ABSOLUTE", "raw", id="absolute-name"),
]


@pytest.mark.parametrize(("old", "old_fmt", "new", "new_fmt"), REBASES)
def test_rebase_unsafe_matches_qemu_img(rebase_dir, old, old_fmt, new, new_fmt):
    if new == "ABSOLUTE":
        new = str(rebase_dir / "b.raw")
    fresh = _overlay(rebase_dir, old, old_fmt)
    theirs, ours = _twins(rebase_dir, fresh)
    fmt_args = ["-F", new_fmt] if new_fmt else []
    qemu_img("rebase", "-u", "-b", new, *fmt_args, "-f", "qed", theirs)
    proc = qednbd("rebase", "-u", "-b", new, *fmt_args, ours)
    assert proc.returncode == 0, proc.stderr
    assert ours.read_bytes() == theirs.read_bytes()
    expected = 0 if not new else (0x5 if new_fmt == "raw" else 0x1)
    assert read_features(ours) == expected
