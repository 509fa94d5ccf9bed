"""R13: ``qednbd convert`` produces the content ``qemu-img convert`` produces, and stays sparse.

The oracle for content is ``qemu-img convert -O raw`` of the source (a QED source's backing
chain flattened). QED outputs must pass ``qemu-img check``, have no backing file, and keep
zero and unallocated source regions unallocated; raw outputs must be sparse.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import qed_layer as qed
from helpers import qednbd, qemu_img, read_features
from helpers import raw_layer as raw

pytestmark = pytest.mark.interop

K, M = 1 << 10, 1 << 20


SOURCES: dict[str, list[dict[str, object]]] = {
    "qed-plain": [qed("s.qed", "4M", "write -P 0x11 0 100k", "write -z 1M 64k", "write -P 0x12 3M 1")],
    "qed-chain": [
        raw("b.raw", "3M", "write -P 0xbb 0 3M"),
        qed("m.qed", "4M", "write -P 0xcc 64k 64k", "write -z 1M 128k", backing="b.raw", backing_fmt="raw"),
        qed(
            "s.qed",
            "4M",
            "write -P 0xdd 100k 10k",
            "write -P 0xde 3M 512",
            backing="m.qed",
            backing_fmt="qed",
        ),
    ],
    "qed-unaligned-4K-16": [
        qed("s.qed", "100000", "write -P 0x21 99840 512", "write -P 0x22 0 1", cs="4K", ts=16)
    ],
    "raw": [raw("s.raw", "3M", "write -P 0x31 0 64k", "write -P 0x32 1M 1000", "write -P 0x33 2M 4k")],
    "raw-odd-length": [raw("s.raw", "1000000", "write -P 0x34 999000 1000")],
}


def _src_fmt(name: str) -> str:
    return "raw" if name.startswith("raw") else "qed"


@pytest.mark.parametrize("probe", [True, False], ids=["probed", "with-f"])
@pytest.mark.parametrize("dst_fmt", ["raw", "qed"])
@pytest.mark.parametrize("source", list(SOURCES))
def test_convert_content_matches_qemu_img(
    tmp_path, make_layers, qemu_raw, qemu_check, source, dst_fmt, probe
):
    src = make_layers(SOURCES[source])
    src_fmt = _src_fmt(source)
    expected = qemu_raw(src, src_fmt)
    out = tmp_path / f"out.{dst_fmt}"
    fmt_args = [] if probe else ["-f", src_fmt]
    proc = qednbd("convert", *fmt_args, "-O", dst_fmt, src, out)
    assert proc.returncode == 0, proc.stderr
    if dst_fmt == "raw":
        assert out.read_bytes() == expected
    else:
        qemu_check(out)
        assert read_features(out) == 0  # the chain is flattened: no backing file
        assert qemu_raw(out) == expected


def test_convert_to_qed_with_geometry(tmp_path, make_layers, qemu_raw, qemu_check):
    src = make_layers(SOURCES["qed-chain"])
    out = tmp_path / "out.qed"
    proc = qednbd("convert", "-O", "qed", "-o", "cluster_size=4K,table_size=16", src, out)
    assert proc.returncode == 0, proc.stderr
    qemu_check(out)
    info = json.loads(qemu_img("info", "--output=json", "-f", "qed", out).stdout)
    assert info["cluster-size"] == 4 * K
    assert qemu_raw(out) == qemu_raw(src)


DATA_SPOTS = [(0, 4 * K), (5 * M + 100, 1000), (40 * M, 200 * K), (63 * M, 64 * K)]
SPARSE_OPS = [
    *(f"write -P 0x5{i} {off} {n}" for i, (off, n) in enumerate(DATA_SPOTS)),
    "write -P 0 10M 1M",  # allocated in the source, but all zeros
    "write -z 20M 2M",  # zero clusters
]


def _nonzero_clusters(data: bytes, cluster_size: int) -> set[int]:
    zero = bytes(cluster_size)
    return {i for i in range(0, len(data), cluster_size) if data[i : i + cluster_size] != zero}


@pytest.mark.parametrize("src_fmt", ["qed", "raw"])
def test_convert_keeps_zero_regions_unallocated(tmp_path, make_layers, qemu_raw, qemu_check, src_fmt):
    src = make_layers([{"name": f"s.{src_fmt}", "fmt": src_fmt, "size": "64M", "ops": SPARSE_OPS}])
    expected = qemu_raw(src, src_fmt)

    out_qed = tmp_path / "out.qed"
    proc = qednbd("convert", "-O", "qed", src, out_qed)
    assert proc.returncode == 0, proc.stderr
    qemu_check(out_qed)
    assert qemu_raw(out_qed) == expected
    extents = json.loads(qemu_img("map", "--output=json", "-f", "qed", out_qed).stdout)
    data_clusters = {
        pos for e in extents if e["data"] for pos in range(e["start"], e["start"] + e["length"], 64 * K)
    }
    assert data_clusters == _nonzero_clusters(expected, 64 * K)
    assert all(not e["data"] for e in extents if e["start"] < 21 * M and e["start"] + e["length"] > 10 * M)

    out_raw = tmp_path / "out.raw"
    proc = qednbd("convert", "-O", "raw", src, out_raw)
    assert proc.returncode == 0, proc.stderr
    assert out_raw.read_bytes() == expected
    assert out_raw.stat().st_size == 64 * M
    assert out_raw.stat().st_blocks * 512 < 1 * M  # about 340 KiB of data; the rest are holes


def test_convert_progress(tmp_path, make_layers, qemu_raw):
    src = make_layers(SOURCES["qed-chain"])
    out = tmp_path / "out.raw"
    proc = qednbd("convert", "-p", "-O", "raw", src, out)
    assert proc.returncode == 0, proc.stderr
    assert "100.00/100%" in proc.stdout
    assert out.read_bytes() == qemu_raw(src)


def _bad_source(tmp_path: Path, kind: str) -> tuple[list[str], Path]:
    """(extra args, source path) for one kind of bad input."""
    src = tmp_path / "bad.qed"
    if kind == "missing-source":
        return [], tmp_path / "nope.qed"
    if kind == "garbage-as-qed":
        src.write_bytes(b"not an image at all" * 100)
        return ["-f", "qed"], src
    qemu_img("create", "-f", "qed", src, "1M")
    if kind == "bad-cluster-size":
        with open(src, "r+b") as f:
            f.seek(4)
            f.write((12345).to_bytes(4, "little"))
    elif kind == "unsupported-feature":
        with open(src, "r+b") as f:
            f.seek(16)
            f.write((0x100).to_bytes(8, "little"))
    elif kind == "missing-backing":
        qemu_img("create", "-f", "qed", "-b", "gone.raw", "-F", "raw", "-u", src, "1M")
    elif kind == "truncated":
        with open(src, "r+b") as f:
            f.truncate(512)
    return [], src


BAD_INPUTS = [
    "missing-source",
    "garbage-as-qed",
    "bad-cluster-size",
    "unsupported-feature",
    "missing-backing",
    "truncated",
]


@pytest.mark.parametrize("dst_fmt", ["raw", "qed"])
@pytest.mark.parametrize("kind", BAD_INPUTS)
def test_convert_bad_input_fails_with_one_line(tmp_path, kind, dst_fmt):
    args, src = _bad_source(tmp_path, kind)
    assert qemu_img("convert", *args, "-O", "raw", src, tmp_path / "qemu.out", check=False).returncode != 0
    out = tmp_path / "out.img"
    proc = qednbd("convert", *args, "-O", dst_fmt, src, out)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qednbd: "), proc.stderr
    assert "Traceback" not in proc.stderr and "internal error" not in proc.stderr
    assert not out.exists()


def test_convert_to_missing_directory_fails_with_one_line(tmp_path):
    src = tmp_path / "s.qed"
    qemu_img("create", "-f", "qed", src, "1M")
    proc = qednbd("convert", "-O", "raw", src, tmp_path / "no" / "such" / "dir.raw")
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qednbd: "), proc.stderr
