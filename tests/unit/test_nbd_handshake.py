"""The fixed-newstyle handshake (``qednbd.nbd.handshake``), driven by a tiny client-side encoder.

Every expectation is a byte layout from the NBD spec (``/work/shared/reference/nbd.md`` §1.2–1.5
and §2), written here with independent ``struct`` formats rather than the package's own structs,
so an encoding mistake in the package cannot cancel out in the test.
"""

from __future__ import annotations

import itertools
import struct
import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qednbd.errors import ConfigError
from qednbd.nbd import handshake as hs
from qednbd.nbd.constants import BASE_ALLOCATION, QEMU_ALLOCATION_DEPTH
from qednbd.nbd.handshake import (
    MAX_OPTION_BYTES,
    MAX_OPTIONS,
    NEED_DATA,
    Closed,
    ExportInfo,
    HandshakeState,
    MetaContext,
    Ready,
    ServerHandshake,
    StateError,
    StaticCatalog,
)

MiB = 1 << 20
IHAVEOPT = 0x49484156454F5054
REPLY_MAGIC = 0x3E889045565A9
GREETING = b"NBDMAGIC" + b"IHAVEOPT" + b"\x00\x03"  # FIXED_NEWSTYLE | NO_ZEROES

# option numbers, reply types and info types, spelled out from the spec
EXPORT_NAME, ABORT, LIST, PEEK, STARTTLS, INFO, GO, SR, LIST_META, SET_META, EXT = range(1, 12)
ACK, SERVER, REP_INFO, META = 1, 2, 3, 4
ERR = 1 << 31
ERR_UNSUP, ERR_INVALID, ERR_UNKNOWN, ERR_SHUTDOWN, ERR_EXT_HEADER_REQD = (
    ERR | 1,
    ERR | 3,
    ERR | 6,
    ERR | 7,
    ERR | 10,
)
I_EXPORT, I_NAME, I_DESCRIPTION, I_BLOCK_SIZE = range(4)
C_FIXED, C_NO_ZEROES = 1, 2

# transmission flags a default export advertises: HAS_FLAGS FLUSH FUA TRIM WRITE_ZEROES
# MULTI_CONN CACHE FAST_ZERO (+ SEND_DF 0x80 once structured replies are negotiated)
FLAGS_SIMPLE = 0x0D6D
FLAGS_STRUCTURED = 0x0DED  # what qemu-nbd 7.2 advertises for a writable QED export

DISK = ExportInfo("disk", 64 * MiB, description="the demo disk", min_block_size=512)
RO = ExportInfo("ro", 1 * MiB, read_only=True, meta_contexts=(BASE_ALLOCATION,))
CATALOG = StaticCatalog([DISK, RO], default="disk")


# --- a tiny client ----------------------------------------------------------------------------


def opt(option: int, data: bytes = b"", magic: int = IHAVEOPT) -> bytes:
    return struct.pack(">QII", magic, option, len(data)) + data


def info_data(name: bytes, infos: tuple[int, ...] = ()) -> bytes:
    return struct.pack(">I", len(name)) + name + struct.pack(f">H{len(infos)}H", len(infos), *infos)


def meta_data(name: bytes, queries: tuple[bytes, ...] = ()) -> bytes:
    body = b"".join(struct.pack(">I", len(q)) + q for q in queries)
    return struct.pack(">I", len(name)) + name + struct.pack(">I", len(queries)) + body


def parse_replies(data: bytes) -> list[tuple[int, int, bytes]]:
    """Option replies → [(option, reply type, payload)]; the stream must hold whole replies."""
    replies, pos = [], 0
    while pos < len(data):
        magic, option, reply, length = struct.unpack_from(">QIII", data, pos)
        assert magic == REPLY_MAGIC
        pos += 20
        replies.append((option, reply, data[pos : pos + length]))
        pos += length
    assert pos == len(data)
    return replies


def run(stream: bytes, catalog: StaticCatalog = CATALOG, pieces: list[int] | None = None):
    """Feed ``stream`` (cut at ``pieces``); return (bytes sent after the greeting, last event, h)."""
    h = ServerHandshake(catalog)
    assert h.data_to_send() == GREETING
    cuts = [0, *sorted(set(pieces or [])), len(stream)]
    out, event = b"", NEED_DATA
    for start, end in itertools.pairwise(cuts):
        if start == end:
            continue
        h.receive_data(stream[start:end])
        event = h.next_event()
        out += h.data_to_send()
        if event is not NEED_DATA:
            break
    return out, event, h


def negotiate(*options: bytes, flags: int = C_FIXED | C_NO_ZEROES) -> tuple[list, object, ServerHandshake]:
    out, event, h = run(struct.pack(">I", flags) + b"".join(options))
    return parse_replies(out), event, h


def error_codes(replies: list[tuple[int, int, bytes]]) -> list[int]:
    return [reply for _, reply, _ in replies]


# --- greeting and client flags ----------------------------------------------------------------


def test_greeting_is_queued_at_construction_and_sent_once():
    h = ServerHandshake(CATALOG)
    assert h.data_to_send() == GREETING
    assert h.data_to_send() == b""
    assert h.next_event() is NEED_DATA
    assert h.state is HandshakeState.CLIENT_FLAGS


@pytest.mark.parametrize("bit", [2, 3, 8, 16, 31])
def test_unknown_client_flag_closes_without_a_reply(bit):
    out, event, h = run(struct.pack(">I", C_FIXED | (1 << bit)) + opt(LIST))
    assert isinstance(event, Closed) and not event.graceful
    assert "unknown handshake flags" in event.reason
    assert out == b""
    assert h.state is HandshakeState.CLOSED


def test_client_without_fixed_newstyle_may_only_send_export_name():
    out, event, _ = run(struct.pack(">I", 0) + opt(GO, info_data(b"disk")))
    assert isinstance(event, Closed) and out == b""
    out, event, _ = run(struct.pack(">I", 0) + opt(EXPORT_NAME, b"disk"))
    assert isinstance(event, Ready)
    assert out == struct.pack(">QH", DISK.size, FLAGS_SIMPLE) + bytes(124)


# --- EXPORT_NAME ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "zeroes"), [(C_FIXED, 124), (C_FIXED | C_NO_ZEROES, 0), (C_NO_ZEROES, 0), (0, 124)]
)
def test_export_name_reply_layout(flags, zeroes):
    out, event, h = run(struct.pack(">I", flags) + opt(EXPORT_NAME, b"disk"))
    assert out == struct.pack(">QH", 64 * MiB, FLAGS_SIMPLE) + bytes(zeroes)
    assert isinstance(event, Ready)
    assert event.export is DISK and event.option == EXPORT_NAME
    assert event.transmission_flags == FLAGS_SIMPLE
    assert event.negotiated.no_zeroes == bool(flags & C_NO_ZEROES)
    assert not event.negotiated.block_size_requested
    assert h.state is HandshakeState.READY


def test_export_name_empty_selects_the_default_export():
    out, event, _ = run(struct.pack(">I", C_FIXED | C_NO_ZEROES) + opt(EXPORT_NAME, b""))
    assert isinstance(event, Ready) and event.export.name == "disk"
    assert out == struct.pack(">QH", DISK.size, FLAGS_SIMPLE)


def test_export_name_read_only_export_sets_read_only_flag():
    out, event, _ = run(struct.pack(">I", C_FIXED | C_NO_ZEROES) + opt(EXPORT_NAME, b"ro"))
    assert out == struct.pack(">QH", 1 * MiB, FLAGS_SIMPLE | 0x2)
    assert isinstance(event, Ready) and event.transmission_flags & 0x2


@pytest.mark.parametrize(
    "name",
    [b"nope", b"\xff\xfe", b"di\x00sk", b"x" * 4097],
    ids=["unknown", "not-utf8", "nul", "too-long"],
)
def test_export_name_that_cannot_be_served_closes_without_reply(name):
    out, event, _ = run(struct.pack(">I", C_FIXED) + opt(EXPORT_NAME, name))
    assert isinstance(event, Closed) and not event.graceful
    assert out == b""


def test_export_name_after_structured_reply_advertises_df():
    replies, event, _ = negotiate(opt(SR))
    assert error_codes(replies) == [ACK]
    out, event, _ = run(struct.pack(">I", C_FIXED | C_NO_ZEROES) + opt(SR) + opt(EXPORT_NAME, b"disk"))
    assert out[20:] == struct.pack(">QH", DISK.size, FLAGS_STRUCTURED)
    assert isinstance(event, Ready) and event.negotiated.structured_replies


def test_export_name_after_extended_headers_closes():
    replies, event, _ = negotiate(opt(EXT), opt(EXPORT_NAME, b"disk"))
    assert error_codes(replies) == [ACK]
    assert isinstance(event, Closed)


# --- ABORT, LIST, STARTTLS, unknown options -----------------------------------------------------


@pytest.mark.parametrize("data", [b"", b"ignored"])
def test_abort_acks_then_closes_gracefully(data):
    replies, event, h = negotiate(opt(ABORT, data))
    assert replies == [(ABORT, ACK, b"")]
    assert isinstance(event, Closed) and event.graceful
    assert h.state is HandshakeState.CLOSED


def test_list_sends_one_server_reply_per_export_with_description_then_ack():
    replies, event, _ = negotiate(opt(LIST))
    assert event is NEED_DATA
    assert replies == [
        (LIST, SERVER, struct.pack(">I", 4) + b"disk" + b"the demo disk"),
        (LIST, SERVER, struct.pack(">I", 2) + b"ro"),
        (LIST, ACK, b""),
    ]


def test_list_with_data_is_invalid_and_negotiation_continues():
    replies, event, _ = negotiate(opt(LIST, b"x"), opt(LIST))
    assert error_codes(replies) == [ERR_INVALID, SERVER, SERVER, ACK]
    assert event is NEED_DATA


def test_reply_batch_leaves_in_one_chunk():
    # All replies to one option come out of a single data_to_send(), contiguously.
    h = ServerHandshake(CATALOG)
    h.data_to_send()
    h.receive_data(struct.pack(">I", C_FIXED) + opt(LIST))
    assert h.next_event() is NEED_DATA
    chunk = h.data_to_send()
    assert error_codes(parse_replies(chunk)) == [SERVER, SERVER, ACK]
    assert h.data_to_send() == b""


@pytest.mark.parametrize(("data", "reply"), [(b"", ERR_UNSUP), (b"x", ERR_INVALID)])
def test_starttls_is_refused_in_notls_mode(data, reply):
    replies, _, _ = negotiate(opt(STARTTLS, data), opt(LIST))
    assert replies[0][:2] == (STARTTLS, reply)
    assert error_codes(replies[1:]) == [SERVER, SERVER, ACK]


@pytest.mark.parametrize("option", [PEEK, 12, 99, 0x7FFFFFFF, 0xFFFFFFFF])
def test_unknown_option_is_unsupported_and_its_data_skipped(option):
    replies, event, _ = negotiate(opt(option, b"\x00" * 37 + opt(LIST)), opt(LIST))
    # the embedded "option" inside the unknown option's data must not be parsed
    assert replies[0][:2] == (option, ERR_UNSUP)
    assert error_codes(replies[1:]) == [SERVER, SERVER, ACK]
    assert event is NEED_DATA


def test_error_replies_carry_a_utf8_message():
    replies, _, _ = negotiate(opt(INFO, info_data(b"nope")))
    (_, reply, message) = replies[0]
    assert reply == ERR_UNKNOWN
    assert b"nope" in message
    message.decode("utf-8")


# --- INFO and GO ------------------------------------------------------------------------------


def test_info_for_unknown_export_sends_no_info_and_continues():
    replies, event, _ = negotiate(opt(INFO, info_data(b"nope", (I_NAME,))), opt(GO, info_data(b"ro")))
    assert error_codes(replies[:1]) == [ERR_UNKNOWN]
    assert isinstance(event, Ready) and event.export is RO


def test_go_for_unknown_export_is_an_error_not_a_close():
    replies, event, h = negotiate(opt(GO, info_data(b"nope")))
    assert error_codes(replies) == [ERR_UNKNOWN]
    assert event is NEED_DATA and h.state is HandshakeState.OPTION_HEADER


def test_info_replies_exact_layout():
    requests = (I_NAME, I_DESCRIPTION, I_BLOCK_SIZE, 77)  # 77: unknown, ignored
    replies, event, _ = negotiate(opt(INFO, info_data(b"", requests)))
    assert event is NEED_DATA
    assert replies == [
        (INFO, REP_INFO, struct.pack(">HQH", I_EXPORT, 64 * MiB, FLAGS_SIMPLE)),
        (INFO, REP_INFO, struct.pack(">H", I_NAME) + b"disk"),
        (INFO, REP_INFO, struct.pack(">H", I_DESCRIPTION) + b"the demo disk"),
        (INFO, REP_INFO, struct.pack(">HIII", I_BLOCK_SIZE, 512, 4096, 32 * MiB)),
        (INFO, ACK, b""),
    ]


def test_info_without_requests_still_sends_info_export():
    replies, _, _ = negotiate(opt(INFO, info_data(b"ro")))
    assert replies == [
        (INFO, REP_INFO, struct.pack(">HQH", I_EXPORT, 1 * MiB, FLAGS_SIMPLE | 0x2)),
        (INFO, ACK, b""),
    ]


def test_description_is_omitted_when_the_export_has_none():
    replies, _, _ = negotiate(opt(INFO, info_data(b"ro", (I_DESCRIPTION,))))
    assert error_codes(replies) == [REP_INFO, ACK]


def test_repeated_info_requests_are_answered_once():
    replies, _, _ = negotiate(opt(INFO, info_data(b"disk", (I_NAME, I_NAME, I_EXPORT))))
    assert [payload[:2] for _, _, payload in replies[:-1]] == [b"\x00\x00", b"\x00\x01"]


def test_info_then_go_give_the_same_information_and_go_enters_transmission():
    data = info_data(b"disk", (I_BLOCK_SIZE, I_NAME))
    replies, event, h = negotiate(opt(SR), opt(INFO, data), opt(GO, data), b"early request")
    info_replies = [(r, p) for o, r, p in replies if o == INFO]
    go_replies = [(r, p) for o, r, p in replies if o == GO]
    assert info_replies == go_replies
    assert go_replies[-1] == (ACK, b"")
    assert go_replies[0] == (REP_INFO, struct.pack(">HQH", I_EXPORT, DISK.size, FLAGS_STRUCTURED))
    assert isinstance(event, Ready)
    assert event.option == GO and event.transmission_flags == FLAGS_STRUCTURED
    assert event.negotiated.block_size_requested
    assert h.trailing_data == b"early request"


def test_go_without_block_size_request_does_not_bind_the_client():
    _, event, _ = negotiate(opt(GO, info_data(b"disk", (I_NAME,))))
    assert isinstance(event, Ready) and not event.negotiated.block_size_requested


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00\x00\x00\x00\x00",  # shorter than 6
        struct.pack(">I", 5) + b"disk" + b"\x00\x00",  # name length > option length - 6
        struct.pack(">I", 0xFFFFFFFF) + b"\x00\x00",  # absurd name length
        struct.pack(">I", 4097) + b"x" * 4097 + b"\x00\x00",  # name > 4096 bytes
        struct.pack(">I", 4) + b"disk" + struct.pack(">HH", 2, I_NAME),  # fewer requests than counted
        struct.pack(">I", 4) + b"disk" + struct.pack(">HHH", 1, I_NAME, I_NAME),  # more than counted
        struct.pack(">I", 2) + b"\xff\xfe" + struct.pack(">H", 0),  # name not UTF-8
    ],
    ids=["empty", "short", "name-past-end", "absurd-name", "name-4097", "few", "many", "utf8"],
)
@pytest.mark.parametrize("option", [INFO, GO])
def test_malformed_info_and_go_are_invalid_and_negotiation_continues(option, data):
    replies, event, _ = negotiate(opt(option, data), opt(GO, info_data(b"ro")))
    assert replies[0][:2] == (option, ERR_INVALID)
    assert isinstance(event, Ready) and event.export is RO


def test_name_of_exactly_4096_bytes_is_looked_up():
    long_name = "n" * 4096
    catalog = StaticCatalog([ExportInfo(long_name, 4096)])
    _, event, _ = run(struct.pack(">I", C_FIXED) + opt(GO, info_data(long_name.encode())), catalog)
    assert isinstance(event, Ready) and event.export.name == long_name


# --- STRUCTURED_REPLY and EXTENDED_HEADERS ----------------------------------------------------


def test_structured_reply_once_then_invalid():
    replies, _, _ = negotiate(opt(SR, b"x"), opt(SR), opt(SR))
    assert error_codes(replies) == [ERR_INVALID, ACK, ERR_INVALID]


def test_extended_headers_take_precedence_over_structured_replies():
    replies, event, _ = negotiate(opt(SR), opt(EXT), opt(EXT), opt(EXT, b"x"), opt(GO, info_data(b"disk")))
    assert error_codes(replies) == [ACK, ACK, ERR_INVALID, ERR_INVALID, REP_INFO, ACK]
    assert isinstance(event, Ready)
    assert event.negotiated.extended_headers and event.negotiated.structured_replies
    assert event.transmission_flags == FLAGS_STRUCTURED  # DF is allowed: replies are chunked


def test_structured_reply_after_extended_headers_is_refused():
    replies, event, _ = negotiate(opt(EXT), opt(SR), opt(GO, info_data(b"disk")))
    assert error_codes(replies) == [ACK, ERR_EXT_HEADER_REQD, REP_INFO, ACK]
    assert isinstance(event, Ready) and not event.negotiated.structured_replies


def test_go_without_structured_replies_does_not_advertise_df():
    _, event, _ = negotiate(opt(GO, info_data(b"disk")))
    assert isinstance(event, Ready)
    assert event.transmission_flags == FLAGS_SIMPLE
    assert not event.transmission_flags & 0x80


def test_fast_zero_is_not_advertised_without_write_zeroes_and_unsupported_flags_never():
    export = ExportInfo("x", 4096, flags=hs.TransmissionFlag.SEND_FAST_ZERO | hs.TransmissionFlag.SEND_RESIZE)
    assert export.transmission_flags(structured=True) == 0x1


# --- meta contexts ----------------------------------------------------------------------------


def meta_names(replies, option):
    return [
        (struct.unpack(">I", p[:4])[0], p[4:].decode()) for o, r, p in replies if o == option and r == META
    ]


@pytest.mark.parametrize("option", [LIST_META, SET_META])
def test_meta_context_options_need_structured_replies(option):
    replies, _, _ = negotiate(opt(option, meta_data(b"disk", (b"base:allocation",))))
    assert error_codes(replies) == [ERR_INVALID]


@pytest.mark.parametrize(
    ("queries", "expected"),
    [
        ((), [BASE_ALLOCATION, QEMU_ALLOCATION_DEPTH]),  # zero queries: everything
        ((b"base:",), [BASE_ALLOCATION]),
        ((b"qemu:",), [QEMU_ALLOCATION_DEPTH]),
        ((b"qemu:allocation-depth", b"base:allocation"), [BASE_ALLOCATION, QEMU_ALLOCATION_DEPTH]),
        ((b"base:allocation", b"base:allocation"), [BASE_ALLOCATION]),
        ((b"x-other:thing", b"base:nothing", b"nocolon", b"qemu:dirty-bitmap:"), []),
    ],
    ids=["all", "base-wildcard", "qemu-wildcard", "both", "dup", "ignored"],
)
def test_list_meta_context(queries, expected):
    replies, event, _ = negotiate(opt(SR), opt(LIST_META, meta_data(b"disk", queries)))
    assert meta_names(replies, LIST_META) == [(0, name) for name in expected]  # LIST ids are 0
    assert replies[-1] == (LIST_META, ACK, b"")
    assert event is NEED_DATA


def test_list_meta_context_reflects_the_exports_own_contexts():
    replies, _, _ = negotiate(opt(EXT), opt(LIST_META, meta_data(b"ro")))
    assert meta_names(replies, LIST_META) == [(0, BASE_ALLOCATION)]


@pytest.mark.parametrize(
    ("queries", "expected"),
    [
        ((b"base:allocation",), [(1, BASE_ALLOCATION)]),
        ((b"qemu:allocation-depth", b"base:allocation"), [(1, BASE_ALLOCATION), (2, QEMU_ALLOCATION_DEPTH)]),
        ((b"base:",), []),  # wildcards select nothing in SET
        ((b"qemu:",), []),
        ((), []),  # zero queries select nothing
    ],
    ids=["base", "both", "base-wildcard", "qemu-wildcard", "none"],
)
def test_set_meta_context_then_go_carries_the_contexts(queries, expected):
    replies, event, _ = negotiate(
        opt(SR), opt(SET_META, meta_data(b"disk", queries)), opt(GO, info_data(b"disk"))
    )
    selected = meta_names(replies, SET_META)
    assert selected == expected
    assert len({context_id for context_id, _ in selected}) == len(selected)  # unique ids
    assert isinstance(event, Ready)
    assert event.negotiated.meta_contexts == tuple(MetaContext(i, n) for i, n in expected)


def test_set_meta_context_for_the_default_name_counts_for_the_canonical_export():
    _, event, _ = negotiate(
        opt(SR), opt(SET_META, meta_data(b"", (b"base:allocation",))), opt(GO, info_data(b"disk"))
    )
    assert isinstance(event, Ready)
    assert event.negotiated.meta_contexts == (MetaContext(1, BASE_ALLOCATION),)


def test_contexts_set_for_another_export_are_dropped_at_go():
    _, event, _ = negotiate(
        opt(SR), opt(SET_META, meta_data(b"ro", (b"base:allocation",))), opt(GO, info_data(b"disk"))
    )
    assert isinstance(event, Ready) and event.negotiated.meta_contexts == ()


def test_failed_set_meta_context_still_replaces_the_selection():
    good = opt(SET_META, meta_data(b"disk", (b"base:allocation",)))
    for bad in (opt(SET_META, meta_data(b"nope", (b"base:allocation",))), opt(SET_META, b"\x00")):
        replies, event, _ = negotiate(opt(SR), good, bad, opt(GO, info_data(b"disk")))
        assert error_codes(replies)[:4] in ([ACK, META, ACK, ERR_UNKNOWN], [ACK, META, ACK, ERR_INVALID])
        assert isinstance(event, Ready) and event.negotiated.meta_contexts == ()


def test_list_meta_context_does_not_change_the_selection():
    _, event, _ = negotiate(
        opt(SR),
        opt(SET_META, meta_data(b"disk", (b"base:allocation",))),
        opt(LIST_META, meta_data(b"disk")),
        opt(GO, info_data(b"disk")),
    )
    assert isinstance(event, Ready) and event.negotiated.meta_contexts == (MetaContext(1, BASE_ALLOCATION),)


def test_meta_context_for_unknown_export():
    replies, _, _ = negotiate(opt(SR), opt(LIST_META, meta_data(b"nope")))
    assert error_codes(replies) == [ACK, ERR_UNKNOWN]


@pytest.mark.parametrize(
    "data",
    [
        b"\x00" * 7,  # shorter than 8
        struct.pack(">I", 9) + b"disk" + struct.pack(">I", 0),  # name past the end
        struct.pack(">I", 4097) + b"x" * 4097 + struct.pack(">I", 0),  # name > 4096
        struct.pack(">I", 4) + b"disk" + struct.pack(">I", 0xFFFFFFFF),  # absurd query count
        struct.pack(">I", 4) + b"disk" + struct.pack(">II", 1, 50) + b"base:",  # query past the end
        struct.pack(">I", 4) + b"disk" + struct.pack(">II", 2, 5) + b"base:" + b"\x00\x00",  # truncated len
        meta_data(b"disk", (b"base:allocation",)) + b"junk",  # trailing bytes
        meta_data(b"disk", (b"\xff:",)),  # query not UTF-8
        meta_data(b"disk", (b"x:" + b"y" * 4095,)),  # query > 4096
    ],
    ids=[
        "short",
        "name-past-end",
        "name-4097",
        "count",
        "query-past-end",
        "len-cut",
        "trailing",
        "utf8",
        "long",
    ],
)
@pytest.mark.parametrize("option", [LIST_META, SET_META])
def test_malformed_meta_context_requests_are_invalid(option, data):
    replies, event, _ = negotiate(opt(SR), opt(option, data), opt(LIST))
    assert error_codes(replies) == [ACK, ERR_INVALID, SERVER, SERVER, ACK]
    assert event is NEED_DATA


# --- framing errors and bounds ----------------------------------------------------------------


def test_bad_option_magic_closes():
    out, event, _ = run(struct.pack(">I", C_FIXED) + opt(LIST, magic=0x49484156454F5055))
    assert isinstance(event, Closed) and "magic" in event.reason and out == b""


@pytest.mark.parametrize("length", [MAX_OPTION_BYTES + 1, 0xFFFFFFFF])
def test_oversize_option_closes_at_the_header_without_buffering(length):
    tracemalloc.start()
    try:
        h = ServerHandshake(CATALOG)
        h.receive_data(struct.pack(">I", C_FIXED) + struct.pack(">QII", IHAVEOPT, LIST, length))
        event = h.next_event()  # decided from the header alone: no data was sent
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert isinstance(event, Closed) and str(length) in event.reason
    assert peak < 256 * 1024


def test_option_of_exactly_the_maximum_length_is_accepted():
    replies, _, _ = negotiate(opt(77, bytes(MAX_OPTION_BYTES)), opt(LIST))
    assert error_codes(replies) == [ERR_UNSUP, SERVER, SERVER, ACK]


def test_option_count_is_bounded():
    replies, event, _ = negotiate(*[opt(SR)] * MAX_OPTIONS)
    assert event is NEED_DATA and len(replies) == MAX_OPTIONS
    replies, event, _ = negotiate(*[opt(SR)] * MAX_OPTIONS, opt(GO, info_data(b"disk")))
    assert isinstance(event, Closed) and len(replies) == MAX_OPTIONS


def test_shutdown_errors_options_but_still_acks_abort():
    h = ServerHandshake(CATALOG)
    h.data_to_send()
    h.begin_shutdown()
    h.receive_data(struct.pack(">I", C_FIXED) + opt(LIST) + opt(GO, info_data(b"disk")) + opt(ABORT))
    event = h.next_event()
    assert error_codes(parse_replies(h.data_to_send())) == [ERR_SHUTDOWN, ERR_SHUTDOWN, ACK]
    assert isinstance(event, Closed) and event.graceful


def test_end_of_stream_between_options_is_graceful_and_inside_one_is_not():
    h = ServerHandshake(CATALOG)
    h.receive_data(struct.pack(">I", C_FIXED) + opt(SR))
    assert h.next_event() is NEED_DATA
    h.receive_data(b"")
    event = h.next_event()
    assert isinstance(event, Closed) and event.graceful
    for partial in (
        b"\x00\x00",
        struct.pack(">I", C_FIXED) + opt(LIST)[:9],
        struct.pack(">I", 1) + opt(77, b"ab")[:-1],
    ):
        h = ServerHandshake(CATALOG)
        h.receive_data(partial)
        assert h.next_event() is NEED_DATA
        h.receive_data(b"")
        event = h.next_event()
        assert isinstance(event, Closed) and not event.graceful


def test_misuse_after_a_terminal_event_raises_naming_the_state():
    _, event, h = negotiate(opt(GO, info_data(b"disk")))
    assert isinstance(event, Ready)
    with pytest.raises(StateError, match="READY"):
        h.receive_data(b"x")
    with pytest.raises(StateError, match="READY"):
        h.next_event()
    fresh = ServerHandshake(CATALOG)
    with pytest.raises(StateError):
        _ = fresh.trailing_data
    fresh.receive_data(b"")
    with pytest.raises(StateError):
        fresh.receive_data(b"more")


def test_options_after_the_terminal_one_are_left_for_transmission():
    replies, _, h = negotiate(opt(GO, info_data(b"disk")), opt(LIST))
    assert error_codes(replies) == [REP_INFO, ACK]
    assert h.trailing_data == opt(LIST)


# --- whole vs byte-by-byte --------------------------------------------------------------------

SESSION = (
    struct.pack(">I", C_FIXED | C_NO_ZEROES)
    + opt(LIST)
    + opt(99, b"unknown data")
    + opt(SR)
    + opt(LIST_META, meta_data(b"disk"))
    + opt(SET_META, meta_data(b"disk", (b"base:allocation", b"qemu:allocation-depth")))
    + opt(INFO, info_data(b"nope"))
    + opt(INFO, info_data(b"disk", (I_NAME, I_DESCRIPTION, I_BLOCK_SIZE)))
    + opt(STARTTLS)
    + opt(GO, info_data(b"disk", (I_BLOCK_SIZE,)))
    + b"\x25\x60\x95\x13 trailing"
)


def summarize(stream: bytes, pieces: list[int] | None = None):
    """Output, terminal event, state, and every byte left for the transmission phase."""
    h = ServerHandshake(CATALOG)
    out = h.data_to_send()
    cuts = [0, *sorted(set(pieces or [])), len(stream)]
    event, rest = NEED_DATA, b""
    for start, end in itertools.pairwise(cuts):
        if start < end:
            h.receive_data(stream[start:end])
        event = h.next_event()
        out += h.data_to_send()
        if event is not NEED_DATA:
            rest = stream[end:]
            break
    return out, event, h.state, h.trailing_data + rest


def test_session_whole_matches_byte_by_byte():
    whole = summarize(SESSION)
    assert isinstance(whole[1], Ready)
    assert len(whole[1].negotiated.meta_contexts) == 2
    assert whole[3] == b"\x25\x60\x95\x13 trailing"
    assert summarize(SESSION, pieces=list(range(len(SESSION)))) == whole


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(0, len(SESSION)), max_size=40))
def test_session_is_independent_of_chunk_boundaries(cuts):
    assert summarize(SESSION, pieces=cuts) == summarize(SESSION)


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=300), st.lists(st.integers(0, 300), max_size=20))
def test_garbage_never_crashes_and_is_chunking_independent(garbage, cuts):
    # Arbitrary client bytes: only NEED_DATA, Ready or Closed come out, identically however cut.
    stream = struct.pack(">I", C_FIXED) + garbage
    whole = run(stream)
    assert whole[1] is NEED_DATA or isinstance(whole[1], (Ready, Closed))
    cut = run(stream, pieces=[c for c in cuts if c <= len(stream)])
    assert (cut[0], cut[1], cut[2].state) == (whole[0], whole[1], whole[2].state)


# --- export values ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"size": -1},
        {"size": 1 << 64},
        {"min_block_size": 3},
        {"min_block_size": 128 * 1024},
        {"preferred_block_size": 256},
        {"min_block_size": 8192, "preferred_block_size": 4096},
        {"max_payload_size": 2048},
        {"max_payload_size": 1 << 32},
        {"min_block_size": 4096, "max_payload_size": 4096 * 3 + 512},
        {"name": "x" * 4097},
        {"description": "a\0b"},
        {"meta_contexts": ("nonamespace",)},
    ],
)
def test_export_info_rejects_values_the_protocol_cannot_carry(kwargs):
    values = {"name": "x", "size": 4096, **kwargs}
    with pytest.raises(ConfigError):
        ExportInfo(**values)


def test_export_info_accepts_no_payload_limit():
    assert ExportInfo("x", 0, max_payload_size=0xFFFFFFFF).max_payload_size == 0xFFFFFFFF


def test_static_catalog_default_must_exist():
    with pytest.raises(ConfigError):
        StaticCatalog([DISK], default="nope")
    assert StaticCatalog([DISK]).lookup("") is None


# --- TLS (STARTTLS, TlsMode) --------------------------------------------------------------------

ERR_TLS_REQD = ERR | 5
SECRET = ExportInfo("secret", 2 * MiB, tls_only=True)
TLS_CATALOG = StaticCatalog([DISK, SECRET], default="disk")


def tls_run(mode: hs.TlsMode, *options: bytes, catalog: StaticCatalog = TLS_CATALOG):
    """Negotiate ``options``; returns (replies, last event, handshake)."""
    h = ServerHandshake(catalog, tls=mode)
    h.data_to_send()
    h.receive_data(struct.pack(">I", C_FIXED | C_NO_ZEROES) + b"".join(options))
    event = h.next_event()
    return parse_replies(h.data_to_send()), event, h


def after_tls(h: ServerHandshake, *options: bytes):
    h.tls_started()
    h.receive_data(b"".join(options))
    event = h.next_event()
    return parse_replies(h.data_to_send()), event


def test_starttls_acks_then_asks_the_server_to_upgrade():
    replies, event, h = tls_run(hs.TlsMode.REQUIRE, opt(STARTTLS))
    assert replies == [(STARTTLS, ACK, b"")]
    assert isinstance(event, hs.StartTls) and h.state is HandshakeState.TLS
    with pytest.raises(StateError):
        h.next_event()  # nothing to parse until the TLS handshake is done
    replies, event = after_tls(h, opt(GO, info_data(b"disk")))
    assert isinstance(event, Ready) and event.negotiated.tls
    assert error_codes(replies) == [REP_INFO, ACK]


def test_require_refuses_everything_but_starttls_and_abort_before_tls():
    replies, event, _ = tls_run(
        hs.TlsMode.REQUIRE, opt(LIST), opt(INFO, info_data(b"disk")), opt(GO, info_data(b"disk")), opt(SR)
    )
    assert error_codes(replies) == [ERR_TLS_REQD] * 4 and event is NEED_DATA
    _, event, _ = tls_run(hs.TlsMode.REQUIRE, opt(EXPORT_NAME, b"disk"))
    assert isinstance(event, Closed)  # EXPORT_NAME cannot carry the error
    replies, event, _ = tls_run(hs.TlsMode.REQUIRE, opt(ABORT))
    assert replies == [(ABORT, ACK, b"")] and isinstance(event, Closed) and event.graceful


def test_negotiation_before_starttls_is_forgotten():
    replies, event, h = tls_run(
        hs.TlsMode.ON, opt(SR), opt(SET_META, meta_data(b"disk", (b"base:allocation",))), opt(STARTTLS)
    )
    assert error_codes(replies) == [ACK, META, ACK, ACK] and isinstance(event, hs.StartTls)
    replies, event = after_tls(h, opt(GO, info_data(b"disk")))
    assert isinstance(event, Ready)
    assert not event.negotiated.structured_replies and event.negotiated.meta_contexts == ()
    assert event.transmission_flags == FLAGS_SIMPLE  # no SEND_DF without structured replies


def test_starttls_errors():
    replies, _, _ = tls_run(hs.TlsMode.OFF, opt(STARTTLS))
    assert error_codes(replies) == [ERR_UNSUP]
    replies, _, _ = tls_run(hs.TlsMode.ON, opt(STARTTLS, b"x"))
    assert error_codes(replies) == [ERR_INVALID]
    _, event, h = tls_run(hs.TlsMode.ON, opt(STARTTLS))
    replies, event = after_tls(h, opt(STARTTLS), opt(LIST))
    assert error_codes(replies)[0] == ERR_INVALID  # TLS is already up
    _, event, _ = tls_run(hs.TlsMode.ON, opt(STARTTLS) + b"\x16\x03\x01")  # bytes before our ACK
    assert isinstance(event, Closed)


def test_tls_only_exports_need_tls_in_on_mode():
    replies, event, _ = tls_run(
        hs.TlsMode.ON, opt(LIST), opt(INFO, info_data(b"secret")), opt(GO, info_data(b"disk"))
    )
    names = [
        payload[4 : 4 + struct.unpack(">I", payload[:4])[0]] for _, kind, payload in replies if kind == SERVER
    ]
    assert names == [b"disk"]  # the TLS-only export is not listed before TLS
    assert [r for r in error_codes(replies) if r & ERR] == [ERR_TLS_REQD]
    assert isinstance(event, Ready) and not event.negotiated.tls  # plaintext is fine for "disk"
    _, event, _ = tls_run(hs.TlsMode.ON, opt(EXPORT_NAME, b"secret"))
    assert isinstance(event, Closed)
    _, _, h = tls_run(hs.TlsMode.ON, opt(STARTTLS))
    replies, event = after_tls(h, opt(LIST), opt(GO, info_data(b"secret")))
    names = [
        payload[4 : 4 + struct.unpack(">I", payload[:4])[0]] for _, kind, payload in replies if kind == SERVER
    ]
    assert names == [b"disk", b"secret"]
    assert isinstance(event, Ready) and event.export is SECRET and event.negotiated.tls
