"""``qednbd convert``: copy a raw or QED image (flattening its backing chain) to raw or QED.

The output is sparse: ranges the source reports as zero or unallocated are skipped
without reading, and data is scanned in blocks of :data:`ZERO_SCAN_BYTES` (or the
output's cluster size, if larger) so all-zero blocks are not written either — they stay
unallocated in a QED output and holes in a raw one.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

from qednbd.errors import ImageError
from qednbd.qed import format as fmt
from qednbd.qed.backing import RawLayer, probe_format
from qednbd.qed.image import QedImage, create_image, layer_in
from qednbd.qed.locking import CREATOR, RAW_WRITER, READER, WRITER, shared
from qednbd.qed.mapping import map_image
from qednbd.qed.storage import FileStorage

ZERO_SCAN_BYTES = 4096  # qemu-img convert's default -S: smallest run of zeros kept sparse
COPY_CHUNK_BYTES = 4 * 1024 * 1024  # bytes read from the source at a time


class Source(Protocol):
    size: int

    def read(self, pos: int, length: int) -> bytes: ...

    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class ConvertOptions:
    src_format: str | None = None  # None: probe
    dst_format: str = "raw"
    cluster_size: int = fmt.DEFAULT_CLUSTER_SIZE
    table_size: int = fmt.DEFAULT_TABLE_SIZE
    force_share: bool = False  # -U: read the source even while another program writes it


def detect_format(path: str) -> str:
    storage = FileStorage(path, read_only=True)
    try:
        return probe_format(storage)
    finally:
        storage.close()


def _data_ranges(src: QedImage | RawLayer, size: int) -> Iterator[tuple[int, int]]:
    """Ranges that may hold non-zero bytes."""
    if isinstance(src, QedImage):
        for ext in map_image(src):
            if ext.data:
                yield ext.start, ext.length
        return
    for off, n, is_data in src.storage.data_runs(0, size):
        if is_data:
            yield off, n


def _nonzero_blocks(data: bytes, pos: int, block: int) -> Iterator[tuple[int, bytes]]:
    """Maximal runs of ``block``-aligned blocks that are not all zero, as (pos, bytes)."""
    zero = bytes(block)
    start: int | None = None
    lo = 0
    while lo < len(data):
        hi = min(len(data), lo + block - (pos + lo) % block)
        if data[lo:hi] != zero[: hi - lo]:
            if start is None:
                start = lo
        elif start is not None:
            yield pos + start, data[start:lo]
            start = None
        lo = hi
    if start is not None:
        yield pos + start, data[start:]


@contextlib.contextmanager
def _blame(path: str) -> Iterator[None]:
    """Name the file an error belongs to (source or destination)."""
    try:
        yield
    except _Blamed:
        raise
    except ImageError as exc:
        raise _Blamed(exc.errno, f"{path}: {exc.message}") from exc


class _Blamed(ImageError):
    """An error already prefixed with the file it belongs to."""


class _Output:
    """The destination: a new QED image or a sparse raw file, written through ``storage`` (the
    destination file, locked and emptied), which it owns from here on."""

    def __init__(self, storage: FileStorage, path: str, size: int, options: ConvertOptions) -> None:
        self.qed: QedImage | None = None
        self.raw: FileStorage | None = None
        self.block = ZERO_SCAN_BYTES
        try:
            if options.dst_format == "qed":
                create_image(
                    path,
                    size,
                    cluster_size=options.cluster_size,
                    table_size=options.table_size,
                    storage=storage,
                )
                storage.lock(WRITER)  # now QEMU's open of the new image: a writer's locks
                self.qed = QedImage(storage, path)
                self.block = max(self.block, options.cluster_size)
            else:
                storage.lock(RAW_WRITER)  # what qemu-img convert holds on a raw target
                self.raw = storage
                self.raw.truncate(size)
        except BaseException:
            storage.close()
            raise

    def write(self, pos: int, data: bytes) -> None:
        if self.qed is not None:
            self.qed.write(pos, data)
        elif self.raw is not None:
            self.raw.pwrite(data, pos)

    def close(self) -> None:
        if self.qed is not None:
            self.qed.close()
        elif self.raw is not None:
            self.raw.flush()
            self.raw.close()


def convert(
    src_path: str,
    dst_path: str,
    options: ConvertOptions,
    progress: Callable[[float], None] | None = None,
) -> None:
    """Copy ``src_path`` to ``dst_path`` (made or replaced); errors name the file they belong to.

    The destination is locked as qemu-img convert locks its target (the create step's locks
    before it is emptied, then a writer's) so a file another program has open is refused
    untouched; once it has been emptied, a failure removes it rather than leave a partial
    copy. The source is locked as a reader (``-U``: refusing nothing).
    """
    for given in (options.src_format, options.dst_format):
        if given not in (None, "qed", "raw"):
            raise ImageError(errno.EINVAL, f"Unknown file format '{given}'")
    access = shared(READER) if options.force_share else READER
    with _blame(src_path):  # opened once: probed and read through the same locked descriptor
        source = FileStorage(src_path, read_only=True, access=access)
        src = layer_in(source, src_path, options.src_format, force_share=options.force_share)
    try:
        with _blame(dst_path):
            storage = FileStorage(dst_path, create=True, access=CREATOR)
        try:
            _copy(src, storage, dst_path, src_path, options, progress)
        except BaseException:
            remove_partial(dst_path)
            raise
    finally:
        src.close()


def _copy(
    src: QedImage | RawLayer,
    storage: FileStorage,
    dst_path: str,
    src_path: str,
    options: ConvertOptions,
    progress: Callable[[float], None] | None,
) -> None:
    size = src.size
    with _blame(dst_path):
        out = _Output(storage, dst_path, size, options)
    try:
        block = out.block
        with _blame(src_path):
            ranges = list(_data_ranges(src, size))
        for start, length in ranges:
            end = start + length
            # read block-aligned chunks so zero detection lines up with the output's clusters
            pos = start - start % block
            while pos < end:
                n = min(COPY_CHUNK_BYTES, end - pos, size - pos)
                with _blame(src_path):
                    data = src.read(pos, n)
                with _blame(dst_path):
                    for at, run in _nonzero_blocks(data, pos, block):
                        out.write(at, run)
                pos += n
                if progress is not None and size:
                    progress(min(100.0, 100.0 * pos / size))
    finally:
        with _blame(dst_path):
            out.close()
    if progress is not None:
        progress(100.0)


def remove_partial(path: str) -> None:
    """Remove an output file left by a failed conversion, if any."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
