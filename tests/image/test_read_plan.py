"""QedImage.read_plan (what the server reads with) gives exactly what QedImage.read gives, and fails
where it fails: one-cluster fast path and the extent walk, with and without a backing file."""

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
            assert materialize(img, plan, pos, length) == img.read(pos, length), (pos, length)


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
        with pytest.raises(ImageError) as outside:
            img.read_plan(img.size - 1, 2)
        assert outside.value.errno == errno.EINVAL
