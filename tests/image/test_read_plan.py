"""QedImage.read_plan and read_cached (what the server reads with) give exactly what QedImage.read
gives, and fail where it fails: one-cluster fast paths and the extent walk, with and without a
backing file."""

from __future__ import annotations

import errno
import random
import shutil
from pathlib import Path

import pytest
from helpers import REPO_ROOT, qemu_img, qemu_io

from qednbd.errors import ImageError
from qednbd.qed.image import QedImage, ReadPiece

DATA = REPO_ROOT / "tests" / "data"


def materialize(image: QedImage, plan: list[ReadPiece], pos: int, length: int) -> bytes:
    out = bytearray()
    expect = pos
    for piece in plan:
        assert piece.offset == expect and piece.length > 0  # contiguous, in order, no gaps
        if piece.host_offset is not None:
            out += image.read_host(piece.host_offset, piece.length)
        elif piece.data is not None:
            assert len(piece.data) == piece.length
            out += piece.data
        else:
            out += bytes(piece.length)
        expect += piece.length
    assert expect == pos + length
    return bytes(out)


def ranges(size: int, cluster: int, seed: int) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    out = [(0, 1), (size - 1, 1), (size - 512, 512), (0, size), (cluster - 1, 2), (cluster, cluster)]
    for _ in range(300):
        pos = rng.randrange(size)
        length = rng.randint(1, min(size - pos, rng.choice([512, cluster, 3 * cluster, 1 << 20])))
        out.append((pos, length))
    return out


@pytest.mark.parametrize("backing", [None, "raw", "qed"])
@pytest.mark.parametrize("cluster", ["4k", "64k"])
def test_plan_reads_what_read_reads(tmp_path: Path, backing: str | None, cluster: str) -> None:
    size = 8 << 20
    image = tmp_path / "top.qed"
    args = ["-o", f"cluster_size={cluster}"]
    if backing is not None:
        base = tmp_path / f"base.{backing}"
        qemu_img("create", "-f", backing, base, str(size - (1 << 20)))  # shorter than the overlay
        qemu_io(base, "write -P 0x0b 0 3M", "write -P 0x0c 5M 64k", fmt=backing)
        args += ["-b", base.name, "-F", backing]
    qemu_img("create", "-f", "qed", *args, image, str(size))
    qemu_io(
        image,
        "write -P 0x11 100 5000",
        "write -z 1M 256k",
        "write -P 0x22 2M 70k",
        "write -P 0x33 8386560 512",
    )
    cs = 4096 if cluster == "4k" else 65536
    with QedImage.open(str(image), read_only=True) as img:
        for pos, length in ranges(size, cs, seed=len(str(backing)) + cs):
            plan = img.read_plan(pos, length)
            expected = img.read(pos, length)
            assert materialize(img, plan, pos, length) == expected, (pos, length)
            cached = img.read_cached(pos, length)  # img.read just brought it into the page cache
            one_extent = len(plan) == 1 and plan[0].host_offset is not None
            if one_extent and pos // cs == (pos + length - 1) // cs:
                assert cached == expected, (pos, length)
            else:  # holes, zero clusters, backing data, several clusters: the general path
                assert cached is None, (pos, length)


@pytest.mark.parametrize("name", ["l2-past-eof.qed", "l2-unaligned.qed"])
def test_plan_fails_where_read_fails(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    shutil.copyfile(DATA / name, path)
    with QedImage.open(str(path), read_only=True) as img:
        for pos, length in [(8192, 512), (0, 12288), (8292, 100), (4096, 8192)]:  # L2#0[2] is bad
            with pytest.raises(ImageError) as via_read:
                img.read(pos, length)
            with pytest.raises(ImageError) as via_plan:
                img.read_plan(pos, length)
            assert via_read.value.errno == via_plan.value.errno == errno.EIO
            if pos // 4096 == (pos + length - 1) // 4096:
                with pytest.raises(ImageError) as via_cached:
                    img.read_cached(pos, length)
                assert via_cached.value.errno == errno.EIO
        with pytest.raises(ImageError) as outside:
            img.read_plan(img.size - 1, 2)
        assert outside.value.errno == errno.EINVAL
        assert img.read_cached(img.size - 1, 2) is None


def test_table_checks_come_back_when_the_file_shrinks(tmp_path: Path) -> None:
    """Lookups skip re-checking an L2 offset already found valid; a truncation (repair) must
    make them check again, or a table past the new end of file would be read as valid."""
    path = tmp_path / "t.qed"
    qemu_img("create", "-f", "qed", "-o", "cluster_size=4k", path, "8M")
    qemu_io(path, "write -P 0x5a 0 4k")
    with QedImage.open(str(path)) as img:
        assert img.read_cached(0, 4096) == b"\x5a" * 4096
        size = img.file_size
        l2_offset = img.l1.entries[0]  # QEMU put the data cluster first, then the L2 table
        img.file_size = l2_offset  # as Repair.truncate_phase does: the data cluster stays inside
        with pytest.raises(ImageError) as after:
            img.read_cached(0, 4096)
        assert after.value.errno == errno.EIO
        img.file_size = size
