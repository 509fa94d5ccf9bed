"""QEMU's own NBD client against ``qednbd serve``: ``qemu-img`` info/map/compare/convert on nbd://
URIs, and ``qemu-io`` patterns at unaligned offsets, across cluster boundaries and in the last
sector; then the server is stopped and the image file is checked with the QEMU tools alone."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from helpers import qemu_img, qemu_io

pytestmark = pytest.mark.interop

K, M = 1 << 10, 1 << 20
SIZE = 64 * M
LAST = SIZE - 512


def qemu_io_ok(target: str | Path, *commands: str, fmt: str) -> str:
    out = qemu_io(target, *commands, fmt=fmt)
    text = out.stdout + out.stderr
    assert "fail" not in text.lower() and "error" not in text.lower(), text
    return text


def check_clean(path: Path) -> None:
    out = qemu_img("check", "-f", "qed", path)
    assert "No errors were found" in out.stdout, out.stdout


def test_qemu_img_on_nbd_uri(tmp_path: Path, nbd_server) -> None:  # type: ignore[no-untyped-def]
    image = tmp_path / "disk.qed"
    qemu_img("create", "-f", "qed", image, str(SIZE))
    qemu_io_ok(
        image,
        "write -P 0x11 0 1M",
        "write -z 8M 1M",
        "write -P 0x33 31457380 5000",  # 30M + 100, inside one cluster
        f"write -P 0x22 {LAST} 512",
        fmt="qed",
    )
    reference = tmp_path / "ref.raw"
    qemu_img("convert", "-f", "qed", "-O", "raw", image, reference)
    server = nbd_server(image)
    uri = server.uri("disk.qed")

    text = qemu_img("info", uri).stdout
    assert "file format: raw" in text and "virtual size: 64 MiB (67108864 bytes)" in text, text
    info = json.loads(qemu_img("info", "--output=json", uri).stdout)
    assert info["format"] == "raw" and info["virtual-size"] == SIZE

    extents = json.loads(qemu_img("map", "-f", "raw", "--output=json", uri).stdout)
    assert sum(e["length"] for e in extents) == SIZE
    data = [(e["start"], e["start"] + e["length"]) for e in extents if e["data"]]
    assert data == [(0, M), (30 * M, 30 * M + 64 * K), (SIZE - 64 * K, SIZE)], extents
    assert all(e["zero"] for e in extents if not e["data"]), extents

    compared = qemu_img("compare", "-f", "raw", "-F", "raw", reference, uri, check=False)
    assert compared.returncode == 0 and "Images are identical." in compared.stdout, compared.stdout

    qcow2, raw = tmp_path / "out.qcow2", tmp_path / "out.raw"
    qemu_img("convert", "-f", "raw", "-O", "qcow2", uri, qcow2)
    qemu_img("convert", "-f", "raw", "-O", "raw", server.uri(), raw)  # the default export too
    assert qemu_img("compare", "-f", "qcow2", "-F", "raw", qcow2, reference, check=False).returncode == 0
    assert raw.read_bytes() == reference.read_bytes()
    # The qcow2 copy is sparse where the export reported holes.
    qcow2_map = json.loads(qemu_img("map", "--output=json", qcow2).stdout)
    assert [(e["start"], e["start"] + e["length"]) for e in qcow2_map if e["data"]] == data

    assert server.stop() == 0
    check_clean(image)


def test_qemu_io_patterns(tmp_path: Path, nbd_server) -> None:  # type: ignore[no-untyped-def]
    image = tmp_path / "d.qed"
    qemu_img("create", "-f", "qed", image, str(SIZE))
    qemu_io_ok(image, "write -P 0x11 128k 128k", "write -P 0x44 3M 128k", fmt="qed")
    server = nbd_server(image, unix=True)
    qemu_io_ok(
        server.uri(),
        # unaligned, in an unallocated cluster
        "write -P 0xab 4095 3",
        "read -P 0xab 4095 3",
        "read -P 0 0 4095",
        "read -P 0 4098 61438",
        # across a cluster boundary, into the next unallocated cluster
        "write -P 0xcd 65530 12",
        "read -P 0xcd 65530 12",
        "read -P 0 65542 1000",
        # reads across cluster boundaries of data written before serving
        "read -P 0x11 140000 100000",
        "read -P 0 120000 11072",
        # unaligned write into an allocated cluster, across its boundary
        "write -P 0x12 196607 2",
        "read -P 0x11 131072 65535",
        "read -P 0x12 196607 2",
        "read -P 0x11 196609 65535",
        # FUA
        "write -f -P 0xef 1M 64k",
        "read -P 0xef 1M 64k",
        # the last sector and the last byte
        f"write -P 0xee {LAST} 512",
        f"write -P 0xdd {SIZE - 1} 1",
        f"read -P 0xee {LAST} 511",
        f"read -P 0xdd {SIZE - 1} 1",
        # write zeroes over data and over nothing, with and without unmap
        "write -z 128k 64k",
        "read -P 0 128k 64k",
        "read -P 0x12 196608 1",
        "read -P 0x11 196609 65535",
        "write -z -u 2M 1M",
        "read -P 0 2M 1M",
        # discard: qednbd punches whole clusters, which read back as zeroes (qemu-nbd ignores
        # discard unless --discard=unmap, so there the old data would stay)
        "discard 3M 64k",
        "read -P 0 3M 64k",
        "read -P 0x44 3136k 64k",
        # pipelined and vectored requests
        "aio_write -P 0x55 5M 4k",
        "aio_write -P 0x56 5124k 4k",
        "aio_flush",
        "writev -P 0x57 6M 512 1k 2k",
        "readv -P 0x57 6M 3k 512",
        "flush",
        fmt="raw",
    )
    assert server.stop() == 0

    qemu_io_ok(
        image,
        "read -P 0 0 4095",
        "read -P 0xab 4095 3",
        "read -P 0 4098 61432",
        "read -P 0xcd 65530 12",
        "read -P 0 128k 64k",
        "read -P 0x12 196608 1",
        "read -P 0x11 196609 65535",
        "read -P 0xef 1M 64k",
        "read -P 0 2M 1M",
        "read -P 0 3M 64k",
        "read -P 0x44 3136k 64k",
        "read -P 0x55 5M 4k",
        "read -P 0x56 5124k 4k",
        "read -P 0x57 6M 3584",
        "read -P 0 6295040 512",
        f"read -P 0xee {LAST} 511",
        f"read -P 0xdd {SIZE - 1} 1",
        fmt="qed",
    )
    check_clean(image)
    assert os.path.getsize(image) < 16 * M  # sparse: only what was written is allocated


def test_qemu_io_last_sector_of_odd_size(tmp_path: Path, nbd_server) -> None:  # type: ignore[no-untyped-def]
    """An image whose size is not a multiple of the cluster size: the tail of the last cluster
    is not part of the export, the last sector and byte are."""
    image = tmp_path / "odd.qed"
    qemu_img("create", "-f", "qed", image, "1000000")
    size = json.loads(qemu_img("info", "--output=json", image).stdout)["virtual-size"]
    assert size == 1000448  # qemu-img rounds up to whole sectors
    server = nbd_server(image)
    uri = server.uri()
    assert json.loads(qemu_img("info", "--output=json", uri).stdout)["virtual-size"] == size
    qemu_io_ok(
        uri,
        f"write -P 0x71 {size - 512} 512",
        f"write -P 0x72 {size - 3} 3",
        f"write -P 0x73 {size - 70000} 5000",  # across the last cluster boundary
        f"read -P 0x71 {size - 512} 509",
        f"read -P 0x72 {size - 3} 3",
        f"read -P 0x73 {size - 70000} 5000",
        fmt="raw",
    )
    assert server.stop() == 0
    qemu_io_ok(
        image,
        f"read -P 0x71 {size - 512} 509",
        f"read -P 0x72 {size - 3} 3",
        f"read -P 0x73 {size - 70000} 5000",
        f"read -P 0 {size - 65000} 64488",
        fmt="qed",
    )
    check_clean(image)
