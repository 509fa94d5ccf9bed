"""The QED header: encode/decode round-trips, validation in QEMU's order, size limits.

The reference for every expectation here is docs in ``/work/shared/reference/qed.md``:
§1.1 (header layout), §1.3 (geometry and QEMU's overflowing maximum size) and §7 (the
order and wording of QEMU's open-time checks).
"""

from __future__ import annotations

import struct
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qednbd.errors import InvalidImage, UnsupportedFeature
from qednbd.qed import format as fmt
from qednbd.qed.format import Header

U32 = st.integers(0, 2**32 - 1)
U64 = st.integers(0, 2**64 - 1)
CLUSTER_SIZES = [1 << bits for bits in range(12, 27)]  # 4 KiB .. 64 MiB
TABLE_SIZES = [1, 2, 4, 8, 16]
KiB, MiB, GiB, TiB, PiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40, 1 << 50

# --------------------------------------------------------------------------------------
# encode / decode


headers = st.builds(
    Header,
    cluster_size=U32,
    table_size=U32,
    header_size=U32,
    features=U64,
    compat_features=U64,
    autoclear_features=U64,
    l1_table_offset=U64,
    image_size=U64,
    backing_filename_offset=U32,
    backing_filename_size=U32,
    magic=U32,
)


@given(headers)
def test_encode_decode_round_trip(header: Header) -> None:
    raw = header.encode()
    assert len(raw) == fmt.HEADER_BYTES == 64
    assert Header.decode(raw) == header


@given(headers, st.binary(max_size=64))
def test_decode_ignores_bytes_after_the_header(header: Header, tail: bytes) -> None:
    assert Header.decode(header.encode() + tail) == header


@given(headers)
def test_encoding_is_the_little_endian_layout_of_the_spec(header: Header) -> None:
    """Field offsets of qed.md §1.1, checked with an independent unpack per field."""
    raw = header.encode()

    def u32(off: int) -> int:
        return int(struct.unpack_from("<I", raw, off)[0])

    def u64(off: int) -> int:
        return int(struct.unpack_from("<Q", raw, off)[0])

    assert u32(0) == header.magic
    assert u32(4) == header.cluster_size
    assert u32(8) == header.table_size
    assert u32(12) == header.header_size
    assert u64(16) == header.features
    assert u64(24) == header.compat_features
    assert u64(32) == header.autoclear_features
    assert u64(40) == header.l1_table_offset
    assert u64(48) == header.image_size
    assert u32(56) == header.backing_filename_offset
    assert u32(60) == header.backing_filename_size


def test_magic_is_qed_nul() -> None:
    raw = fmt.new_header(65536, 4, 1 * GiB).encode()
    assert raw[:4] == b"QED\0"


@pytest.mark.parametrize("length", [0, 1, 63])
def test_decode_of_a_short_buffer_is_not_qed(length: int) -> None:
    with pytest.raises(InvalidImage, match="Image not in QED format"):
        Header.decode(bytes(length))


def test_new_header_matches_qemu_img_create() -> None:
    """qed.md §1.2: header_size 1, L1 right after the header cluster, name at 64."""
    h = fmt.new_header(4096, 16, 100352, b"base.raw", backing_raw=True)
    assert (h.magic, h.cluster_size, h.table_size, h.header_size) == (fmt.MAGIC, 4096, 16, 1)
    assert h.features == fmt.F_BACKING_FILE | fmt.F_BACKING_FORMAT_NO_PROBE == 0x5
    assert (h.compat_features, h.autoclear_features) == (0, 0)
    assert h.l1_table_offset == 4096
    assert h.image_size == 100352
    assert (h.backing_filename_offset, h.backing_filename_size) == (64, 8)
    assert fmt.new_header(65536, 4, 0, b"b.qed").features == fmt.F_BACKING_FILE
    plain = fmt.new_header(65536, 4, GiB)
    assert plain.features == 0 and plain.backing_filename_size == 0


# --------------------------------------------------------------------------------------
# validate_header: accepts


def _file_length(header: Header) -> int:
    """The length of a freshly created image of this header: header cluster + L1 table."""
    return (1 + header.table_size) * header.cluster_size


@pytest.mark.parametrize("cluster_size", CLUSTER_SIZES)
@pytest.mark.parametrize("table_size", TABLE_SIZES)
def test_fresh_headers_of_every_geometry_are_accepted(cluster_size: int, table_size: int) -> None:
    for size in (0, 512, fmt.max_image_size(cluster_size, table_size) // 512 * 512):
        h = fmt.new_header(cluster_size, table_size, size)
        fmt.validate_header(h, _file_length(h))


def test_accepts_what_qemu_accepts() -> None:
    base = fmt.new_header(65536, 4, 10 * MiB, b"backing.raw", backing_raw=True)
    length = _file_length(base)
    fmt.validate_header(base, length)
    # Known feature bits, including NEED_CHECK.
    fmt.validate_header(base.with_features(fmt.FEATURE_MASK), length)
    # Unknown compat and autoclear bits do not stop an open.
    fmt.validate_header(_with(base, compat_features=0x8, autoclear_features=2**64 - 1), length)
    # A trailing partial cluster after the L1 table is fine.
    fmt.validate_header(base, length + 1000)
    # F_BACKING_FILE with a zero-length name opens (as "no backing file").
    fmt.validate_header(_with(base, backing_filename_size=0), length)
    # The name may end exactly at the end of the header cluster.
    fmt.validate_header(_with(base, backing_filename_offset=100, backing_filename_size=65536 - 100), length)
    # Without F_BACKING_FILE the name fields are not checked at all.
    fmt.validate_header(_with(base, features=0, backing_filename_offset=2**32 - 1), length)
    # A header spanning several clusters, with the L1 table after it.
    big = _with(base, header_size=4, l1_table_offset=4 * 65536)
    fmt.validate_header(big, 8 * 65536)
    # A table size 1 image (QEMU refuses it by an off-by-one; we do not, see format.py).
    one = fmt.new_header(4096, 1, 1 * MiB)
    fmt.validate_header(one, _file_length(one))


def _with(header: Header, **changes: int) -> Header:
    return replace(header, **changes)


# --------------------------------------------------------------------------------------
# validate_header: rejects, in QEMU's order (qed.md §7)


def _reject(header: Header, file_length: int) -> InvalidImage:
    with pytest.raises((InvalidImage, UnsupportedFeature)) as info:
        fmt.validate_header(header, file_length)
    return info.value


GOOD = fmt.new_header(65536, 4, 10 * MiB, b"backing.raw", backing_raw=True)
GOOD_LENGTH = _file_length(GOOD)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"magic": 0x00444552}, "Image not in QED format"),
        ({"features": 0x100}, "Unsupported QED features: 100"),
        ({"features": 0x7 | 0x8 | (1 << 63)}, "Unsupported QED features: 8000000000000008"),
        ({"cluster_size": 2048}, "QED cluster size is invalid"),
        ({"cluster_size": 128 * MiB}, "QED cluster size is invalid"),
        ({"cluster_size": 65536 + 4096}, "QED cluster size is invalid"),
        ({"cluster_size": 0}, "QED cluster size is invalid"),
        ({"table_size": 0}, "QED table size is invalid"),
        ({"table_size": 3}, "QED table size is invalid"),
        ({"table_size": 32}, "QED table size is invalid"),
        ({"image_size": 10 * MiB + 1}, "QED image size is invalid"),
        ({"image_size": 64 * TiB + 512}, "QED image size is invalid"),
        ({"l1_table_offset": 0}, "QED table offset is invalid"),
        ({"l1_table_offset": 65536 + 512}, "QED table offset is invalid"),
        ({"l1_table_offset": 2 * 65536}, "QED table offset is invalid"),  # last cluster past EOF
        ({"l1_table_offset": 2**64 - 1}, "QED table offset is invalid"),
        ({"header_size": 2}, "QED table offset is invalid"),  # L1 now inside the header
        ({"header_size": 2**32 - 1}, "QED table offset is invalid"),  # iotest 116
        ({"backing_filename_offset": 65536 - 10}, "QED backing filename offset is invalid"),
        ({"backing_filename_size": 65536}, "QED backing filename offset is invalid"),
    ],
)
def test_rejects_one_bad_field_with_qemus_message(changes: dict[str, int], message: str) -> None:
    err = _reject(_with(GOOD, **changes), GOOD_LENGTH)
    assert str(err) == message


def test_unsupported_features_is_its_own_error_type() -> None:
    err = _reject(GOOD.with_features(0x100), GOOD_LENGTH)
    assert isinstance(err, UnsupportedFeature)
    err = _reject(_with(GOOD, cluster_size=3), GOOD_LENGTH)
    assert not isinstance(err, UnsupportedFeature)


def test_header_size_too_large() -> None:
    """header_size*cluster_size > UINT32_MAX, with an L1 table that is otherwise valid."""
    cs = 4096
    header_size = (1 << 32) // cs  # exactly 4 GiB of header
    h = _with(fmt.new_header(cs, 2, MiB), header_size=header_size, l1_table_offset=header_size * cs)
    err = _reject(h, header_size * cs + 2 * cs)
    assert str(err) == "QED header size is too large"
    fmt.validate_header(_with(h, header_size=header_size - 1), header_size * cs + 2 * cs)


def test_truncated_file_rejects_the_table_offset() -> None:
    """iotest 116: a header truncated to 512 bytes leaves no room for L1."""
    assert str(_reject(GOOD, 512)) == "QED table offset is invalid"
    # A file one sector short of the end of L1: file_size rounds down, L1 is past it.
    assert str(_reject(GOOD, GOOD_LENGTH - 512)) == "QED table offset is invalid"
    # QEMU sees a file in whole sectors, so a file one byte short still holds all of L1.
    fmt.validate_header(GOOD, GOOD_LENGTH - 1)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        # bad magic wins over everything
        ({"magic": 0, "features": 0x100, "cluster_size": 3}, "Image not in QED format"),
        # unknown feature bits are reported before the cluster size
        ({"features": 0x100, "cluster_size": 3}, "Unsupported QED features: 100"),
        (
            {"features": 0x10, "cluster_size": 3, "table_size": 3, "image_size": 1},
            "Unsupported QED features: 10",
        ),
        # cluster size before table size
        ({"cluster_size": 3, "table_size": 3}, "QED cluster size is invalid"),
        ({"cluster_size": 1 << 30, "table_size": 0, "image_size": 7}, "QED cluster size is invalid"),
        # table size before image size
        ({"table_size": 3, "image_size": 7}, "QED table size is invalid"),
        # image size before the table offset
        ({"image_size": 7, "l1_table_offset": 3}, "QED image size is invalid"),
        # table offset before header size and backing name
        ({"l1_table_offset": 3, "backing_filename_size": 2**32 - 1}, "QED table offset is invalid"),
    ],
)
def test_rejects_in_qemus_order(changes: dict[str, int], message: str) -> None:
    assert str(_reject(_with(GOOD, **changes), GOOD_LENGTH)) == message


def _expected_error(h: Header, file_length: int) -> str | None:
    """QEMU's open checks (qed.md §7), written out independently of format.py.

    Deliberate differences of the engine (documented in format.py) are followed: the
    maximum size is exact rather than overflowing, and table_size 1 is accepted.
    """
    if h.magic != 0x00444551:
        return "Image not in QED format"
    if h.features & ~0x7:
        return f"Unsupported QED features: {h.features & ~0x7:x}"
    cs = h.cluster_size
    if not (4096 <= cs <= 1 << 26 and cs & (cs - 1) == 0):
        return "QED cluster size is invalid"
    file_size = -(-file_length // 512) * 512 // cs * cs  # whole sectors, then whole clusters
    ts = h.table_size
    if ts not in (1, 2, 4, 8, 16):
        return "QED table size is invalid"
    if h.image_size % 512 or h.image_size > fmt.max_image_size(cs, ts):
        return "QED image size is invalid"

    def cluster_ok(off: int) -> bool:
        return off % cs == 0 and h.header_size * cs <= off < file_size

    if not (cluster_ok(h.l1_table_offset) and cluster_ok(h.l1_table_offset + (ts - 1) * cs)):
        return "QED table offset is invalid"
    if h.header_size * cs > 2**32 - 1:
        return "QED header size is too large"
    if h.features & 0x1 and h.backing_filename_offset + h.backing_filename_size > h.header_size * cs:
        return "QED backing filename offset is invalid"
    return None


def _mostly_valid_headers() -> st.SearchStrategy[tuple[Header, int]]:
    """Headers where each field is usually plausible, so later checks get exercised too."""

    def pick(valid: st.SearchStrategy[int], wild: st.SearchStrategy[int]) -> st.SearchStrategy[int]:
        return st.one_of(valid, valid, valid, wild)

    cs = pick(st.sampled_from(CLUSTER_SIZES), U32)
    ts = pick(st.sampled_from(TABLE_SIZES), U32)

    @st.composite
    def build(draw: st.DrawFn) -> tuple[Header, int]:
        c, t = draw(cs), draw(ts)
        hs = draw(pick(st.integers(1, 4), U32))
        l1 = draw(pick(st.integers(0, 8).map(lambda n: n * max(c, 1)), U64))
        size = draw(pick(st.integers(0, 1 << 20).map(lambda n: n * 512), U64))
        features = draw(pick(st.integers(0, 7), U64))
        bfo = draw(pick(st.just(64), U32))
        bfs = draw(pick(st.integers(0, 5000), U32))
        magic = draw(pick(st.just(fmt.MAGIC), U32))
        header = Header(c, t, hs, features, draw(U64), draw(U64), l1, size, bfo, bfs, magic)
        length = draw(st.one_of(st.integers(0, 40 * max(c, 1)), st.integers(0, 2**64)))
        return header, length

    return build()


@settings(max_examples=500)
@given(_mostly_valid_headers())
def test_validation_matches_the_reference_order(case: tuple[Header, int]) -> None:
    header, length = case
    expected = _expected_error(header, length)
    if expected is None:
        fmt.validate_header(header, length)
    else:
        assert str(_reject(header, length)) == expected


# --------------------------------------------------------------------------------------
# maximum image size (qed.md §1.3)


def _qemu_overflows(cs: int, ts: int) -> bool:
    """Exactly the cases listed in qed.md §1.3."""
    return cs >= 16 * MiB or (cs == 8 * MiB and ts >= 2) or (cs == 4 * MiB and ts >= 4) or (
        cs == 2 * MiB and ts == 16
    )


@pytest.mark.parametrize("cs", CLUSTER_SIZES)
@pytest.mark.parametrize("ts", TABLE_SIZES)
def test_qemu_max_image_size_overflows_exactly_where_documented(cs: int, ts: int) -> None:
    exact = (cs * ts // 8) ** 2 * cs
    qemu = fmt.qemu_max_image_size(cs, ts)
    if _qemu_overflows(cs, ts):
        assert qemu == 0
        assert exact >= 2**64
    else:
        assert qemu == exact < 2**64
    # Ours is exact, capped at the largest device QEMU's block layer allows.
    assert fmt.max_image_size(cs, ts) == min(exact, fmt.MAX_DEVICE_BYTES)
    assert fmt.max_image_size(cs, ts) > 0


@pytest.mark.parametrize(
    ("cs", "ts", "size"),
    [
        (4 * KiB, 1, 1 * GiB),
        (4 * KiB, 2, 4 * GiB),
        (4 * KiB, 16, 256 * GiB),
        (64 * KiB, 4, 64 * TiB),
        (64 * KiB, 16, 1 * PiB),
        (4 * MiB, 2, 1 << 62),
    ],
)
def test_max_image_size_table(cs: int, ts: int, size: int) -> None:
    assert fmt.max_image_size(cs, ts) == size
    assert fmt.qemu_max_image_size(cs, ts) == size


def test_max_device_cap() -> None:
    # 2M/8: 2^63 fits in QEMU's u64 but exceeds the largest device.
    assert fmt.qemu_max_image_size(2 * MiB, 8) == 1 << 63
    assert fmt.max_image_size(2 * MiB, 8) == fmt.MAX_DEVICE_BYTES < 1 << 63


@pytest.mark.parametrize("cs", CLUSTER_SIZES)
def test_qemu_can_open_never_for_table_size_1(cs: int) -> None:
    assert not fmt.qemu_can_open(cs, 1, 0)
    assert not fmt.qemu_can_open(cs, 1, 512)


@pytest.mark.parametrize("cs", CLUSTER_SIZES)
@pytest.mark.parametrize("ts", TABLE_SIZES[1:])
def test_qemu_can_open(cs: int, ts: int) -> None:
    assert fmt.qemu_can_open(cs, ts, 0)  # size 0 is always accepted
    qemu_max = fmt.qemu_max_image_size(cs, ts)
    if _qemu_overflows(cs, ts):
        assert not fmt.qemu_can_open(cs, ts, 512)
        assert not fmt.qemu_can_open(cs, ts, 1 * GiB)
    else:
        assert fmt.qemu_can_open(cs, ts, 1 * MiB)
        assert fmt.qemu_can_open(cs, ts, qemu_max)
        assert not fmt.qemu_can_open(cs, ts, qemu_max + 512)


def test_image_size_valid() -> None:
    assert fmt.image_size_valid(0, 65536, 4)
    assert fmt.image_size_valid(512, 65536, 4)
    assert not fmt.image_size_valid(513, 65536, 4)
    assert fmt.image_size_valid(64 * TiB, 65536, 4)
    assert not fmt.image_size_valid(64 * TiB + 512, 65536, 4)
    # Where QEMU overflows we still accept real sizes.
    assert fmt.image_size_valid(1 * GiB, 64 * MiB, 16)
