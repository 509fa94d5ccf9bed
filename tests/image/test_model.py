"""``QedImage`` against a bytearray model, driven by a hypothesis state machine.

Each example creates a fresh image (cluster 4K or 64K, table size 1, 2 or 4, a size that
is a multiple of 512 but often not of the cluster) and applies random writes, zero
writes, trims, reads, flushes, grows and reopens, comparing every read with the model.
A trim may turn each whole trimmed cluster into zeros or leave it as it was — nothing
else; the model then follows what was read. At the end the image is closed, its
NEED_CHECK bit must be clear, and — where QEMU can open the geometry — ``qemu-img check``
must pass and ``qemu-img convert -O raw`` must produce exactly the model.

The backing-file variant starts from a raw backing file of random bytes (shorter or
longer than the image); the model starts as the backing bytes, zeros past its end.
"""

from __future__ import annotations

import functools
import os
import random
import shutil
import tempfile
from collections.abc import Callable
from typing import Any

import pytest
from helpers import qemu_img, read_features
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from qednbd.errors import ImageError
from qednbd.qed.format import F_NEED_CHECK, qemu_can_open
from qednbd.qed.image import Kind, QedImage, create_image

KiB, MiB = 1 << 10, 1 << 20
MAX_SIZE = 6 * MiB  # images never grow beyond this, to keep examples cheap
BACKING_NAME = "base.raw"


def _step(f: Callable[..., None]) -> Callable[..., None]:
    """Mark the machine as mid-step until ``f`` returns, so teardown can tell a failed step."""

    @functools.wraps(f)
    def wrapper(self: ImageModel, *args: Any, **kwargs: Any) -> None:
        self.mid_step = True
        f(self, *args, **kwargs)
        self.mid_step = False

    return wrapper


def _pattern(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


class ImageModel(RuleBasedStateMachine):
    """A fresh QED image without a backing file, and the bytes it must hold."""

    with_backing = False

    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="qed-model-")
        self.path = os.path.join(self.dir, "img.qed")
        self.image: QedImage | None = None
        self.model = bytearray()
        self.backing = b""
        self.cluster_size = 0
        self.table_size = 0
        self.mid_step = False  # a step raised: teardown only cleans up

    # -- set-up ---------------------------------------------------------------------

    @initialize(
        cluster_size=st.sampled_from([4 * KiB, 64 * KiB]),
        table_size=st.sampled_from([1, 2, 4]),
        size=st.one_of(
            st.integers(0, 4 * MiB // 512).map(lambda n: n * 512),
            st.integers(1, 64).map(lambda n: n * 64 * KiB),  # cluster aligned
            st.just(0),
        ),
        backing_length=st.integers(0, 5 * MiB),
        backing_seed=st.integers(0, 2**32),
    )
    @_step
    def create(
        self, cluster_size: int, table_size: int, size: int, backing_length: int, backing_seed: int
    ) -> None:
        self.cluster_size, self.table_size = cluster_size, table_size
        if self.with_backing:
            self.backing = _pattern(backing_seed, backing_length)
            with open(os.path.join(self.dir, BACKING_NAME), "wb") as f:
                f.write(self.backing)
            create_image(
                self.path,
                size,
                cluster_size=cluster_size,
                table_size=table_size,
                backing_file=BACKING_NAME,
                backing_format="raw",
            )
        else:
            create_image(self.path, size, cluster_size=cluster_size, table_size=table_size)
        self.model = bytearray(self._initial_bytes(0, size))
        self.image = QedImage.open(self.path)
        assert self.image.size == size

    def _initial_bytes(self, start: int, end: int) -> bytes:
        """What never-written guest bytes [start, end) read as: backing, then zeros."""
        chunk = self.backing[start:end]
        return chunk + bytes(end - start - len(chunk))

    @property
    def img(self) -> QedImage:
        assert self.image is not None
        return self.image

    @property
    def size(self) -> int:
        return len(self.model)

    def _range(self, data: st.DataObject, max_len: int) -> tuple[int, int]:
        pos = data.draw(st.integers(0, self.size - 1), label="pos")
        length = data.draw(st.integers(1, min(self.size - pos, max_len)), label="length")
        return pos, length

    # -- rules ----------------------------------------------------------------------

    @precondition(lambda self: self.size > 0)
    @rule(data=st.data(), seed=st.integers(0, 2**32))
    @_step
    def write(self, data: st.DataObject, seed: int) -> None:
        pos, length = self._range(data, 3 * self.cluster_size + 4 * KiB)
        payload = _pattern(seed, length)
        self.img.write(pos, payload)
        self.model[pos : pos + length] = payload

    @precondition(lambda self: self.size > 0)
    @rule(data=st.data(), seed=st.integers(0, 2**32))
    @_step
    def big_write(self, data: st.DataObject, seed: int) -> None:
        """Longer than 1 MiB: allocations take the chunked copy-on-write path."""
        pos = data.draw(st.integers(0, self.size - 1), label="pos")
        length = data.draw(st.integers(1, min(self.size - pos, 20 * self.cluster_size)), label="length")
        payload = _pattern(seed, length)
        self.img.write(pos, payload)
        self.model[pos : pos + length] = payload

    @precondition(lambda self: self.size > 0)
    @rule(data=st.data())
    @_step
    def write_zeroes_unaligned(self, data: st.DataObject) -> None:
        pos, length = self._range(data, 3 * self.cluster_size + 4 * KiB)
        self.img.write_zeroes(pos, length)
        self.model[pos : pos + length] = bytes(length)

    @precondition(lambda self: self.size > 0)
    @rule(data=st.data())
    @_step
    def write_zeroes_aligned(self, data: st.DataObject) -> None:
        cs = self.cluster_size
        n_clusters = -(-self.size // cs)
        first = data.draw(st.integers(0, n_clusters - 1), label="first_cluster")
        count = data.draw(st.integers(1, min(n_clusters - first, 8)), label="n_clusters")
        pos = first * cs
        length = min(count * cs, self.size - pos)  # the image's last cluster may be partial
        self.img.write_zeroes(pos, length)
        self.model[pos : pos + length] = bytes(length)

    @precondition(lambda self: self.size > 0)
    @rule(data=st.data())
    @_step
    def trim(self, data: st.DataObject) -> None:
        cs = self.cluster_size
        if data.draw(st.booleans(), label="aligned"):
            n_clusters = self.size // cs
            if n_clusters == 0:
                return
            first = data.draw(st.integers(0, n_clusters - 1), label="first_cluster")
            pos = first * cs
            length = data.draw(st.integers(1, n_clusters - first), label="n_clusters") * cs
        else:
            pos, length = self._range(data, 6 * cs)
        self.img.trim(pos, length)
        got = self.img.read(pos, length)
        end = pos + length
        whole_lo = min(-(-pos // cs) * cs, end)
        whole_hi = max(end // cs * cs, whole_lo)
        # Bytes outside whole trimmed clusters are untouched.
        assert got[: whole_lo - pos] == self.model[pos:whole_lo]
        assert got[whole_hi - pos :] == self.model[whole_hi:end]
        # Each whole trimmed cluster reads as it was, or as zeros.
        for c in range(whole_lo, whole_hi, cs):
            now = got[c - pos : c - pos + cs]
            assert now == self.model[c : c + cs] or now == bytes(cs), f"trimmed cluster at {c:#x} holds junk"
        self.model[pos:end] = got

    @precondition(lambda self: self.size > 0)
    @rule(data=st.data())
    @_step
    def read(self, data: st.DataObject) -> None:
        pos, length = self._range(data, 8 * self.cluster_size)
        assert self.img.read(pos, length) == self.model[pos : pos + length]

    @rule()
    @_step
    def read_all(self) -> None:
        assert self.img.read(0, self.size) == self.model

    @rule()
    @_step
    def flush(self) -> None:
        self.img.flush()

    @precondition(lambda self: self.size < MAX_SIZE)
    @rule(data=st.data())
    @_step
    def resize(self, data: st.DataObject) -> None:
        old = self.size
        grow = data.draw(
            st.one_of(st.integers(0, 64), st.integers(0, (MAX_SIZE - old) // 512)), label="sectors"
        )
        new = min(old + grow * 512, MAX_SIZE)
        self.img.resize(new)
        self.model.extend(self._initial_bytes(old, new))
        assert self.img.size == new

    @rule(data=st.data())
    @_step
    def refused_resize(self, data: st.DataObject) -> None:
        """Shrinking and sizes that are not a multiple of 512 are refused and change nothing."""
        candidates = [self.size + 1, self.size + 511]
        if self.size >= 512:
            candidates += [self.size - 512, 0] if self.size > 512 else [0]
        bad = data.draw(st.sampled_from(candidates), label="bad_size")
        with pytest.raises(ImageError):
            self.img.resize(bad)
        assert self.img.size == self.size

    @rule(data=st.data())
    @_step
    def out_of_range(self, data: st.DataObject) -> None:
        """Requests reaching past the end fail whole; nothing is written."""
        pos = data.draw(st.integers(max(0, self.size - 4 * KiB), self.size), label="pos")
        length = data.draw(st.integers(self.size - pos + 1, self.size - pos + 8 * KiB), label="length")
        op = data.draw(st.sampled_from(["read", "write", "write_zeroes", "trim"]), label="op")
        with pytest.raises(ImageError):
            if op == "read":
                self.img.read(pos, length)
            elif op == "write":
                self.img.write(pos, b"\xee" * length)
            elif op == "write_zeroes":
                self.img.write_zeroes(pos, length)
            else:
                self.img.trim(pos, length)

    @rule(read_only_peek=st.booleans())
    @_step
    def reopen(self, read_only_peek: bool) -> None:
        self.img.close()
        self.image = None
        assert read_features(self.path) & F_NEED_CHECK == 0, "NEED_CHECK left set by close"
        if read_only_peek:
            with QedImage.open(self.path, read_only=True) as ro:
                assert ro.size == self.size
                assert ro.read(0, self.size) == self.model
        self.image = QedImage.open(self.path)
        assert self.image.size == self.size

    @invariant()
    @_step
    def block_status_tiles_the_image(self) -> None:
        if self.image is None or self.size == 0:
            return
        pos = 0
        for extent in self.img.block_status(0, self.size):
            assert extent.offset == pos and extent.length > 0
            if extent.kind == Kind.ZERO:
                assert self.model[pos : pos + extent.length] == bytes(extent.length)
            pos += extent.length
        assert pos == self.size

    # -- the end --------------------------------------------------------------------

    def teardown(self) -> None:
        try:
            if self.image is None or self.mid_step:
                return
            self.image.close()
            self.image = None
            assert read_features(self.path) & F_NEED_CHECK == 0, "NEED_CHECK left set by close"
            with QedImage.open(self.path, read_only=True) as again:
                assert again.read(0, self.size) == self.model
            if qemu_can_open(self.cluster_size, self.table_size, self.size):
                event("checked with qemu-img")
                check = qemu_img("check", "-f", "qed", self.path, check=False)
                assert check.returncode == 0, check.stdout + check.stderr
                raw = os.path.join(self.dir, "out.raw")
                qemu_img("convert", "-f", "qed", "-O", "raw", self.path, raw)
                with open(raw, "rb") as f:
                    assert f.read() == self.model, "qemu-img convert disagrees with the model"
        finally:
            if self.image is not None:
                self.image.close()
            shutil.rmtree(self.dir, ignore_errors=True)


class BackedImageModel(ImageModel):
    """The same, over a raw backing file of random bytes."""

    with_backing = True


FAST = settings(
    max_examples=40,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
SLOW = settings(FAST, max_examples=400, stateful_step_count=60)


@pytest.mark.interop
def test_image_matches_model() -> None:
    run_state_machine_as_test(ImageModel, settings=FAST)


@pytest.mark.interop
def test_backed_image_matches_model() -> None:
    run_state_machine_as_test(BackedImageModel, settings=FAST)


@pytest.mark.slow
@pytest.mark.interop
def test_image_matches_model_long() -> None:
    run_state_machine_as_test(ImageModel, settings=SLOW)


@pytest.mark.slow
@pytest.mark.interop
def test_backed_image_matches_model_long() -> None:
    run_state_machine_as_test(BackedImageModel, settings=SLOW)
