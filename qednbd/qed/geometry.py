"""Cluster and table arithmetic, computed once when an image is opened.

Guest position ``pos`` maps to ``L1[pos >> l1_shift]`` → L2 table →
``L2[(pos >> cluster_bits) & l2_mask]`` → data cluster, plus ``pos & cluster_mask``
within the cluster. Every conversion between bytes, clusters and table entries lives
here; other modules keep their units in their names and call these.
"""

from __future__ import annotations

from dataclasses import dataclass

ENTRY_BYTES = 8  # every L1 and L2 entry is a little-endian u64


@dataclass(frozen=True, slots=True)
class Geometry:
    cluster_size: int
    table_size: int  # clusters per table
    header_size: int  # clusters before anything else may be allocated
    cluster_bits: int
    cluster_mask: int
    table_bytes: int  # bytes per L1 or L2 table
    table_entries: int  # entries per table
    l2_mask: int
    l1_shift: int
    l2_span: int  # guest bytes covered by one L2 table

    @classmethod
    def of(cls, cluster_size: int, table_size: int, header_size: int = 1) -> Geometry:
        cluster_bits = cluster_size.bit_length() - 1
        table_bytes = cluster_size * table_size
        entries = table_bytes // ENTRY_BYTES
        l1_shift = cluster_bits + entries.bit_length() - 1
        return cls(
            cluster_size=cluster_size,
            table_size=table_size,
            header_size=header_size,
            cluster_bits=cluster_bits,
            cluster_mask=cluster_size - 1,
            table_bytes=table_bytes,
            table_entries=entries,
            l2_mask=entries - 1,
            l1_shift=l1_shift,
            l2_span=1 << l1_shift,
        )

    def l1_index(self, pos: int) -> int:
        return pos >> self.l1_shift

    def l2_index(self, pos: int) -> int:
        return (pos >> self.cluster_bits) & self.l2_mask

    def offset_in_cluster(self, pos: int) -> int:
        return pos & self.cluster_mask

    def cluster_start(self, pos: int) -> int:
        return pos & ~self.cluster_mask

    def cluster_end(self, pos: int) -> int:
        """``pos`` rounded up to a cluster boundary."""
        return (pos + self.cluster_mask) & ~self.cluster_mask

    def l2_region_end(self, pos: int) -> int:
        """The first guest byte served by the next L2 table."""
        return (self.l1_index(pos) + 1) << self.l1_shift

    def clusters_spanned(self, pos: int, n_bytes: int) -> int:
        """Clusters touched by [pos, pos+n_bytes): QEMU's bytes_to_clusters, minus its bug.

        QEMU divides by ``cluster_size - 1``; we divide by ``cluster_size`` so a long
        allocation never claims one cluster too many (see docs/format.md).
        """
        return (self.offset_in_cluster(pos) + n_bytes + self.cluster_mask) >> self.cluster_bits

    def bytes_to_clusters(self, n_bytes: int) -> int:
        return (n_bytes + self.cluster_mask) >> self.cluster_bits

    def l1_entries_for(self, image_size: int) -> int:
        """L1 entries that can be non-zero for an image of this size."""
        return min(self.table_entries, (image_size + self.l2_span - 1) >> self.l1_shift)

    @property
    def header_bytes(self) -> int:
        return self.header_size * self.cluster_size
