"""The ``qednbd`` command line: sizes, usage errors, create's rounding, one-line failures."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from helpers import qednbd

from qednbd import __version__
from qednbd.cli import parse_create_options, parse_size
from qednbd.errors import ConfigError

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40


@pytest.mark.parametrize(
    "text, expected",
    [
        ("0", 0),
        ("512", 512),
        ("100000", 100000),
        ("1k", KiB),
        ("1K", KiB),
        ("4k", 4 * KiB),
        ("64K", 64 * KiB),
        ("1m", MiB),
        ("1M", MiB),
        ("10M", 10 * MiB),
        ("1g", GiB),
        ("1G", GiB),
        ("1.5G", GiB + GiB // 2),
        ("0.5K", 512),
        ("1t", TiB),
        ("1T", TiB),
        ("2T", 2 * TiB),
    ],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    "text", ["", "abc", "1X", "-1", "1.5", "0.3K", "K", "1 2", "1KK", "0x100", "8E", "99999999999T"]
)
def test_parse_size_rejects(text):
    with pytest.raises(ConfigError) as info:
        parse_size(text)
    assert "\n" not in str(info.value)


def test_parse_create_options():
    assert parse_create_options(None) == {}
    assert parse_create_options("cluster_size=4k,table_size=16") == {"cluster_size": 4096, "table_size": 16}
    for bad in ("table_size=x", "frobnicate=1", "cluster_size=huge"):
        with pytest.raises(ConfigError):
            parse_create_options(bad)


def assert_one_line_error(proc, subject: object | None = None) -> str:
    output = proc.stdout + proc.stderr
    assert "Traceback" not in output, output
    assert proc.returncode == 1, (proc.args, proc.returncode, output)
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    if subject is not None:
        assert lines[0].startswith(f"qednbd: {subject}: "), lines[0]
    return lines[0]


@pytest.mark.parametrize(
    "args",
    [
        (),
        ("frobnicate",),
        ("info",),
        ("map",),
        ("convert", "only-one"),
        ("create",),
        ("info", "--output", "xml", "x.qed"),
        ("create", "-f", "qcow2", "x.qed", "1M"),
        ("convert", "-O", "vmdk", "a", "b"),
        ("rebase", "x.qed"),
        ("--no-such-flag",),
    ],
    ids=lambda a: " ".join(a) or "no-args",
)
def test_bad_arguments_exit_1_with_usage(args, tmp_path):
    proc = qednbd(*args)
    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    assert "usage: qednbd" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""


def test_version():
    proc = qednbd("--version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"qednbd {__version__}"


def read_header(path: Path) -> tuple[int, ...]:
    with open(path, "rb") as f:
        return struct.unpack("<IIIIQQQQQII", f.read(64))


@pytest.mark.parametrize(
    "size, expected", [("1000", 1024), ("100000", 100352), ("512", 512), ("1", 512), ("0", 0), ("1M", MiB)]
)
def test_create_rounds_size_up_to_512(size, expected, tmp_path):
    path = tmp_path / "t.qed"
    proc = qednbd("create", path, size)
    assert proc.returncode == 0, proc.stderr
    assert read_header(path)[8] == expected  # image_size
    assert path.stat().st_size == 5 * 65536  # (1 + table_size) * cluster_size


def test_create_with_options_writes_the_geometry(tmp_path):
    path = tmp_path / "t.qed"
    proc = qednbd("create", "-o", "cluster_size=4k,table_size=16", path, "100000")
    assert proc.returncode == 0, proc.stderr
    magic, cs, ts, hs, features, compat, autoclear, l1, size, bfo, bfs = read_header(path)
    assert (magic, cs, ts, hs, l1, size) == (0x00444551, 4096, 16, 1, 4096, 100352)
    assert (features, compat, autoclear, bfo, bfs) == (0, 0, 0, 0, 0)
    assert path.stat().st_size == 17 * 4096


@pytest.mark.parametrize(
    "options, message",
    [
        ("cluster_size=3000", "QED cluster size must be within range [4096, 67108864] and power of 2"),
        ("cluster_size=128M", "QED cluster size must be within range [4096, 67108864] and power of 2"),
        ("table_size=3", "QED table size must be within range [1, 16] and power of 2"),
        ("table_size=32", "QED table size must be within range [1, 16] and power of 2"),
    ],
)
def test_create_refuses_bad_geometry_with_qemu_wording(options, message, tmp_path):
    path = tmp_path / "t.qed"
    line = assert_one_line_error(qednbd("create", "-o", options, path, "1M"), path)
    assert line.endswith(message)
    assert not path.exists()


def test_create_backing_without_format_is_refused(tmp_path):
    (tmp_path / "base.raw").write_bytes(bytes(MiB))
    path = tmp_path / "t.qed"
    line = assert_one_line_error(qednbd("create", "-b", tmp_path / "base.raw", path, "1M"), path)
    assert "backing format" in line
    assert not path.exists()


def test_create_without_size_or_backing_is_refused(tmp_path):
    path = tmp_path / "t.qed"
    assert_one_line_error(qednbd("create", path), path)
    assert not path.exists()


def test_create_with_an_invalid_size_is_one_line(tmp_path):
    path = tmp_path / "t.qed"
    line = assert_one_line_error(qednbd("create", path, "1Q"), path)
    assert "1Q" in line
    assert not path.exists()


@pytest.mark.parametrize(
    "args",
    [
        ("info", "{f}"),
        ("info", "--output=json", "{f}"),
        ("map", "{f}"),
        ("map", "--output=json", "{f}"),
        ("convert", "-O", "raw", "{f}", "{out}"),
        ("convert", "-O", "qed", "{f}", "{out}"),
        ("resize", "{f}", "2M"),
        ("rebase", "-u", "-b", "", "{f}"),
    ],
    ids=lambda a: " ".join(a),
)
def test_nonexistent_file_is_one_line(args, tmp_path):
    missing = tmp_path / "no-such-dir" / "x.qed"
    out = tmp_path / "out.img"
    argv = [a.format(f=missing, out=out) for a in args]
    proc = qednbd(*argv)
    line = assert_one_line_error(proc, missing)
    assert "No such file or directory" in line
    assert proc.stdout == ""
    assert not out.exists()


def test_directory_instead_of_an_image_is_one_line(tmp_path):
    for command in ("info", "map"):
        assert_one_line_error(qednbd(command, tmp_path), tmp_path)


def test_non_qed_file_is_one_line(tmp_path):
    path = tmp_path / "x.raw"
    path.write_bytes(b"not an image" * 100)
    for command in ("info", "map"):
        line = assert_one_line_error(qednbd(command, path), path)
        assert line.endswith("Image not in QED format")
