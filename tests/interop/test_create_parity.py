"""R1: ``qednbd create`` writes the same bytes as ``qemu-img create -f qed`` and refuses where it refuses.

Where QEMU's own limits are bugs (table_size=1 cannot be opened; the uint64 overflow of
``qed_max_image_size`` at 64 MiB clusters), qednbd creates the image anyway, warns that QEMU
cannot open it, and must still be able to use it itself.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import qednbd, qemu_img, read_features

from qednbd.qed.image import QedImage

pytestmark = pytest.mark.interop

K, M, G = 1 << 10, 1 << 20, 1 << 30

GEOMETRIES = [(4 * K, 2), (4 * K, 16), (64 * K, 2), (64 * K, 4), (64 * K, 16), (4 * M, 2)]
SIZES = {"1M": 1 * M, "100000": 100352, "10G": 10 * G, "0": 0}  # argument → image_size after rounding
QEMU_REFUSES = {(4 * K, 2, "10G")}  # 4K/2 addresses at most 4 GiB


def _opts(cluster_size: int, table_size: int) -> str:
    return f"cluster_size={cluster_size},table_size={table_size}"


def _image_size(path: Path) -> int:
    return int.from_bytes(path.read_bytes()[48:56], "little")


def _one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1 and lines[0].strip(), f"expected one line on stderr, got {text!r}"
    return lines[0]


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize(("cluster_size", "table_size"), GEOMETRIES, ids=lambda v: str(v))
def test_create_matches_qemu_img(tmp_path, cluster_size, table_size, size):
    ref, mine = tmp_path / "ref.qed", tmp_path / "my.qed"
    opts = _opts(cluster_size, table_size)
    q = qemu_img("create", "-f", "qed", "-o", opts, ref, size, check=False)
    m = qednbd("create", "-o", opts, mine, size)
    if (cluster_size, table_size, size) in QEMU_REFUSES:
        assert q.returncode == 1, q.stdout + q.stderr  # the oracle behaves as qed.md says
        assert m.returncode == 1, m.stdout + m.stderr
        line = _one_line(m.stderr)
        reason = q.stderr.strip().rsplit(": ", 1)[-1]
        assert reason in line
        return
    assert q.returncode == 0, q.stderr
    assert m.returncode == 0, m.stderr
    assert mine.read_bytes() == ref.read_bytes()
    assert mine.stat().st_size == (1 + table_size) * cluster_size
    assert _image_size(mine) == SIZES[size]


@pytest.fixture
def backing_files(tmp_path: Path) -> dict[str, Path]:
    """b.raw of 1000000 bytes (not a multiple of 512) and b.qed of 100000 (→ 100352) bytes."""
    raw = tmp_path / "b.raw"
    raw.write_bytes(b"\xaa" * 1000000)
    qed = tmp_path / "b.qed"
    qemu_img("create", "-f", "qed", qed, "100000")
    return {"raw": raw, "qed": qed}


@pytest.mark.parametrize("size", ["3M", None], ids=["size-given", "size-from-backing"])
@pytest.mark.parametrize("naming", ["relative", "relative-subdir", "absolute"])
@pytest.mark.parametrize("backing_fmt", ["raw", "qed"])
def test_create_with_backing_matches_qemu_img(tmp_path, backing_files, backing_fmt, naming, size):
    backing = backing_files[backing_fmt]
    if naming == "relative":
        directory, name = tmp_path, backing.name
    elif naming == "relative-subdir":
        directory, name = tmp_path / "sub", f"../{backing.name}"
    else:
        directory, name = tmp_path, str(backing)
    directory.mkdir(exist_ok=True)
    ref, mine = directory / "ref.qed", directory / "my.qed"
    size_args = [size] if size else []
    qemu_img("create", "-f", "qed", "-b", name, "-F", backing_fmt, ref, *size_args)
    m = qednbd("create", "-b", name, "-F", backing_fmt, mine, *size_args)
    assert m.returncode == 0, m.stderr
    assert mine.read_bytes() == ref.read_bytes()
    expected_features = 0x5 if backing_fmt == "raw" else 0x1
    assert read_features(mine) == expected_features
    assert mine.read_bytes()[64 : 64 + len(name)] == name.encode()
    expected_size = 3 * M if size else {"raw": 1000448, "qed": 100352}[backing_fmt]
    assert _image_size(mine) == expected_size


def test_create_backing_without_format_is_refused(tmp_path, backing_files):
    q = qemu_img("create", "-f", "qed", "-b", "b.raw", tmp_path / "ref.qed", "1M", check=False)
    m = qednbd("create", "-b", "b.raw", tmp_path / "my.qed", "1M")
    assert q.returncode == 1
    assert m.returncode == 1
    _one_line(m.stderr)


UNOPENABLE = [
    pytest.param(4 * K, 1, "1M", 1 * M, id="4K-table_size-1"),
    pytest.param(64 * M, None, "1G", 1 * G, id="64M-clusters-1G"),
]


@pytest.mark.parametrize(("cluster_size", "table_size", "size_arg", "size"), UNOPENABLE)
def test_create_images_qemu_cannot_open(tmp_path, cluster_size, table_size, size_arg, size):
    """qednbd creates these (QEMU bugs 1 and 2 in qed.md §9), warns, and can use them itself."""
    path = tmp_path / "x.qed"
    opts = f"cluster_size={cluster_size}" + (f",table_size={table_size}" if table_size else "")
    m = qednbd("create", "-o", opts, path, size_arg)
    assert m.returncode == 0, m.stderr
    assert "QEMU cannot open" in m.stderr

    q = qemu_img("info", "-f", "qed", path, check=False)
    assert q.returncode != 0, q.stdout

    info = qednbd("info", "--output=json", path)
    assert info.returncode == 0, info.stderr
    data = json.loads(info.stdout)
    assert data["virtual-size"] == size
    assert data["cluster-size"] == cluster_size

    pattern = bytes(range(256)) * 24  # 6 KiB, crosses a 4 KiB cluster boundary
    pos = 4096 - 1000
    try:
        with QedImage.open(str(path)) as image:
            image.write(pos, pattern)
        assert read_features(path) == 0
        with QedImage.open(str(path), read_only=True) as image:
            assert image.read(pos, len(pattern)) == pattern
            assert image.read(0, pos) == bytes(pos)
            assert image.read(pos + len(pattern), 8192) == bytes(8192)
            assert image.read(size - 512, 512) == bytes(512)
    finally:
        path.unlink()  # 64 MiB clusters: the data cluster and L2 table take 320 MiB of disk


def test_create_table_size_1_bytes_match_qemu_img(tmp_path):
    """QEMU creates 4K/table_size=1 images too (it just cannot open them): same bytes."""
    ref, mine = tmp_path / "ref.qed", tmp_path / "my.qed"
    qemu_img("create", "-f", "qed", "-o", _opts(4 * K, 1), ref, "1M")
    assert qednbd("create", "-o", _opts(4 * K, 1), mine, "1M").returncode == 0
    assert mine.read_bytes() == ref.read_bytes()
