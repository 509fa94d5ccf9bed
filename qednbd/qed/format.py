"""QED on-disk format: constants, the 64-byte header, and header validation.

Theory of operation
-------------------
* All integers are little-endian. The header is a declared, precompiled structure
  (:data:`HEADER`); :class:`Header` is its frozen value type.
* :func:`validate_header` checks the fields in QEMU's order and raises with QEMU's
  one-line wording, so users see the same reason from either tool. It checks every
  field that bounds an allocation *before* anything is allocated from it.
* We differ from QEMU on purpose in two places (documented in docs/format.md):
  table_size 1 is valid (QEMU's table-offset check rejects it by an off-by-one), and the
  maximum image size is computed exactly (QEMU's uint64 arithmetic overflows to 0 for
  large clusters). :func:`qemu_can_open` says whether QEMU would accept an image.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, replace

from qednbd.errors import InvalidImage, UnsupportedFeature

MAGIC = 0x00444551  # "QED\0" read as a little-endian u32

# magic, cluster_size, table_size, header_size, features, compat_features,
# autoclear_features, l1_table_offset, image_size, backing_filename_offset,
# backing_filename_size
HEADER = struct.Struct("<IIIIQQQQQII")
HEADER_BYTES = HEADER.size  # 64

F_BACKING_FILE = 0x01
F_NEED_CHECK = 0x02
F_BACKING_FORMAT_NO_PROBE = 0x04
FEATURE_MASK = F_BACKING_FILE | F_NEED_CHECK | F_BACKING_FORMAT_NO_PROBE
COMPAT_FEATURE_MASK = 0
AUTOCLEAR_FEATURE_MASK = 0

MIN_CLUSTER_SIZE = 4096
MAX_CLUSTER_SIZE = 64 * 1024 * 1024
MIN_TABLE_SIZE = 1
MAX_TABLE_SIZE = 16
DEFAULT_CLUSTER_SIZE = 65536
DEFAULT_TABLE_SIZE = 4
SECTOR_SIZE = 512

# QEMU's block layer refuses devices longer than this (BDRV_MAX_LENGTH); offsets beyond
# it do not fit an off_t once a cluster is added, so it caps our exact maximum too.
MAX_DEVICE_BYTES = (1 << 63) - (1 << 30)
# QEMU reads backing names into a PATH_MAX buffer and refuses longer ones.
MAX_BACKING_NAME_BYTES = 4095

U32_MAX = 0xFFFFFFFF
U64_MASK = (1 << 64) - 1


@dataclass(frozen=True, slots=True)
class Header:
    """The 64-byte QED header, field for field."""

    cluster_size: int
    table_size: int
    header_size: int
    features: int
    compat_features: int
    autoclear_features: int
    l1_table_offset: int
    image_size: int
    backing_filename_offset: int
    backing_filename_size: int
    magic: int = MAGIC

    def encode(self) -> bytes:
        return HEADER.pack(
            self.magic,
            self.cluster_size,
            self.table_size,
            self.header_size,
            self.features,
            self.compat_features,
            self.autoclear_features,
            self.l1_table_offset,
            self.image_size,
            self.backing_filename_offset,
            self.backing_filename_size,
        )

    @classmethod
    def decode(cls, raw: bytes) -> Header:
        if len(raw) < HEADER_BYTES:
            raise InvalidImage("Image not in QED format")
        (magic, cs, ts, hs, feat, compat, autoclear, l1, size, bfo, bfs) = HEADER.unpack_from(raw)
        return cls(cs, ts, hs, feat, compat, autoclear, l1, size, bfo, bfs, magic)

    def with_features(self, features: int) -> Header:
        return replace(self, features=features)

    @property
    def need_check(self) -> bool:
        return bool(self.features & F_NEED_CHECK)


def is_power_of_2(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


def cluster_size_valid(cluster_size: int) -> bool:
    return is_power_of_2(cluster_size) and MIN_CLUSTER_SIZE <= cluster_size <= MAX_CLUSTER_SIZE


def table_size_valid(table_size: int) -> bool:
    return is_power_of_2(table_size) and MIN_TABLE_SIZE <= table_size <= MAX_TABLE_SIZE


def max_image_size(cluster_size: int, table_size: int) -> int:
    """The largest image the two-level tables can address, exactly, capped to a device size."""
    entries = cluster_size * table_size // 8
    return min(entries * entries * cluster_size, MAX_DEVICE_BYTES)


def qemu_max_image_size(cluster_size: int, table_size: int) -> int:
    """QEMU's ``qed_max_image_size``: the same product computed modulo 2**64 (it overflows)."""
    entries = cluster_size * table_size // 8
    return (entries * cluster_size * entries) & U64_MASK


def image_size_valid(image_size: int, cluster_size: int, table_size: int) -> bool:
    return image_size % SECTOR_SIZE == 0 and image_size <= max_image_size(cluster_size, table_size)


def qemu_can_open(cluster_size: int, table_size: int, image_size: int) -> bool:
    """Whether QEMU 7.2–10 opens an image of this geometry (see the module docstring)."""
    return table_size > 1 and image_size <= qemu_max_image_size(cluster_size, table_size)


def validate_header(header: Header, file_length: int) -> None:
    """Raise :class:`InvalidImage`/:class:`UnsupportedFeature` if QEMU's open would refuse.

    ``file_length`` is the image file's length in bytes; offsets must lie below
    :func:`usable_file_size`, as QEMU requires.
    """
    if header.magic != MAGIC:
        raise InvalidImage("Image not in QED format")
    unknown = header.features & ~FEATURE_MASK
    if unknown:
        raise UnsupportedFeature(f"Unsupported QED features: {unknown:x}")
    cs = header.cluster_size
    if not cluster_size_valid(cs):
        raise InvalidImage("QED cluster size is invalid")
    if not table_size_valid(header.table_size):
        raise InvalidImage("QED table size is invalid")
    if not image_size_valid(header.image_size, cs, header.table_size):
        raise InvalidImage("QED image size is invalid")
    file_size = usable_file_size(file_length, cs)
    if not table_offset_valid(header.l1_table_offset, header, file_size):
        raise InvalidImage("QED table offset is invalid")
    header_bytes = header.header_size * cs
    if header_bytes > U32_MAX:
        raise InvalidImage("QED header size is too large")
    if header.features & F_BACKING_FILE and (
        header.backing_filename_offset + header.backing_filename_size > header_bytes
    ):
        raise InvalidImage("QED backing filename offset is invalid")


def usable_file_size(file_length: int, cluster_size: int) -> int:
    """Where allocation starts: QEMU sees a file in whole sectors (length rounded up to
    512), then rounds down to a cluster. A tail shorter than a sector reads as zeros."""
    sectors = -(-file_length // SECTOR_SIZE) * SECTOR_SIZE
    return sectors - sectors % cluster_size


def cluster_offset_valid(offset: int, header: Header, file_size: int) -> bool:
    """A data cluster offset: aligned, after the header clusters, before the end of file."""
    cs = header.cluster_size
    return offset % cs == 0 and header.header_size * cs <= offset < file_size


def table_offset_valid(offset: int, header: Header, file_size: int) -> bool:
    """A table (L1 or L2) offset: every one of its ``table_size`` clusters is valid.

    QEMU writes this as ``end = offset + (table_size - 1) * cluster_size`` and rejects
    ``end <= offset`` as overflow, which rejects every table when table_size is 1. We
    have no overflow to guard against, so the last cluster is checked directly.
    """
    last = offset + (header.table_size - 1) * header.cluster_size
    return cluster_offset_valid(offset, header, file_size) and cluster_offset_valid(last, header, file_size)


def new_header(
    cluster_size: int,
    table_size: int,
    image_size: int,
    backing_name: bytes = b"",
    backing_raw: bool = False,
) -> Header:
    """The header ``qemu-img create -f qed`` writes for these options."""
    features = 0
    if backing_name:
        features |= F_BACKING_FILE
        if backing_raw:
            features |= F_BACKING_FORMAT_NO_PROBE
    return Header(
        cluster_size=cluster_size,
        table_size=table_size,
        header_size=1,
        features=features,
        compat_features=0,
        autoclear_features=0,
        l1_table_offset=cluster_size,
        image_size=image_size,
        backing_filename_offset=HEADER_BYTES if backing_name else 0,
        backing_filename_size=len(backing_name),
    )
