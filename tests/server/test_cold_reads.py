"""Reads of data the page cache does not hold (they go to a worker thread) return the right bytes,
and so do the same reads warm (inline): small reads inside a cluster, across clusters, large reads."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
from helpers import evict_page_cache, qemu_img, run

CHECK = r"""
import json, sys, nbd
uri, raw, ranges = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
h = nbd.NBD(); h.connect_uri(uri)
with open(raw, "rb") as f:
    for pos, length in ranges:
        f.seek(pos)
        if h.pread(length, pos) != f.read(length):
            sys.exit(f"wrong data at {pos}+{length}")
print("ok", len(ranges))
"""


@pytest.mark.interop
def test_cold_and_warm_reads(tmp_path: Path, nbd_server) -> None:  # type: ignore[no-untyped-def]
    raw = tmp_path / "src.raw"
    raw.write_bytes(os.urandom(12 << 20) + bytes(4 << 20))
    image = tmp_path / "cold.qed"
    qemu_img("convert", "-f", "raw", "-O", "qed", raw, image)
    server = nbd_server(image, "-r", unix=True)
    rng = random.Random(7)
    ranges = [
        (rng.randrange(16 << 20) // 512 * 512 + rng.randrange(512), rng.choice([1, 100, 3000, 4096]))
        for _ in range(200)
    ]  # inside one cluster, at odd offsets
    ranges += [((i << 20) + 60 * 1024, 8192) for i in range(16)]  # across a cluster boundary
    ranges += [(3 << 20, 1 << 20), (11 << 20, 2 << 20), (0, 8 << 20)]  # large: inline and on a worker
    ranges = [(pos, min(length, (16 << 20) - pos)) for pos, length in ranges]
    for _ in range(2):  # cold, then warm
        evict_page_cache(image)
        out = run(["/usr/bin/python3", "-c", CHECK, server.uri(), str(raw), json.dumps(ranges)]).stdout
        assert out.split() == ["ok", str(len(ranges))]
