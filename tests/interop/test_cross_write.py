"""Cross-write: images written by our engine are read correctly by QEMU.

Each seeded op sequence is applied through ``QedImage`` and to a bytearray model. Then:

* ``qemu-img check`` exits 0;
* ``qemu-io -c 'read -P <byte> off len'`` verifies every run of equal bytes of the model
  (so every written region, and the zeros and backing bytes around them);
* ``qemu-img compare -f raw -F qed ref.raw my.qed`` exits 0, ref.raw being the model.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from helpers import qemu_img, qemu_io, read_features

from qednbd.qed.image import QedImage, create_image

pytestmark = pytest.mark.interop

K, M = 1 << 10, 1 << 20


def _random_ops(rng: random.Random, size: int, cluster_size: int, n_ops: int) -> list[tuple[str, int, int]]:
    """(kind, offset, length) with kind 'write' or 'zero'; offsets aligned or not, lengths varied."""
    ops: list[tuple[str, int, int]] = []
    for _ in range(n_ops):
        align = rng.choice([cluster_size, 512, 1])
        length = rng.choice(
            [
                rng.randint(1, 512),
                rng.randint(1, 3) * cluster_size,
                rng.randint(1, 3 * cluster_size),
                rng.randint(1, min(size, 1 * M)),
            ]
        )
        length = min(length, size)
        offset = rng.randrange(0, size - length + 1)
        offset -= offset % align
        kind = "zero" if rng.random() < 0.3 else "write"
        ops.append((kind, offset, length))
    return ops


def _pattern_for(index: int) -> int:
    return 1 + index % 254  # never 0, so a lost write cannot pass as zeros


def _apply(path: Path, model: bytearray, ops: list[tuple[str, int, int]]) -> None:
    """Apply the ops through the engine (closing and reopening half way) and to the model."""
    half = len(ops) // 2
    for chunk_start, chunk in ((0, ops[:half]), (half, ops[half:])):
        with QedImage.open(str(path)) as image:
            for i, (kind, offset, length) in enumerate(chunk, chunk_start):
                if kind == "write":
                    data = bytes([_pattern_for(i)]) * length
                    image.write(offset, data)
                    model[offset : offset + length] = data
                else:
                    image.write_zeroes(offset, length)
                    model[offset : offset + length] = bytes(length)


def _runs(model: bytes) -> list[tuple[int, int, int]]:
    """Maximal runs of one byte value: (offset, length, value)."""
    out: list[tuple[int, int, int]] = []
    pos = 0
    while pos < len(model):
        value = model[pos]
        end = pos + 1
        # jump in big steps over long uniform stretches
        step = 65536
        while end + step <= len(model) and model[end : end + step] == bytes([value]) * step:
            end += step
        while end < len(model) and model[end] == value:
            end += 1
        out.append((pos, end - pos, value))
        pos = end
    return out


def verify_with_qemu(tmp_path: Path, image: Path, model: bytes) -> None:
    proc = qemu_img("check", "-f", "qed", image, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert read_features(image) & 0x2 == 0

    runs = _runs(model)
    for first in range(0, len(runs), 200):  # keep each command line modest
        batch = runs[first : first + 200]
        out = qemu_io(image, *(f"read -P {v:#x} {o} {n}" for o, n, v in batch), check=False)
        text = out.stdout + out.stderr
        assert "Pattern verification failed" not in text, text
        assert out.returncode == 0, text
        assert text.count("read ") == len(batch), text

    ref = tmp_path / "ref.raw"
    ref.write_bytes(model)
    cmp = qemu_img("compare", "-f", "raw", "-F", "qed", ref, image, check=False)
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr


GEOMETRIES = {
    "64K-4": (64 * K, 4, 8 * M),
    "4K-16": (4 * K, 16, 4 * M),
    "4K-2": (4 * K, 2, 12 * M),
    "64K-16-unaligned-size": (64 * K, 16, 1000448),
}


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("geometry", list(GEOMETRIES))
def test_engine_writes_qemu_reads(tmp_path, geometry, seed):
    cluster_size, table_size, size = GEOMETRIES[geometry]
    path = tmp_path / "my.qed"
    create_image(str(path), size, cluster_size=cluster_size, table_size=table_size)
    model = bytearray(size)
    ops = _random_ops(random.Random(seed), size, cluster_size, 40)
    _apply(path, model, ops)
    verify_with_qemu(tmp_path, path, bytes(model))


BACKINGS = ["raw-dense", "raw-short", "qed"]


@pytest.mark.parametrize("seed", [11, 12])
@pytest.mark.parametrize("backing", BACKINGS)
def test_engine_writes_over_backing_qemu_reads(tmp_path, qemu_raw, backing, seed):
    """COW from raw and QED backing files (R5, R7), including a backing shorter than the image."""
    size = 4 * M
    cluster_size = 4 * K if backing == "raw-short" else 64 * K
    if backing == "qed":
        base = tmp_path / "b.qed"
        qemu_img("create", "-f", "qed", base, "3M")
        qemu_io(base, "write -P 0xb1 0 1M", "write -P 0xb2 2M 64k", "write -z 1M 128k")
        base_fmt = "qed"
        content = qemu_raw(base)
    else:
        base = tmp_path / "b.raw"
        content = b"\xbb" * (3 * M + 100) if backing == "raw-dense" else b"\xbb" * 6144
        base.write_bytes(content)
        base_fmt = "raw"
    model = bytearray(size)
    model[: len(content)] = content
    path = tmp_path / "my.qed"
    create_image(
        str(path),
        size,
        cluster_size=cluster_size,
        table_size=4,
        backing_file=base.name,
        backing_format=base_fmt,
    )
    ops = _random_ops(random.Random(seed), size, cluster_size, 30)
    _apply(path, model, ops)
    verify_with_qemu(tmp_path, path, bytes(model))


def test_trim_keeps_image_consistent(tmp_path):
    """trim punches whole data clusters and keeps their entries: check stays clean, they read zeros."""
    path = tmp_path / "my.qed"
    create_image(str(path), 4 * M)
    with QedImage.open(str(path)) as image:
        image.write(0, b"\x11" * (512 * K))
    before = qemu_img("map", "--output=json", "-f", "qed", path).stdout
    with QedImage.open(str(path)) as image:
        image.trim(100 * K, 300 * K)  # whole clusters 128k..384k
    model = bytearray(b"\x11" * (512 * K) + bytes(4 * M - 512 * K))
    model[128 * K : 384 * K] = bytes(256 * K)
    verify_with_qemu(tmp_path, path, bytes(model))
    after = json.loads(qemu_img("map", "--output=json", "-f", "qed", path).stdout)
    assert after == json.loads(before)  # every entry still points where it did


def _qemu_check_false_leaks(file_length: int, cluster_size: int) -> int:
    """Leaks qemu-img check reports on a leak-free image because it divides by cs−1 (qed.md §6.3)."""
    rounded = -(-file_length // cluster_size) * cluster_size
    n_clusters_qemu = rounded // (cluster_size - 1)
    return max(0, n_clusters_qemu - file_length // cluster_size)


def test_long_allocating_write_no_divisor_bug(tmp_path):
    """QEMU bug 3 (qed.md §9): ``qed_bytes_to_clusters`` divides by cluster_size − 1.

    On a 4K/16 image whose cluster 4095 holds data, one write covering clusters 0..4094
    makes QEMU allocate 4096 clusters and overwrite L2[4095] with a cluster it never
    writes: the old data leaks and reading cluster 4095 fails (qemu-img check: 1
    corruption, 2 leaks). Our engine allocates exactly 4095 clusters and keeps L2[4095].

    qemu-img check still reports one leaked cluster on our image: its leak scan has the
    same divisor and counts one cluster index past the end of any file longer than about
    cs−1 clusters (§6.3, "false leaks"). We assert exactly that many, no corruptions, and
    that the file length accounts for every cluster (header, L1, L2, 4096 data clusters).
    """
    cs = 4 * K
    path = tmp_path / "my.qed"
    create_image(str(path), 32 * M, cluster_size=cs, table_size=16)
    last = 4095 * cs
    with QedImage.open(str(path)) as image:
        image.write(last, b"\x77" * cs)
    first_map = json.loads(qemu_img("map", "--output=json", "-f", "qed", path).stdout)
    old_offset = next(e["offset"] for e in first_map if e["start"] == last)
    with QedImage.open(str(path)) as image:
        image.write(0, b"\x66" * last)

    length = path.stat().st_size
    assert length == (1 + 16 + 16 + 4096) * cs  # header, L1, one L2, data: nothing leaked
    proc = qemu_img("check", "--output=json", "-f", "qed", path, check=False)
    report = json.loads(proc.stdout)
    assert report.get("corruptions", 0) == 0, report
    assert report["check-errors"] == 0, report
    assert report.get("leaks", 0) == _qemu_check_false_leaks(length, cs) == 1, report
    assert proc.returncode == 3, proc.stdout

    out = qemu_io(path, f"read -P 0x66 0 {last}", f"read -P 0x77 {last} {cs}", f"read -P 0 {last + cs} 64k")
    assert "Pattern verification failed" not in out.stdout + out.stderr
    assert (out.stdout + out.stderr).count("read ") == 3
    new_map = json.loads(qemu_img("map", "--output=json", "-f", "qed", path).stdout)
    assert next(e["offset"] for e in new_map if e["start"] == last) == old_offset
    model = b"\x66" * last + b"\x77" * cs + bytes(32 * M - last - cs)
    ref = tmp_path / "ref.raw"
    ref.write_bytes(model)
    assert qemu_img("compare", "-f", "raw", "-F", "qed", ref, path, check=False).returncode == 0


def test_partial_write_into_zero_cluster_over_backing(tmp_path):
    """QEMU bug 4 (qed.md §4.6 and §9): a partial write into a ZERO cluster copies the rest
    of the cluster from the backing file, so zeroed data reappears. We fill with zeros.

    Same ops on two copies of one overlay of a 0xBB raw backing: ``write -z 0 64k`` then
    ``write -P 0x11 0 4k``. The engine's image reads 0x11 then zeros in 4k..64k; the
    qemu-io image reads 0xBB there. Both images pass qemu-img check.
    """
    base = tmp_path / "b.raw"
    base.write_bytes(b"\xbb" * M)
    fresh = tmp_path / "fresh.qed"
    qemu_img("create", "-f", "qed", "-b", "b.raw", "-F", "raw", fresh, "1M")
    theirs, ours = tmp_path / "qemu.qed", tmp_path / "engine.qed"
    theirs.write_bytes(fresh.read_bytes())
    ours.write_bytes(fresh.read_bytes())
    qemu_io(theirs, "write -z 0 64k", "write -P 0x11 0 4k")
    with QedImage.open(str(ours)) as image:
        image.write_zeroes(0, 64 * K)
        image.write(0, b"\x11" * 4 * K)

    for path in (theirs, ours):
        assert qemu_img("check", "-f", "qed", path, check=False).returncode == 0

    with QedImage.open(str(ours), read_only=True) as image:
        assert image.read(0, 64 * K) == b"\x11" * 4 * K + bytes(60 * K)
        assert image.read(64 * K, 64 * K) == b"\xbb" * 64 * K
    mine = qemu_io(ours, "read -P 0x11 0 4k", "read -P 0 4k 60k", "read -P 0xbb 64k 64k", check=False)
    assert "Pattern verification failed" not in mine.stdout + mine.stderr, mine.stdout
    assert mine.stdout.count("read ") == 3

    qemus = qemu_io(theirs, "read -P 0x11 0 4k", "read -P 0xbb 4k 60k", check=False)
    assert "Pattern verification failed" not in qemus.stdout + qemus.stderr, qemus.stdout
    assert qemus.stdout.count("read ") == 2
