"""QedImage.write_in_place (the server's small-WRITE fast path) writes only where a write changes
no table — inside one data cluster of this image — and says False everywhere else, touching
nothing; what it wrote reads back through qemu-io and the image stays clean for qemu-img check."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from helpers import qemu_img, qemu_io

from qednbd.qed.image import QedImage


@pytest.fixture
def image(tmp_path: Path) -> Path:
    base = tmp_path / "base.qed"
    qemu_img("create", "-f", "qed", base, "8M")
    qemu_io(base, "write -P 0x0b 2M 64k")
    path = tmp_path / "top.qed"
    qemu_img("create", "-f", "qed", "-b", base.name, "-F", "qed", path, "8M")
    qemu_io(path, "write -P 0x11 0 128k", "write -z 1M 64k")
    return path


def test_in_place_only_inside_one_data_cluster(image: Path, tmp_path: Path) -> None:
    before = tmp_path / "before.qed"
    shutil.copyfile(image, before)
    with QedImage.open(str(image)) as img:
        assert img.write_in_place(4096, b"\x22" * 512)  # inside cluster 0
        assert img.write_in_place(65536 + 65024, b"\x33" * 512)  # the last sector of cluster 1
        assert not img.write_in_place(65536 - 256, b"\x44" * 512)  # spans clusters 0 and 1
        assert not img.write_in_place(1 << 20, b"\x55" * 512)  # a zero cluster
        assert not img.write_in_place(2 << 20, b"\x66" * 512)  # backing data, not this image's
        assert not img.write_in_place(5 << 20, b"\x77" * 512)  # unallocated
        assert not img.write_in_place(8 << 20, b"\x88")  # past the end
        size = img.file_size
    with QedImage.open(str(image)) as img:
        assert img.file_size == size  # nothing allocated
    qemu_io(
        image,
        "read -P 0x11 0 4096",
        "read -P 0x22 4096 512",
        "read -P 0x11 4608 125952",
        "read -P 0x33 130560 512",
        "read -P 0 1M 64k",
        "read -P 0x0b 2M 64k",
        "read -P 0 5M 64k",
    )
    qemu_img("check", image)


def test_read_only_image_takes_no_write(image: Path) -> None:
    with QedImage.open(str(image), read_only=True) as img:
        assert not img.write_in_place(4096, b"\x22" * 512)
    qemu_io(image, "read -P 0x11 0 128k")
