"""Transmission framing and reply encoding (``qednbd.nbd.transmission``).

Requests are built by a tiny client-side encoder with independent ``struct`` formats, and every
reply is checked byte for byte against the layouts of ``/work/shared/reference/nbd.md`` §1.7–1.9.
Three outcomes are kept apart: framing errors (terminal ``ProtocolViolation``), request errors
(a ``Request`` with an errno, stream still in sync), and valid requests.
"""

from __future__ import annotations

import itertools
import struct
import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qednbd.nbd.constants import BASE_ALLOCATION, QEMU_ALLOCATION_DEPTH
from qednbd.nbd.handshake import (
    DEFAULT_EXPORT_FLAGS,
    NEED_DATA,
    ExportInfo,
    MetaContext,
    Negotiated,
    Ready,
    StateError,
)
from qednbd.nbd.transmission import (
    MAX_REQUEST_BYTES,
    MAX_SKIPPED_PAYLOAD_BYTES,
    EndOfStream,
    ProtocolViolation,
    ReplyEncoder,
    ReplyMode,
    Request,
    Transmission,
    TransmissionState,
)

MiB = 1 << 20
REQUEST_MAGIC, EXTENDED_REQUEST_MAGIC = 0x25609513, 0x21E41C71
SIMPLE_MAGIC, STRUCTURED_MAGIC, EXTENDED_MAGIC = 0x67446698, 0x668E33EF, 0x6E8A278C
READ, WRITE, DISC, FLUSH, TRIM, CACHE, WRITE_ZEROES, BLOCK_STATUS, RESIZE = range(9)
FUA, NO_HOLE, DF, REQ_ONE, FAST_ZERO, PAYLOAD_LEN = (1 << i for i in range(6))
EPERM, EIO, EINVAL, ENOSPC, EOVERFLOW = 1, 5, 22, 28, 75
SIZE = 64 * MiB
CONTEXTS = (MetaContext(1, BASE_ALLOCATION), MetaContext(2, QEMU_ALLOCATION_DEPTH))


def make_ready(
    *,
    size: int = SIZE,
    structured: bool = False,
    extended: bool = False,
    contexts: tuple[MetaContext, ...] = (),
    read_only: bool = False,
    block_size_requested: bool = False,
    min_block_size: int = 512,
    flags: int = DEFAULT_EXPORT_FLAGS,
) -> Ready:
    export = ExportInfo("disk", size, read_only=read_only, min_block_size=min_block_size, flags=flags)
    negotiated = Negotiated(structured, extended, contexts, block_size_requested)
    return Ready(export, export.transmission_flags(structured or extended), negotiated, 7)


# --- a tiny client ----------------------------------------------------------------------------


def req(command, offset=0, length=0, cookie=1, flags=0, payload=b"", magic=REQUEST_MAGIC) -> bytes:
    return struct.pack(">IHHQQI", magic, flags, command, cookie, offset, length) + payload


def ext_req(
    command, offset=0, length=0, cookie=1, flags=0, payload=b"", magic=EXTENDED_REQUEST_MAGIC
) -> bytes:
    return struct.pack(">IHHQQQ", magic, flags, command, cookie, offset, length) + payload


def feed(t: Transmission, stream: bytes, pieces: list[int] | None = None) -> list:
    """Feed ``stream`` cut at ``pieces``, draining events after each piece; stop at a terminal one."""
    events: list = []
    cuts = [0, *sorted(set(pieces or [])), len(stream)]
    for start, end in itertools.pairwise(cuts):
        if start < end:
            t.receive_data(stream[start:end])
        for event in t.events():
            events.append(event)
            if not isinstance(event, Request) or event.command == DISC:
                return events
    return events


def one(stream: bytes, **kwargs) -> Request:
    events = feed(Transmission(make_ready(**kwargs)), stream)
    assert len(events) == 1 and isinstance(events[0], Request), events
    return events[0]


# --- framing ----------------------------------------------------------------------------------


def test_compact_request_fields_round_trip():
    r = one(req(READ, offset=4096, length=512, cookie=0xDEADBEEFCAFEF00D, flags=FUA))
    assert (r.cookie, r.command, r.flags, r.offset, r.length) == (0xDEADBEEFCAFEF00D, READ, FUA, 4096, 512)
    assert r.payload is None and r.error == 0 and r.fua


def test_write_payload_is_delivered_and_the_next_request_follows():
    t = Transmission(make_ready())
    events = feed(t, req(WRITE, 512, 5, cookie=7, payload=b"hello") + req(FLUSH, cookie=8))
    assert [(e.command, e.cookie, e.payload, e.error) for e in events] == [
        (WRITE, 7, b"hello", 0),
        (FLUSH, 8, None, 0),
    ]
    assert t.next_event() is NEED_DATA and t.state is TransmissionState.HEADER


def test_need_data_for_partial_header_and_partial_payload():
    t = Transmission(make_ready())
    stream = req(WRITE, 0, 4, payload=b"abcd")
    t.receive_data(stream[:27])
    assert t.next_event() is NEED_DATA and t.state is TransmissionState.HEADER
    t.receive_data(stream[27:30])
    assert t.next_event() is NEED_DATA and t.state is TransmissionState.PAYLOAD
    t.receive_data(stream[30:])
    event = t.next_event()
    assert isinstance(event, Request) and event.payload == b"abcd"


@pytest.mark.parametrize("magic", [0, 0x25609514, 0x12560953, EXTENDED_REQUEST_MAGIC, 0x67446698])
def test_bad_magic_is_a_protocol_violation(magic):
    t = Transmission(make_ready())
    events = feed(t, req(READ, 0, 512) + req(READ, 0, 512, magic=magic) + req(READ, 0, 512))
    assert isinstance(events[0], Request)
    assert isinstance(events[1], ProtocolViolation) and f"{magic:08x}" in events[1].reason
    assert len(events) == 2 and t.state is TransmissionState.CLOSED
    with pytest.raises(StateError, match="CLOSED"):
        t.next_event()
    with pytest.raises(StateError):
        t.receive_data(b"x")


def test_compact_magic_after_extended_headers_is_a_violation():
    t = Transmission(make_ready(extended=True))
    assert isinstance(feed(t, req(READ, 0, 512) + bytes(4))[0], ProtocolViolation)


def test_disc_ends_the_machine_and_later_bytes_are_ignored():
    t = Transmission(make_ready())
    events = feed(t, req(DISC, cookie=9) + req(READ, 0, 512) + b"garbage")
    assert len(events) == 1 and events[0].command == DISC and events[0].cookie == 9
    assert t.state is TransmissionState.CLOSED
    with pytest.raises(StateError):
        t.next_event()


def test_clean_end_of_stream_between_requests():
    t = Transmission(make_ready())
    t.receive_data(req(READ, 0, 512))
    t.receive_data(b"")
    events = list(t.events())
    assert isinstance(events[0], Request) and isinstance(events[1], EndOfStream)
    with pytest.raises(StateError):
        t.receive_data(b"")


@pytest.mark.parametrize(
    "stream",
    [
        req(READ, 0, 512)[:10],
        req(WRITE, 0, 8, payload=b"1234"),
        req(WRITE, 0, 8, flags=0x8000, payload=b"12"),
    ],
    ids=["header", "payload", "skipped-payload"],
)
def test_end_of_stream_inside_a_request_is_a_violation(stream):
    t = Transmission(make_ready())
    t.receive_data(stream)
    assert t.next_event() is NEED_DATA
    t.receive_data(b"")
    event = t.next_event()
    assert isinstance(event, ProtocolViolation) and "closed" in event.reason


# --- request errors: reply and go on ----------------------------------------------------------


@pytest.mark.parametrize(
    ("stream", "kwargs", "error"),
    [
        (req(9), {}, EINVAL),  # unknown command
        (req(0xFFFF, 0, 512), {}, EINVAL),
        (req(RESIZE, SIZE * 2), {}, EINVAL),  # never advertised
        (req(BLOCK_STATUS, 0, 512), {"structured": True}, EINVAL),  # no meta context selected
        (req(FLUSH), {"flags": 0}, EINVAL),  # FLUSH not advertised
        (req(TRIM, 0, 512), {"flags": 0}, EINVAL),
        (req(WRITE_ZEROES, 0, 512), {"flags": 0}, EINVAL),
        (req(CACHE, 0, 512), {"flags": 0}, EINVAL),
        (req(READ, 0, 512, flags=0x40), {}, EINVAL),  # undefined flag bit
        (req(READ, 0, 512, flags=0x8000), {}, EINVAL),
        (req(READ, 0, 512, flags=NO_HOLE), {}, EINVAL),  # defined flag, wrong command
        (req(READ, 0, 512, flags=DF), {}, EINVAL),  # DF without structured replies
        (req(READ, 0, 512, flags=REQ_ONE), {}, EINVAL),
        (req(WRITE_ZEROES, 0, 512, flags=FAST_ZERO), {"flags": DEFAULT_EXPORT_FLAGS & ~0x800}, EINVAL),
        (req(BLOCK_STATUS, 0, 512, flags=DF), {"structured": True, "contexts": CONTEXTS}, EINVAL),
        (req(TRIM, 0, 512, flags=PAYLOAD_LEN), {}, EINVAL),  # PAYLOAD_LEN needs extended headers
        (req(READ, 0, 0), {}, EINVAL),  # zero lengths
        (req(TRIM, 0, 0), {}, EINVAL),
        (req(WRITE_ZEROES, 0, 0), {}, EINVAL),
        (req(CACHE, 0, 0), {}, EINVAL),
        (req(BLOCK_STATUS, 0, 0), {"structured": True, "contexts": CONTEXTS}, EINVAL),
        (req(WRITE, 0, 0), {}, EINVAL),
        (req(READ, SIZE - 511, 512), {}, EINVAL),  # past the end
        (req(READ, SIZE, 1), {}, EINVAL),
        (req(READ, 2**64 - 1, 2**32 - 1), {}, EINVAL),  # would overflow 64 bits
        (req(TRIM, SIZE - 512, 1024), {}, EINVAL),
        (req(CACHE, SIZE, 512), {}, EINVAL),
        (req(BLOCK_STATUS, SIZE, 512), {"structured": True, "contexts": CONTEXTS}, EINVAL),
        (req(WRITE_ZEROES, SIZE - 512, 1024), {}, ENOSPC),
        (req(WRITE, SIZE, 3, payload=b"abc"), {}, ENOSPC),
        (req(WRITE, 0, 3, payload=b"abc"), {"read_only": True}, EPERM),
        (req(WRITE, 0, 3, flags=DF, payload=b"abc"), {"structured": True}, EINVAL),  # READ's flag
        (req(WRITE, 0, 3, flags=0x40, payload=b"abc"), {}, EINVAL),
        (req(TRIM, 0, 512), {"read_only": True}, EPERM),
        (req(WRITE_ZEROES, 0, 512), {"read_only": True}, EPERM),
        (req(WRITE, 1, 512, payload=bytes(512)), {"block_size_requested": True}, EINVAL),  # unaligned
        (req(READ, 0, 100), {"block_size_requested": True}, EINVAL),
        (req(READ, 0, MAX_REQUEST_BYTES + 512), {"size": 1 << 40}, EINVAL),  # too large to read
        (req(READ, 0, MAX_REQUEST_BYTES + 512, flags=DF), {"size": 1 << 40, "structured": True}, EOVERFLOW),
    ],
)
def test_invalid_request_gets_an_errno_and_the_stream_stays_in_sync(stream, kwargs, error):
    t = Transmission(make_ready(**kwargs))
    events = feed(
        t, stream + req(FLUSH, cookie=99) if "flags" not in kwargs else stream + req(READ, 0, 512, 99)
    )
    assert len(events) == 2, events
    assert events[0].error == error and events[0].message
    assert events[0].payload is None  # errored requests never carry data to execute
    assert events[1].cookie == 99 and events[1].error == 0


@pytest.mark.parametrize(
    ("stream", "kwargs"),
    [
        (req(READ, SIZE - 512, 512), {}),  # up to the very end
        (req(WRITE, SIZE - 3, 3, payload=b"end"), {}),
        (req(READ, 0, 512, flags=FUA), {}),  # FUA accepted on any command
        (req(FLUSH, 12345, 678, flags=FUA), {}),  # FLUSH ignores offset and length
        (req(CACHE, 0, 512, flags=FUA), {}),
        (req(READ, 0, 4096, flags=DF), {"structured": True}),
        (req(WRITE_ZEROES, 0, 4096, flags=FUA | NO_HOLE | FAST_ZERO), {}),
        (req(BLOCK_STATUS, 0, SIZE, flags=REQ_ONE), {"structured": True, "contexts": CONTEXTS}),
        (req(READ, 1, 100), {}),  # unaligned is fine unless the client asked for block sizes
        (req(READ, 0, 50_000_000), {}),  # ~50 MB, as nbd-tester-client's integrityhuge sends
        (req(READ, 0, 512), {"read_only": True}),
    ],
)
def test_valid_requests(stream, kwargs):
    request = one(stream, **kwargs)
    assert request.error == 0, request.message


def test_write_to_read_only_export_discards_the_payload():
    events = feed(
        Transmission(make_ready(read_only=True)), req(WRITE, 0, 4, payload=b"data") + req(READ, 0, 4)
    )
    assert (events[0].error, events[0].payload) == (EPERM, None)
    assert events[1].command == READ and events[1].error == 0


def test_disc_is_never_rejected():
    # No reply can carry an error for DISC, so it always ends the connection.
    request = one(req(DISC, offset=5, length=7, flags=0xFFFF))
    assert request.command == DISC and request.error == 0


# --- payload bounds ---------------------------------------------------------------------------


def test_write_above_the_advertised_maximum_but_within_the_served_one_is_accepted():
    data = bytes(range(256)) * (40 * MiB // 256)  # 40 MiB: above 32 MiB, below MAX_REQUEST_BYTES
    t = Transmission(make_ready())
    stream = req(WRITE, 0, len(data), payload=data)
    events = feed(t, stream, pieces=list(range(0, len(stream), 3 * MiB + 7)))
    assert len(events) == 1 and events[0].error == 0 and events[0].payload == data


def test_write_too_large_to_serve_is_skipped_without_buffering_and_answered_einval():
    length = MAX_REQUEST_BYTES + 1
    chunk = bytes(4 * MiB)
    t = Transmission(make_ready(size=1 << 40))
    t.receive_data(req(WRITE, 0, length, cookie=5))
    assert t.next_event() is NEED_DATA and t.state is TransmissionState.SKIP
    tracemalloc.start()
    try:
        sent = 0
        while sent < length:
            piece = memoryview(chunk)[: min(len(chunk), length - sent)]
            t.receive_data(piece)
            sent += len(piece)
            if sent < length:
                assert t.next_event() is NEED_DATA
        t.receive_data(req(READ, 0, 512, cookie=6))
        events = list(t.events())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [(e.cookie, e.error) for e in events] == [(5, EINVAL), (6, 0)]
    assert peak < 1 * MiB


@pytest.mark.parametrize("extended", [False, True])
def test_write_too_large_to_skip_is_a_violation_decided_from_the_header(extended):
    t = Transmission(make_ready(size=1 << 50, extended=extended))
    length = MAX_SKIPPED_PAYLOAD_BYTES + 1
    header = ext_req(WRITE, 0, length, flags=PAYLOAD_LEN) if extended else req(WRITE, 0, length)
    t.receive_data(header)
    event = t.next_event()
    assert isinstance(event, ProtocolViolation) and "too large to skip" in event.reason


def test_payload_limits_are_configurable():
    t = Transmission(make_ready(), max_request_bytes=8, max_skipped_payload_bytes=16)
    events = feed(
        t,
        req(WRITE, 0, 8, cookie=1, payload=bytes(8))
        + req(WRITE, 0, 9, cookie=2, payload=bytes(9))
        + req(READ, 0, 9, cookie=3)
        + req(WRITE, 0, 17, cookie=4),
    )
    assert [(e.cookie, e.error) for e in events[:3]] == [(1, 0), (2, EINVAL), (3, EINVAL)]
    assert isinstance(events[3], ProtocolViolation)


# --- extended headers -------------------------------------------------------------------------


def test_extended_request_has_64_bit_lengths():
    size = 1 << 42
    request = one(ext_req(TRIM, 1 << 20, size - (1 << 20), cookie=3), size=size, extended=True)
    assert (request.command, request.offset, request.length, request.error) == (
        TRIM,
        1 << 20,
        size - (1 << 20),
        0,
    )
    assert one(ext_req(WRITE_ZEROES, 0, size), size=size, extended=True).error == 0
    assert one(ext_req(TRIM, 0, size + 1), size=size, extended=True).error == EINVAL


@pytest.mark.parametrize("flags", [PAYLOAD_LEN, 0])
def test_extended_write_carries_its_payload_with_or_without_payload_len(flags):
    events = feed(
        Transmission(make_ready(extended=True)),
        ext_req(WRITE, 0, 3, flags=flags, payload=b"abc") + ext_req(READ, 0, 512, cookie=2),
    )
    assert [(e.command, e.payload, e.error) for e in events] == [(WRITE, b"abc", 0), (READ, None, 0)]


def test_extended_payload_on_a_command_that_takes_none_is_consumed_then_einval():
    ready = make_ready(extended=True, contexts=CONTEXTS)
    stream = ext_req(BLOCK_STATUS, 0, 12, flags=PAYLOAD_LEN, payload=bytes(12)) + ext_req(FLUSH, cookie=2)
    events = feed(Transmission(ready), stream)
    assert [(e.command, e.error) for e in events] == [(BLOCK_STATUS, EINVAL), (FLUSH, 0)]


# --- whole vs chunked, round trips ------------------------------------------------------------

request_fields = st.tuples(
    st.sampled_from([READ, WRITE, FLUSH, TRIM, CACHE, WRITE_ZEROES, BLOCK_STATUS, RESIZE, 11]),
    st.integers(0, 0xFFFF) | st.sampled_from([0, FUA, DF, NO_HOLE | FAST_ZERO, REQ_ONE]),
    st.integers(0, 2**64 - 1),  # cookie
    st.integers(0, SIZE + 4096) | st.integers(0, 2**64 - 1),  # offset
    st.integers(0, 600),  # length (WRITE payload length too)
)


def encode_stream(fields, extended: bool) -> bytes:
    stream = b""
    for command, flags, cookie, offset, length in fields:
        if extended:
            flags &= ~PAYLOAD_LEN  # a stray PAYLOAD_LEN would put a payload on any command
        payload = bytes((cookie + i) & 0xFF for i in range(length)) if command == WRITE else b""
        encode = ext_req if extended else req
        stream += encode(command, offset, length, cookie, flags, payload)
    return stream


@settings(max_examples=200, deadline=None)
@given(
    st.lists(request_fields, max_size=12),
    st.lists(st.integers(0, 40_000), max_size=30),
    st.booleans(),
    st.booleans(),
)
def test_events_are_independent_of_chunk_boundaries_and_fields_round_trip(fields, cuts, extended, structured):
    stream = encode_stream(fields, extended) + (ext_req if extended else req)(DISC)
    ready = make_ready(extended=extended, structured=structured, contexts=CONTEXTS)
    whole = feed(Transmission(ready), stream)
    chunked = feed(Transmission(ready), stream, pieces=[c for c in cuts if c <= len(stream)])
    bytewise = feed(Transmission(ready), stream, pieces=list(range(len(stream))))
    assert chunked == whole and bytewise == whole
    assert len(whole) == len(fields) + 1 and whole[-1].command == DISC
    for event, (command, flags, cookie, offset, length) in zip(whole, fields, strict=False):
        assert (event.command, event.cookie, event.offset, event.length) == (command, cookie, offset, length)
        assert event.flags == (flags & ~PAYLOAD_LEN if extended else flags)
        if event.error == 0 and command == WRITE:
            assert event.payload == bytes((cookie + i) & 0xFF for i in range(length))
        else:
            assert event.payload is None


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200), st.lists(st.integers(0, 200), max_size=10), st.booleans())
def test_garbage_yields_only_events_and_is_chunking_independent(garbage, cuts, extended):
    ready = make_ready(extended=extended, structured=True, contexts=CONTEXTS)
    whole = feed(Transmission(ready), garbage)
    assert feed(Transmission(ready), garbage, pieces=[c for c in cuts if c <= len(garbage)]) == whole
    assert all(isinstance(e, (Request, ProtocolViolation)) for e in whole)


# --- reply encoding ---------------------------------------------------------------------------

REQ = Request(cookie=0x0102030405060708, command=READ, flags=0, offset=0x1000, length=8)


def test_simple_replies():
    enc = ReplyEncoder(ReplyMode.SIMPLE)
    assert enc.ok(REQ) == struct.pack(">IIQ", SIMPLE_MAGIC, 0, REQ.cookie)
    assert enc.error(REQ, EIO, "ignored in simple mode") == struct.pack(">IIQ", SIMPLE_MAGIC, EIO, REQ.cookie)
    data = memoryview(b"12345678")
    buffers = enc.read_data(REQ, REQ.offset, data, done=True)
    assert buffers[0] == struct.pack(">IIQ", SIMPLE_MAGIC, 0, REQ.cookie)
    assert buffers[1] is data  # the payload is not copied
    with pytest.raises(ValueError):
        enc.read_data(REQ, REQ.offset, b"short", done=True)  # a simple reply carries the whole read
    for method in (enc.done, lambda r: enc.read_hole(r, 0, 512, done=True)):
        with pytest.raises(StateError):
            method(REQ)
    with pytest.raises(StateError):
        enc.block_status(REQ, 1, [(512, 0)], done=True)


def chunk(flags, type_, length, cookie=REQ.cookie):
    return struct.pack(">IHHQI", STRUCTURED_MAGIC, flags, type_, cookie, length)


def test_structured_chunks_byte_exact():
    enc = ReplyEncoder(ReplyMode.STRUCTURED)
    assert enc.ok(REQ) == struct.pack(">IIQ", SIMPLE_MAGIC, 0, REQ.cookie)  # allowed without payload
    assert enc.done(REQ) == chunk(1, 0, 0)
    data = bytearray(b"abcdefgh")
    head, body = enc.read_data(REQ, 0x1000, data, done=False)
    assert head == chunk(0, 1, 16) + struct.pack(">Q", 0x1000) and body is data
    assert enc.read_hole(REQ, 0x2000, 0x10000, done=True) == chunk(1, 2, 12) + struct.pack(
        ">QI", 0x2000, 0x10000
    )
    assert (
        enc.error(REQ, EINVAL, "bad flags")
        == chunk(1, 0x8001, 15) + struct.pack(">IH", EINVAL, 9) + b"bad flags"
    )
    assert enc.error(REQ, EIO) == chunk(1, 0x8001, 6) + struct.pack(">IH", EIO, 0)
    assert enc.error_offset(REQ, EIO, 0x1200, "x", done=False) == chunk(0, 0x8002, 15) + struct.pack(
        ">IH", EIO, 1
    ) + b"x" + struct.pack(">Q", 0x1200)
    extents = [(4096, 0), (8192, 3), (0xFFFFFFFF, 1)]
    expected = struct.pack(">I", 2) + b"".join(struct.pack(">II", n, s) for n, s in extents)
    assert enc.block_status(REQ, 2, extents, done=True) == chunk(1, 5, 4 + 8 * 3) + expected


def test_extended_chunks_byte_exact_and_echo_the_request_offset():
    enc = ReplyEncoder(ReplyMode.EXTENDED)

    def ext(flags, type_, length):
        return struct.pack(">IHHQQQ", EXTENDED_MAGIC, flags, type_, REQ.cookie, REQ.offset, length)

    assert enc.ok(REQ) == ext(1, 0, 0)  # no simple replies with extended headers
    assert enc.done(REQ) == ext(1, 0, 0)
    assert enc.error(REQ, ENOSPC, "full") == ext(1, 0x8001, 10) + struct.pack(">IH", ENOSPC, 4) + b"full"
    head, body = enc.read_data(REQ, 0x1004, b"zz", done=True)
    assert head == ext(1, 1, 10) + struct.pack(">Q", 0x1004) and body == b"zz"
    assert enc.read_hole(REQ, 0x1000, 4096, done=False) == ext(0, 2, 12) + struct.pack(">QI", 0x1000, 4096)
    extents = [(1 << 40, 3), (512, 0)]
    expected = struct.pack(">II", 1, 2) + b"".join(struct.pack(">QQ", n, s) for n, s in extents)
    assert enc.block_status(REQ, 1, extents, done=False) == ext(0, 6, 8 + 16 * 2) + expected
    with pytest.raises(StateError):
        enc.simple(REQ)


def test_transmission_picks_the_reply_mode_from_negotiation():
    assert Transmission(make_ready()).replies.mode is ReplyMode.SIMPLE
    assert Transmission(make_ready(structured=True)).replies.mode is ReplyMode.STRUCTURED
    assert Transmission(make_ready(structured=True, extended=True)).replies.mode is ReplyMode.EXTENDED


def test_error_messages_are_cut_to_4096_bytes_on_a_character_boundary():
    enc = ReplyEncoder(ReplyMode.STRUCTURED)
    reply = enc.error(REQ, EIO, "é" * 3000)  # 6000 bytes of UTF-8
    (length,) = struct.unpack_from(">H", reply, 24)
    assert length == 4096 and reply[26:].decode("utf-8") == "é" * 2048


@pytest.mark.parametrize(
    ("mode", "extents"),
    [
        (ReplyMode.STRUCTURED, []),
        (ReplyMode.STRUCTURED, [(0, 0)]),
        (ReplyMode.STRUCTURED, [(1 << 32, 0)]),
        (ReplyMode.STRUCTURED, [(512, 1 << 32)]),
        (ReplyMode.EXTENDED, [(1 << 64, 0)]),
    ],
)
def test_block_status_rejects_extents_the_reply_cannot_carry(mode, extents):
    with pytest.raises(ValueError):
        ReplyEncoder(mode).block_status(REQ, 1, extents, done=True)


def test_reply_argument_checks():
    enc = ReplyEncoder(ReplyMode.STRUCTURED)
    for bad in (lambda: enc.error(REQ, 0), lambda: enc.read_hole(REQ, 0, 0, done=True)):
        with pytest.raises(ValueError):
            bad()
    with pytest.raises(ValueError):
        enc.read_data(REQ, 0, b"", done=True)


# --- receiving a payload in place (the server's zero-copy WRITE path) ---------------------------


def test_payload_received_in_place_in_steps() -> None:
    t = Transmission(make_ready())
    payload = bytes(range(256)) * 1024  # 256 KiB
    t.receive_data(req(WRITE, 4096, len(payload), cookie=5) + payload[:1000])
    assert t.next_event() is NEED_DATA
    assert t.payload_buffer(len(payload)) is None  # less than that is still to come
    buf = t.payload_buffer(65536)
    assert buf is not None and len(buf) == len(payload) - 1000
    buf[:5000] = payload[1000:6000]
    t.payload_received(5000)
    assert t.next_event() is NEED_DATA
    buf = t.payload_buffer(1)
    assert buf is not None and len(buf) == len(payload) - 6000
    buf[:] = payload[6000:]
    t.payload_received(len(buf))
    event = t.next_event()
    assert isinstance(event, Request) and event.cookie == 5 and event.error == 0
    assert bytes(event.payload) == payload
    assert t.payload_buffer(1) is None  # between requests: nothing to receive in place
    t.receive_data(req(READ, 0, 512, cookie=6))
    event = t.next_event()
    assert isinstance(event, Request) and (event.command, event.cookie) == (READ, 6)


def test_no_payload_buffer_while_bytes_are_buffered_or_outside_a_payload() -> None:
    t = Transmission(make_ready())
    assert t.payload_buffer(1) is None
    with pytest.raises(StateError):
        t.payload_received(1)
    t.receive_data(req(WRITE, 0, 512, cookie=1) + b"x" * 100)
    # Not yet parsed: the header and part of the payload sit in the buffer.
    assert t.payload_buffer(1) is None
    assert t.next_event() is NEED_DATA
    buf = t.payload_buffer(1)
    assert buf is not None and len(buf) == 412
    with pytest.raises(ValueError):
        t.payload_received(413)


def test_a_recycled_payload_buffer_takes_the_next_payload_of_its_size() -> None:
    t = Transmission(make_ready())
    first, second = b"a" * 100_000, b"b" * 100_000
    t.receive_data(req(WRITE, 0, len(first), cookie=1))
    assert t.next_event() is NEED_DATA
    buf = t.payload_buffer(1)
    assert buf is not None
    buf[:] = first
    t.payload_received(len(first))
    one = t.next_event()
    assert isinstance(one, Request) and one.payload == first
    t.recycle(one.payload)
    t.receive_data(req(WRITE, 0, len(second), cookie=2))
    assert t.next_event() is NEED_DATA
    buf = t.payload_buffer(1)
    assert buf is not None and buf.obj is one.payload  # the same memory, no new allocation
    buf[:] = second
    t.payload_received(len(second))
    two = t.next_event()
    assert isinstance(two, Request) and two.payload is one.payload and two.payload == second
    t.recycle(two.payload)
    t.receive_data(req(WRITE, 0, 512, cookie=3))  # another size: a new buffer
    assert t.next_event() is NEED_DATA
    buf = t.payload_buffer(1)
    assert buf is not None and buf.obj is not one.payload and len(buf) == 512
    t.recycle(b"bytes are never reused")  # only bytearrays this connection made


@pytest.mark.parametrize("mode", list(ReplyMode))
def test_read_header_is_data_header_for_a_whole_read(mode: ReplyMode) -> None:
    """The per-mode fast function gives exactly the general encoder's bytes."""
    replies = ReplyEncoder(mode)
    for cookie, offset, length in [(1, 0, 1), (0xFFFF_FFFF_FFFF_FFFF, 12345, 4096), (7, 1 << 40, 65535)]:
        request = Request(cookie, READ, 0, offset, length)
        assert replies.read_header(request) == replies.data_header(request, offset, length, done=True)


@pytest.mark.parametrize("mode", list(ReplyMode))
def test_ok_reply_is_ok(mode: ReplyMode) -> None:
    replies = ReplyEncoder(mode)
    for cookie in (0, 1, 0xFFFF_FFFF_FFFF_FFFF):
        request = Request(cookie, WRITE, 0, 4096, 512)
        assert replies.ok_reply(request) == replies.ok(request)
