"""``qednbd serve`` against qemu-nbd as the oracle: block status and content of the same image.

Each case builds a QED image (or a chain) with qemu-img/qemu-io, serves it with ``qednbd serve``
and, from a copy in the same directory (so relative backing names resolve alike), with
``qemu-nbd -f qed -t -e 0 -A``; then ``nbdinfo --map``, ``nbdinfo --map=qemu:allocation-depth``,
``qemu-img map -f raw --output=json nbd://...`` and the exported bytes must agree.

Extents are compared after merging neighbours of the same type: how a server splits a run of
equal extents into replies is its own business (NBD allows any split).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
from helpers import qed_layer as qed
from helpers import raw_layer as raw
from helpers import run, stop_process

pytestmark = pytest.mark.interop

M = 1 << 20
LAST = 64 * M - 512  # the last sector of the 64M images

CASES: dict[str, list[dict[str, object]]] = {
    # nbd.md §2: data at 0-1M, a zero range at 8-9M, the rest unallocated.
    "reference": [qed("t.qed", "64M", "write -P 0x11 0 1M", "write -z 8M 1M")],
    "holes-zero-last-sector": [
        qed(
            "t.qed",
            "64M",
            "write -P 0x11 64k 4k",  # a partial write allocates the whole cluster
            "write -z 1M 192k",
            "write -P 0x12 1M 4k",  # data inside a zero range
            "write -P 0x13 5M 1",
            "write -z 20M 64k",
            f"write -P 0x14 {LAST} 512",  # data in the last sector
        )
    ],
    "unaligned-size": [qed("t.qed", "1000000", "write -P 0x11 983040 16960", "write -z 0 64k")],
    "small-clusters": [
        qed(
            "t.qed",
            "16M",
            "write -P 0x11 4186112 16384",
            "write -z 8M 4M",
            "write -P 0x12 12M 512",
            cs="4K",
            ts=2,
        )
    ],
    "raw-backing": [
        raw("b.raw", "64M", "write -P 0xbb 0 2M", "write -P 0xbc 40M 64k", f"write -P 0xbd {LAST} 512"),
        qed(
            "t.qed",
            "64M",
            "write -P 0x11 64k 4k",  # copy-on-write of a backing cluster
            "write -z 1M 64k",  # a zero cluster over backing data
            "write -P 0x12 10M 64k",  # data over a backing hole
            backing="b.raw",
            backing_fmt="raw",
        ),
    ],
    "raw-backing-shorter": [
        raw("b.raw", "3M", "write -P 0xbb 0 3M"),
        qed(
            "t.qed",
            "64M",
            "write -P 0x11 1M 64k",
            f"write -P 0x12 {LAST} 512",
            backing="b.raw",
            backing_fmt="raw",
        ),
    ],
    "qed-backing": [
        qed("b.qed", "64M", "write -P 0xbb 0 4M", "write -z 8M 1M", f"write -P 0xbd {LAST} 512"),
        qed(
            "t.qed",
            "64M",
            "write -P 0x11 1M 64k",
            "write -z 2M 128k",  # zero clusters over backing data
            "write -P 0x12 8M 4k",  # data over a backing zero cluster
            "write -P 0x13 30M 64k",  # data where nothing is below
            backing="b.qed",
            backing_fmt="qed",
        ),
    ],
    "chain-depth-3": [
        raw("b.raw", "8M", "write -P 0xbb 0 8M"),
        qed("m.qed", "16M", "write -P 0xcc 1M 1M", "write -z 4M 64k", backing="b.raw", backing_fmt="raw"),
        qed("t.qed", "64M", "write -P 0x11 1M 64k", "write -z 6M 64k", backing="m.qed", backing_fmt="qed"),
    ],
}


# Where qednbd deliberately differs from qemu-nbd: past the end of a backing file that is shorter
# than the image above it, nothing in the chain holds the data, so qednbd reports allocation depth
# 0 ("absent"), as `qemu-img map` does (present: false) and as docs/serve.md's table says.
# qemu-nbd instead counts the synthesized zeroes as allocated in the short layer (QEMU's
# bdrv_co_common_block_status_above: "zeroes that we synthesize beyond EOF behave as if they were
# allocated at this layer"), so it reports that layer's depth. base:allocation agrees either way
# (hole,zero). Per case: (start, end, depth qemu-nbd reports there) for each range past a short
# backing file's end, in the top image's coordinates.
PAST_BACKING_EOF: dict[str, list[tuple[int, int, int]]] = {
    "raw-backing-shorter": [(3 * M, 64 * M, 2)],
    "chain-depth-3": [(8 * M, 16 * M, 3), (16 * M, 64 * M, 2)],
}


def accepts(path: str) -> bool:
    """Whether something listens on the Unix socket ``path`` (the probe connection is closed at
    once; qemu-nbd -t takes it as a client that left)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except OSError:
            return False
    return True


@contextlib.contextmanager
def qemu_nbd(image: Path, name: str) -> Iterator[str]:
    """Serve ``image`` with qemu-nbd on a Unix socket; yields the export's URI."""
    sock_dir = tempfile.mkdtemp(prefix="qnbd")  # short: a socket path has at most 107 bytes
    sock = os.path.join(sock_dir, "s")
    log = image.with_name(image.name + ".qemu-nbd.log")
    with open(log, "wb") as log_file:
        proc = subprocess.Popen(
            ["qemu-nbd", "-f", "qed", "-t", "-e", "0", "-A", "-x", name, "-k", sock, os.fspath(image)],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 20
        while not accepts(sock):
            assert proc.poll() is None, f"qemu-nbd exited {proc.returncode}: {log.read_text()}"
            assert time.monotonic() < deadline, f"qemu-nbd not listening: {log.read_text()}"
            time.sleep(0.02)
        yield f"nbd+unix:///{name}?socket={sock}"
    finally:
        stop_process(proc)
        shutil.rmtree(sock_dir, ignore_errors=True)


def merged(extents: Sequence[tuple[int, int, str]]) -> list[tuple[int, int, str]]:
    out: list[tuple[int, int, str]] = []
    for offset, length, kind in extents:
        if out and out[-1][2] == kind and out[-1][0] + out[-1][1] == offset:
            out[-1] = (out[-1][0], out[-1][1] + length, kind)
        else:
            out.append((offset, length, kind))
    return out


def absent_past_eof(
    extents: Sequence[tuple[int, int, str]], ranges: Sequence[tuple[int, int, int]]
) -> list[tuple[int, int, str]]:
    """qemu-nbd's allocation-depth map with qednbd's reading of ``PAST_BACKING_EOF`` applied."""
    out = []
    for offset, length, kind in extents:
        pieces = [(offset, offset + length)]
        for start, end, depth in ranges:
            if kind != f"{depth} backing depth {depth}":
                continue
            split = []
            for lo, hi in pieces:
                for a, b in ((lo, min(hi, start)), (max(lo, start), min(hi, end)), (max(lo, end), hi)):
                    if a < b:
                        split.append((a, b))
            pieces = split
        for lo, hi in pieces:
            inside = any(
                start <= lo and hi <= end and kind == f"{depth} backing depth {depth}"
                for start, end, depth in ranges
            )
            out.append((lo, hi - lo, "0 absent" if inside else kind))
    return merged(out)


def nbdinfo_map(uri: str, context: str | None = None) -> list[tuple[int, int, str]]:
    """``nbdinfo --map[=CONTEXT] URI`` as merged (offset, length, "flags description")."""
    opt = "--map" if context is None else f"--map={context}"
    rows = []
    for line in run(["nbdinfo", opt, uri]).stdout.splitlines():
        offset, length, rest = line.split(None, 2)
        rows.append((int(offset), int(length), " ".join(rest.split())))
    return merged(rows)


def qemu_img_map(uri: str) -> list[dict[str, object]]:
    return json.loads(run(["qemu-img", "map", "-f", "raw", "--output=json", uri]).stdout)


def content_sha256(uri: str, scratch: Path) -> str:
    target = scratch / "content.raw"
    run(["nbdcopy", uri, os.fspath(target)])
    digest = hashlib.sha256(target.read_bytes()).hexdigest()
    target.unlink()
    return digest


@pytest.mark.parametrize("case", list(CASES))
def test_block_status_and_content_match_qemu_nbd(
    case: str,
    tmp_path: Path,
    make_layers: Callable[[Sequence[dict[str, object]]], Path],
    nbd_server,  # type: ignore[no-untyped-def]
) -> None:
    top = make_layers(CASES[case])
    oracle_copy = top.with_name("oracle-" + top.name)
    shutil.copyfile(top, oracle_copy)
    ours = nbd_server(top, "-x", "disk")
    with qemu_nbd(oracle_copy, "disk") as theirs:
        uri = ours.uri("disk")
        for context in (None, "base:allocation", "qemu:allocation-depth"):
            expected = nbdinfo_map(theirs, context)
            if context == "qemu:allocation-depth":
                expected = absent_past_eof(expected, PAST_BACKING_EOF.get(case, []))
            got = nbdinfo_map(uri, context)
            assert got == expected, f"{context}:\nqednbd:   {got}\nqemu-nbd: {expected}"
        assert qemu_img_map(uri) == qemu_img_map(theirs)
        assert run(["nbdinfo", "--size", uri]).stdout == run(["nbdinfo", "--size", theirs]).stdout
        assert content_sha256(uri, tmp_path) == content_sha256(theirs, tmp_path)


def test_reference_map_literally(
    make_layers: Callable[[Sequence[dict[str, object]]], Path],
    nbd_server,  # type: ignore[no-untyped-def]
) -> None:
    """nbd.md §2 spelled out: zero clusters are hole,zero in base:allocation but local in depth."""
    top = make_layers(CASES["reference"])
    uri = nbd_server(top).uri()
    assert nbdinfo_map(uri) == [(0, M, "0 data"), (M, 63 * M, "3 hole,zero")]
    assert nbdinfo_map(uri, "qemu:allocation-depth") == [
        (0, M, "1 local"),
        (M, 7 * M, "0 absent"),
        (8 * M, M, "1 local"),
        (9 * M, 55 * M, "0 absent"),
    ]
    assert qemu_img_map(uri) == [
        {"start": 0, "length": M, "depth": 0, "present": True, "zero": False, "data": True, "offset": 0},
        {"start": M, "length": 63 * M, "depth": 0, "present": True, "zero": True, "data": False, "offset": M},
    ]


def test_nbdinfo_json_matches_qemu_nbd(
    make_layers: Callable[[Sequence[dict[str, object]]], Path],
    nbd_server,  # type: ignore[no-untyped-def]
) -> None:
    top = make_layers(CASES["reference"])
    oracle_copy = top.with_name("oracle-" + top.name)
    shutil.copyfile(top, oracle_copy)
    ours = nbd_server(top, "-x", "disk", unix=True)
    with qemu_nbd(oracle_copy, "disk") as theirs:
        docs = [json.loads(run(["nbdinfo", "--json", uri]).stdout) for uri in (ours.uri("disk"), theirs)]
    for doc in docs:
        del doc["exports"][0]["uri"]
    # Deliberate: qednbd's minimum block size is 1 (it serves byte-granular requests itself,
    # sparing clients a read-modify-write); qemu-nbd's is 512.
    assert docs[0]["exports"][0].pop("block_size_minimum") == 1
    assert docs[1]["exports"][0].pop("block_size_minimum") == 512
    assert docs[0] == docs[1]
