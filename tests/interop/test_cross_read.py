"""R3/R5/R7 cross-read: images written by qemu-io read back identically through our engine.

For each image (built with qemu-img/qemu-io only) the oracle is ``qemu-img convert -O raw``
(the backing chain flattened). ``QedImage.read(0, size)`` and ``qednbd convert -O raw`` must
both produce exactly those bytes.
"""

from __future__ import annotations

import pytest
from helpers import qed_layer as qed
from helpers import qednbd, qemu_img, qemu_io, read_features
from helpers import raw_layer as raw

from qednbd.qed.image import QedImage

pytestmark = pytest.mark.interop


CASES: dict[str, list[dict[str, object]]] = {
    "empty": [qed("t.qed", "4M")],
    "size-0": [qed("t.qed", "0")],
    "patterns-64K-4": [
        qed("t.qed", "8M", "write -P 0x11 0 64k", "write -P 0x22 1M 200k", "write -P 0x33 7M 1M")
    ],
    "zero-clusters": [
        qed(
            "t.qed",
            "4M",
            "write -P 0x11 0 512k",
            "write -z 64k 128k",  # zero clusters over data (zeroed in place)
            "write -z 1M 256k",  # zero clusters over unallocated
            "write -P 0x22 1M 4k",  # partial write into a zero cluster
            "write -z 300k 10k",  # unaligned: an allocating write of zeros
        )
    ],
    "partial-clusters-4K-16": [
        qed(
            "t.qed",
            "2M",
            "write -P 0x41 100 200",
            "write -P 0x42 4000 5000",
            "write -P 0x43 1048575 2",
            cs="4K",
            ts=16,
        )
    ],
    "l2-straddle-4K-2": [
        qed(
            "t.qed",
            "16M",
            "write -P 0x51 4190208 8192",
            "write -P 0x52 8388000 1000",
            "write -P 0x53 12M 4M",
            "write -z 4M 4k",
            cs="4K",
            ts=2,
        )
    ],
    "geometry-64K-16": [qed("t.qed", "64M", "write -P 0x61 0 4k", "write -P 0x62 40M 3M", cs="64K", ts=16)],
    "geometry-4M-2": [
        qed("t.qed", "32M", "write -P 0x71 5M 4k", "write -z 12M 4M", "write -P 0x72 20M 1", cs="4M", ts=2)
    ],
    "unaligned-size-64K-4": [
        qed("t.qed", "1000000", "write -P 0x81 983040 17408", "write -P 0x82 500000 1000")
    ],
    "unaligned-size-4K-16": [
        qed("t.qed", "100000", "write -P 0x83 99840 512", "write -z 90112 4096", cs="4K", ts=16)
    ],
    "raw-backing": [
        raw("b.raw", "4M", "write -P 0xbb 0 4M"),
        qed(
            "t.qed",
            "4M",
            "write -P 0x11 4k 4k",
            "write -z 1M 64k",
            "write -P 0x12 2M 100",
            backing="b.raw",
            backing_fmt="raw",
        ),
    ],
    "raw-chain-depth-2": [
        raw("b.raw", "4M", "write -P 0xbb 0 2M", "write -P 0xbc 3M 512"),
        qed(
            "m.qed",
            "4M",
            "write -P 0xcc 64k 64k",
            "write -z 128k 64k",
            "write -P 0xcd 3M 100",
            backing="b.raw",
            backing_fmt="raw",
        ),
        qed(
            "t.qed",
            "4M",
            "write -P 0xdd 100k 4k",
            "write -z 3M 64k",
            "write -P 0xde 1M 1",
            backing="m.qed",
            backing_fmt="qed",
        ),
    ],
    "qed-chain-depth-2": [
        qed("b.qed", "4M", "write -P 0xb1 0 4M", "write -z 2M 64k", cs="4K", ts=16),
        qed(
            "m.qed",
            "4M",
            "write -P 0xc1 60k 8k",
            "write -z 1M 1M",
            "write -P 0xc2 1M 4k",
            backing="b.qed",
            backing_fmt="qed",
        ),
        qed(
            "t.qed",
            "4M",
            "write -P 0xd1 1000 1000",
            "write -P 0xd2 2M 64k",
            backing="m.qed",
            backing_fmt="qed",
            cs="4K",
            ts=2,
        ),
    ],
    "r7-raw-backing-shorter-than-cluster": [
        raw("short.raw", "6144", "write -P 0xbb 0 6144"),
        qed(
            "t.qed",
            "100000",
            "write -P 0x11 4096 512",
            "write -P 0x12 99840 512",
            backing="short.raw",
            backing_fmt="raw",
            cs="4K",
            ts=16,
        ),
    ],
    "qed-backing-shorter-than-image": [
        qed("b.qed", "1000000", "write -P 0xb2 0 1000000"),
        qed(
            "t.qed",
            "4M",
            "write -P 0x13 999000 2000",
            "write -P 0x14 3M 512",
            backing="b.qed",
            backing_fmt="qed",
        ),
    ],
}


@pytest.mark.parametrize("name", list(CASES))
def test_engine_reads_what_qemu_wrote(tmp_path, make_layers, qemu_raw, name):
    top = make_layers(CASES[name])
    expected = qemu_raw(top)
    with QedImage.open(str(top), read_only=True) as image:
        assert image.size == len(expected)
        got = image.read(0, image.size)
    assert got == expected

    out = tmp_path / "qednbd.raw"
    proc = qednbd("convert", "-O", "raw", top, out)
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes() == expected


def test_engine_reads_need_check_image(tmp_path, qemu_raw):
    """An image qemu-io left dirty (NEED_CHECK) reads the same; a read-only open leaves the bit."""
    top = tmp_path / "t.qed"
    qemu_img("create", "-f", "qed", top, "1M")
    qemu_io(top, "write -P 0x5a 0 4k", "abort", check=False)
    assert read_features(top) == 0x2
    expected = qemu_raw(top)
    with QedImage.open(str(top), read_only=True) as image:
        assert image.read(0, image.size) == expected
    assert expected[:4096] == b"\x5a" * 4096
    assert read_features(top) == 0x2
