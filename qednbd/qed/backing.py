"""Backing files: which names we follow, and the raw backing layer.

A QED image may name a backing file that supplies every cluster the image has not
allocated. The name is resolved relative to the image's directory (an absolute name
stays absolute). We only follow plain file names: a URL, a ``json:`` specification, a
``protocol:`` prefix (a colon before the first slash, which QEMU would hand to a
protocol driver) or a name containing NUL is refused, so an image cannot make us open a
network connection or a device it does not name as a path.

A raw backing file's size is its length rounded up to 512 bytes, as QEMU's block layer
sees it; the padding and everything past the end read as zeros.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass

from qednbd.errors import ImageError, UnsupportedFeature
from qednbd.qed.format import MAGIC, SECTOR_SIZE
from qednbd.qed.storage import FileStorage

MAX_CHAIN_DEPTH = 32  # a longer chain is almost surely a mistake, and each layer costs a file
_OTHER_FORMAT_MAGICS = {b"QFI\xfb": "qcow/qcow2", b"KDMV": "vmdk", b"conectix": "vpc"}


def check_backing_name(name: str) -> None:
    """Refuse names that are not plain paths (see the module docstring)."""
    if "\0" in name:
        raise ImageError(errno.EINVAL, "backing file name contains a NUL byte")
    if name.startswith("json:"):
        raise ImageError(errno.EINVAL, f"backing file '{name}' is a json: specification; refusing")
    head = name.split("/", 1)[0]
    if ":" in head:
        raise ImageError(errno.EINVAL, f"backing file '{name}' names a protocol or URL; refusing")


def resolve_backing_path(image_path: str, name: str) -> str:
    check_backing_name(name)
    if os.path.isabs(name):
        return name
    return os.path.join(os.path.dirname(image_path), name)


def probe_format(storage: FileStorage) -> str:
    """'qed' or 'raw' for a backing file without the no-probe bit; others are refused."""
    head = storage.pread(8, 0)
    if int.from_bytes(head[:4], "little") == MAGIC:
        return "qed"
    for magic, fmt in _OTHER_FORMAT_MAGICS.items():
        if head.startswith(magic):
            raise UnsupportedFeature(f"backing file format {fmt} is not supported")
    return "raw"


@dataclass(frozen=True, slots=True)
class LayerRun:
    """One run of a layer's block status: ``kind`` is 'data', 'zero' or 'unallocated'."""

    length: int
    kind: str
    offset: int | None  # host offset in this layer's file, where there is one


class RawLayer:
    """A raw file used as a backing file: read-only, every byte is 'allocated'."""

    format_name = "raw"

    def __init__(self, path: str, storage: FileStorage | None = None) -> None:
        """``storage``: the file already open (and locked) read-only, else it is opened here."""
        self.path = path
        self.storage = storage if storage is not None else FileStorage(path, read_only=True)
        length = self.storage.length()
        self.size = -(-length // SECTOR_SIZE) * SECTOR_SIZE
        self.backing: None = None

    def read(self, pos: int, length: int) -> bytes:
        return self.storage.pread(length, pos)

    def status(self, pos: int, length: int) -> list[LayerRun]:
        return [
            LayerRun(n, "data" if is_data else "zero", off)
            for off, n, is_data in self.storage.data_runs(pos, length)
        ]

    def close(self) -> None:
        self.storage.close()
