"""R4 and qed.md §7: ``qednbd map`` and ``qednbd info`` print what qemu-img prints.

Images are built with qemu-img/qemu-io. Both tools run from the images' directory on the
same relative file name, so file names in the output (``filename``, backing names, the
human map's File column) must match exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import qed_layer as qed
from helpers import qednbd, qemu_img, qemu_io, read_features
from helpers import raw_layer as raw

from qednbd.qed.image import QedImage, create_image

pytestmark = pytest.mark.interop

K, M = 1 << 10, 1 << 20


MAP_CASES: dict[str, list[dict[str, object]]] = {
    "unallocated": [qed("t.qed", "4M")],
    "size-0": [qed("t.qed", "0")],
    "data": [qed("t.qed", "4M", "write -P 0x11 0 192k", "write -P 0x12 1M 64k", "write -P 0x13 128k 64k")],
    "zero-clusters": [qed("t.qed", "4M", "write -z 0 64k", "write -z 1M 256k", "write -P 0x11 1M 4k")],
    "mixed": [
        qed(
            "t.qed",
            "8M",
            "write -P 0x11 0 64k",
            "write -z 64k 128k",
            "write -P 0x12 512k 1M",
            "write -z 600k 64k",  # zeroes data in place: still data
            "write -P 0x13 4M 1",
            "write -P 0x14 256k 64k",
        )
    ],
    "unaligned-size": [qed("t.qed", "1000000", "write -P 0x11 983040 17408", "write -z 0 64k")],
    "l2-boundaries-4K-2": [
        qed("t.qed", "16M", "write -P 0x11 4186112 16384", "write -z 8M 8M", cs="4K", ts=2),
    ],
    "raw-backing-dense-shorter": [
        raw("b.raw", "2M", "write -P 0xbb 0 2M"),
        qed("t.qed", "4M", "write -P 0x11 64k 4k", "write -z 1M 64k", backing="b.raw", backing_fmt="raw"),
    ],
    "raw-backing-sparse": [
        raw("b.raw", "4M", "write -P 0xbb 64k 64k", "write -P 0xbc 3M 4k"),
        qed("t.qed", "4M", "write -P 0x11 1M 64k", backing="b.raw", backing_fmt="raw"),
    ],
    "raw-backing-odd-length": [
        raw("b.raw", "1000000", "write -P 0xbb 0 1000000"),
        qed("t.qed", "4M", "write -P 0x11 0 4k", backing="b.raw", backing_fmt="raw"),
    ],
    "qed-backing-depth-2": [
        raw("b.raw", "3M", "write -P 0xbb 0 1M"),
        qed("m.qed", "4M", "write -P 0xcc 64k 128k", "write -z 1M 64k", backing="b.raw", backing_fmt="raw"),
        qed("t.qed", "4M", "write -P 0xdd 128k 64k", "write -z 2M 64k", backing="m.qed", backing_fmt="qed"),
    ],
    "qed-chain-all-qed": [
        qed("b.qed", "2M", "write -P 0xbb 0 1M", "write -z 1M 64k", cs="4K", ts=16),
        qed("m.qed", "3M", "write -P 0xcc 512k 4k", backing="b.qed", backing_fmt="qed"),
        qed("t.qed", "4M", "write -P 0xdd 0 4k", backing="m.qed", backing_fmt="qed"),
    ],
    "subdir-backing": [
        raw("b.raw", "1M", "write -P 0xbb 0 512k"),
        qed("sub/t.qed", "2M", "write -P 0x11 0 4k", backing="../b.raw", backing_fmt="raw"),
    ],
}


def _top_name(case: list[dict[str, object]]) -> str:
    return str(case[-1]["name"])


@pytest.mark.parametrize("name", list(MAP_CASES))
def test_map_json_matches_qemu_img(tmp_path, monkeypatch, make_layers, name):
    make_layers(MAP_CASES[name])
    monkeypatch.chdir(tmp_path)
    top = _top_name(MAP_CASES[name])
    expected = json.loads(qemu_img("map", "--output=json", "-f", "qed", top).stdout)
    proc = qednbd("map", "--output=json", top)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == expected


@pytest.mark.parametrize("name", list(MAP_CASES))
def test_map_human_matches_qemu_img(tmp_path, monkeypatch, make_layers, name):
    make_layers(MAP_CASES[name])
    monkeypatch.chdir(tmp_path)
    top = _top_name(MAP_CASES[name])
    expected = qemu_img("map", "-f", "qed", top).stdout
    proc = qednbd("map", top)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == expected


INFO_CASES: dict[str, list[dict[str, object]]] = {
    "plain": [qed("t.qed", "4M", "write -P 0x11 0 64k")],
    "unaligned-size-4K-16": [qed("t.qed", "100000", cs="4K", ts=16)],
    "size-0": [qed("t.qed", "0")],
    "raw-backing": [raw("b.raw", "1M"), qed("t.qed", "4M", backing="b.raw", backing_fmt="raw")],
    "qed-backing": [qed("b.qed", "1M"), qed("t.qed", "4M", backing="b.qed", backing_fmt="qed")],
    "subdir-relative-backing": [
        raw("b.raw", "1M"),
        qed("sub/t.qed", "4M", backing="../b.raw", backing_fmt="raw"),
    ],
    "missing-backing": [  # info does not open the backing file
        raw("gone.raw", "1M"),
        qed("t.qed", "1M", backing="gone.raw", backing_fmt="raw"),
    ],
}


def _prepare_info(tmp_path: Path, monkeypatch, make_layers, name: str) -> str:
    make_layers(INFO_CASES[name])
    if name == "missing-backing":
        (tmp_path / "gone.raw").unlink()
    monkeypatch.chdir(tmp_path)
    return _top_name(INFO_CASES[name])


@pytest.mark.parametrize("name", list(INFO_CASES))
def test_info_json_matches_qemu_img(tmp_path, monkeypatch, make_layers, name):
    top = _prepare_info(tmp_path, monkeypatch, make_layers, name)
    expected = json.loads(qemu_img("info", "--output=json", "-f", "qed", top).stdout)
    proc = qednbd("info", "--output=json", top)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert isinstance(got.pop("actual-size"), int)
    expected.pop("actual-size")
    assert got == expected


def test_info_json_absolute_backing_name(tmp_path):
    base = tmp_path / "b.raw"
    base.write_bytes(bytes(512))
    top = tmp_path / "t.qed"
    qemu_img("create", "-f", "qed", "-b", base, "-F", "raw", top, "1M")
    expected = json.loads(qemu_img("info", "--output=json", "-f", "qed", top).stdout)
    got = json.loads(qednbd("info", "--output=json", top).stdout)
    got.pop("actual-size")
    expected.pop("actual-size")
    assert got == expected


HUMAN_PREFIXES = ("virtual size:", "cluster_size:", "backing file:", "backing file format:")


@pytest.mark.parametrize("name", list(INFO_CASES))
def test_info_human_lines_match_qemu_img(tmp_path, monkeypatch, make_layers, name):
    top = _prepare_info(tmp_path, monkeypatch, make_layers, name)

    def lines(text: str) -> list[str]:
        return [line for line in text.splitlines() if line.startswith(HUMAN_PREFIXES)]

    expected = lines(qemu_img("info", "-f", "qed", top).stdout)
    proc = qednbd("info", top)
    assert proc.returncode == 0, proc.stderr
    assert lines(proc.stdout) == expected
    assert any(line.startswith("virtual size:") for line in expected)


def test_info_dirty_flag_of_need_check_image(tmp_path, monkeypatch):
    """qemu-img info says ``dirty-flag: false`` for a NEED_CHECK QED image (qed.md §6.2); we say true.

    Every other key (but actual-size) matches.
    """
    monkeypatch.chdir(tmp_path)
    qemu_img("create", "-f", "qed", "t.qed", "1M")
    qemu_io("t.qed", "write 0 4k", "abort", check=False)
    assert read_features(tmp_path / "t.qed") & 0x2
    expected = json.loads(qemu_img("info", "--output=json", "-f", "qed", "t.qed").stdout)
    proc = qednbd("info", "--output=json", "t.qed")
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert expected["dirty-flag"] is False
    assert got["dirty-flag"] is True
    for d in (got, expected):
        d.pop("actual-size")
        d.pop("dirty-flag")
    assert got == expected
    assert read_features(tmp_path / "t.qed") & 0x2  # info (read-only) leaves the bit on disk


def test_engine_zero_clusters_show_as_zero_in_qemu_map(tmp_path, monkeypatch):
    """R4 the other way: zero clusters our engine writes are L2 entries of 1, mapped zero by QEMU."""
    monkeypatch.chdir(tmp_path)
    create_image("t.qed", 4 * M)
    with QedImage.open("t.qed") as image:
        image.write(0, b"\x11" * (128 * K))
        image.write_zeroes(64 * K, 128 * K)  # one data cluster zeroed in place, one new zero cluster
        l2_offset = image.l1[0]
    expected = json.loads(qemu_img("map", "--output=json", "-f", "qed", "t.qed").stdout)
    zero_extent = {"start": 131072, "length": 65536, "depth": 0, "present": True, "zero": True, "data": False}
    assert zero_extent in expected
    assert json.loads(qednbd("map", "--output=json", "t.qed").stdout) == expected
    with open("t.qed", "rb") as f:
        f.seek(l2_offset)
        entries = [int.from_bytes(f.read(8), "little") for _ in range(3)]
    assert entries[2] == 1
    assert entries[0] > 1 and entries[1] == entries[0] + 64 * K  # zeroed in place: offset kept
