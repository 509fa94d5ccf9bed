"""Cluster and table arithmetic for every geometry QED allows (qed.md §1.3).

For each cluster size 4 KiB..64 MiB and table size 1..16: the derived fields follow the
spec's formulas, a guest position splits into (L1 index, L2 index, offset in cluster) and
back without loss, and ``clusters_spanned`` is the exact ceiling — not QEMU's
``round_up(x, cs) / (cs - 1)``.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qednbd.qed.format import max_image_size
from qednbd.qed.geometry import ENTRY_BYTES, Geometry

CLUSTER_SIZES = [1 << bits for bits in range(12, 27)]
TABLE_SIZES = [1, 2, 4, 8, 16]
GEOMETRIES = [(cs, ts) for cs in CLUSTER_SIZES for ts in TABLE_SIZES]
geometries = st.sampled_from(GEOMETRIES)


def _ids(case: tuple[int, int]) -> str:
    cs, ts = case
    return f"cs{cs >> 10}K-ts{ts}"


def _log2(n: int) -> int:
    assert n & (n - 1) == 0
    return n.bit_length() - 1


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def qemu_bytes_to_clusters(cs: int, n_bytes: int) -> int:
    """QEMU's qed_bytes_to_clusters, as qed.md §3 describes it (divides by cs-1)."""
    return _ceil_div(n_bytes, cs) * cs // (cs - 1)


@pytest.mark.parametrize("case", GEOMETRIES, ids=_ids)
def test_derived_fields(case: tuple[int, int]) -> None:
    cs, ts = case
    g = Geometry.of(cs, ts)
    entries = cs * ts // 8
    assert g.cluster_size == cs and g.table_size == ts and g.header_size == 1
    assert g.cluster_bits == _log2(cs)
    assert g.cluster_mask == cs - 1
    assert g.table_bytes == cs * ts
    assert g.table_entries == entries == g.table_bytes // ENTRY_BYTES
    assert g.l2_mask == entries - 1
    assert g.l1_shift == _log2(cs) + _log2(entries)
    assert g.l2_span == entries * cs
    # Two full levels of tables address exactly table_nelems^2 * cluster_size bytes.
    assert g.table_entries * g.l2_span == (cs * ts) ** 2 * cs // 64
    assert g.header_bytes == cs
    assert Geometry.of(cs, ts, header_size=3).header_bytes == 3 * cs


@pytest.mark.parametrize("case", GEOMETRIES, ids=_ids)
def test_boundary_positions(case: tuple[int, int]) -> None:
    cs, ts = case
    g = Geometry.of(cs, ts)
    top = max_image_size(cs, ts)
    for pos in (0, cs - 1, cs, g.l2_span - 1, g.l2_span, g.l2_span + cs + 1, top - 1):
        l1, l2, within = g.l1_index(pos), g.l2_index(pos), g.offset_in_cluster(pos)
        assert pos == (l1 << g.l1_shift) | (l2 << g.cluster_bits) | within
        assert l1 < g.table_entries
    assert (g.l1_index(g.l2_span - 1), g.l2_index(g.l2_span - 1)) == (0, g.table_entries - 1)
    assert (g.l1_index(g.l2_span), g.l2_index(g.l2_span)) == (1, 0)
    assert g.l2_index(cs) == 1 and g.offset_in_cluster(cs) == 0
    assert g.offset_in_cluster(cs - 1) == cs - 1


@settings(max_examples=400)
@given(geometries, st.data())
def test_index_decomposition_round_trips(case: tuple[int, int], data: st.DataObject) -> None:
    cs, ts = case
    g = Geometry.of(cs, ts)
    pos = data.draw(st.integers(0, max_image_size(cs, ts) - 1), label="pos")
    l1, l2, within = g.l1_index(pos), g.l2_index(pos), g.offset_in_cluster(pos)
    assert 0 <= l1 < g.table_entries
    assert 0 <= l2 <= g.l2_mask
    assert 0 <= within < cs
    assert pos == (l1 << g.l1_shift) | (l2 << g.cluster_bits) | within
    # The same split by plain division, independent of the shifts.
    assert (l1, l2, within) == (pos // (g.table_entries * cs), pos // cs % g.table_entries, pos % cs)
    assert g.cluster_start(pos) == pos - within
    assert g.cluster_end(pos) == _ceil_div(pos, cs) * cs
    assert g.l2_region_end(pos) == (l1 + 1) * g.l2_span


@settings(max_examples=400)
@given(geometries, st.data())
def test_clusters_spanned_is_the_exact_ceiling(case: tuple[int, int], data: st.DataObject) -> None:
    cs, ts = case
    g = Geometry.of(cs, ts)
    top = max_image_size(cs, ts)
    pos = data.draw(st.integers(0, top - 1), label="pos")
    n = data.draw(st.integers(0, min(top - pos, 1 << 40)), label="n_bytes")
    spanned = g.clusters_spanned(pos, n)
    assert spanned == _ceil_div(pos % cs + n, cs)
    if n:
        # ... which is the number of distinct clusters the range touches.
        assert spanned == (pos + n - 1) // cs - pos // cs + 1
    assert g.bytes_to_clusters(n) == _ceil_div(n, cs)


@pytest.mark.parametrize("cs", CLUSTER_SIZES, ids=lambda cs: f"cs{cs >> 10}K")
def test_clusters_spanned_is_not_qemus_cs_minus_1_divisor(cs: int) -> None:
    g = Geometry.of(cs, 16)
    # Small requests: QEMU's formula happens to agree.
    for n_clusters in (1, 2, 3, cs - 2):
        assert g.clusters_spanned(0, n_clusters * cs) == n_clusters
        assert qemu_bytes_to_clusters(cs, n_clusters * cs) == n_clusters
    # From cs-1 clusters on, QEMU claims one too many (qed.md §9 bug 3); we do not.
    n_bytes = (cs - 1) * cs
    assert g.clusters_spanned(0, n_bytes) == cs - 1
    assert qemu_bytes_to_clusters(cs, n_bytes) == cs
    assert g.bytes_to_clusters(n_bytes) == cs - 1
    # An unaligned start that makes the span reach cs-1 clusters differs the same way.
    assert g.clusters_spanned(512, n_bytes - cs) == cs - 1
    assert qemu_bytes_to_clusters(cs, 512 + n_bytes - cs) == cs


def test_the_documented_4k_case() -> None:
    """qed.md §9: one write covering clusters 0..4094 of a 4K image."""
    g = Geometry.of(4096, 16)
    assert g.clusters_spanned(0, 4095 * 4096) == 4095
    assert qemu_bytes_to_clusters(4096, 4095 * 4096) == 4096


@pytest.mark.parametrize("case", GEOMETRIES, ids=_ids)
def test_l1_entries_for(case: tuple[int, int]) -> None:
    cs, ts = case
    g = Geometry.of(cs, ts)
    assert g.l1_entries_for(0) == 0
    assert g.l1_entries_for(1) == 1
    assert g.l1_entries_for(g.l2_span) == 1
    assert g.l1_entries_for(g.l2_span + 512) == 2
    assert g.l1_entries_for(max_image_size(cs, ts)) <= g.table_entries
    assert g.l1_entries_for(g.table_entries * g.l2_span) == g.table_entries


def test_default_geometry_numbers() -> None:
    """qed.md §4.3: the default 64K/4 image; one L2 table covers 2 GiB."""
    g = Geometry.of(65536, 4)
    assert g.table_entries == 32768
    assert g.l2_span == 2 << 30
    g = Geometry.of(4096, 2)
    assert g.l2_span == 4 << 20  # the L2-boundary case of recipe R2
