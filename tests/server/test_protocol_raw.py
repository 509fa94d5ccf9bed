"""What the real clients cannot send: malformed handshakes and requests, over a raw socket.

Every test ends with :func:`assert_healthy`: the server is alive and a fresh client reads the
known data. Servers run on TCP unless a test says otherwise; a few use the Unix socket.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import qemu_img
from serverkit import RunningServer

from qednbd.nbd.constants import (
    BASE_ALLOCATION,
    GREETING,
    OPTION,
    QEMU_ALLOCATION_DEPTH,
    ClientFlag,
    Command,
    CommandFlag,
    Errno,
    HandshakeFlag,
    InfoType,
    Magic,
    Option,
    OptionReply,
    ReplyType,
    TransmissionFlag,
)
from qednbd.nbd.handshake import MAX_OPTION_BYTES, MAX_OPTIONS
from qednbd.nbd.transmission import MAX_REQUEST_BYTES, MAX_SKIPPED_PAYLOAD_BYTES
from qednbd.server import HANDSHAKE_TIMEOUT_SECONDS
from server.rawcheck import KNOWN, assert_healthy, make_image
from server.rawclient import RawClient, ServerClosed, pattern

MiB = 1 << 20
GiB = 1 << 30
SIZE = 64 * MiB  # the default test image
ALL_INFOS = (InfoType.NAME, InfoType.DESCRIPTION, InfoType.BLOCK_SIZE)

StartServer = Callable[..., RunningServer]


@pytest.fixture
def image(tmp_path: Path) -> Path:
    return make_image(tmp_path)


@pytest.fixture
def server(nbd_server: StartServer, image: Path) -> RunningServer:
    return nbd_server("-D", "raw test disk", image)


def connect(server: RunningServer) -> RawClient:
    return RawClient.to(server.uri())


def negotiating(
    server: RunningServer, flags: int = ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES
) -> RawClient:
    """A client that has read the greeting and sent its flags: ready for options."""
    client = connect(server)
    assert client.read_greeting() == HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES
    client.send_client_flags(flags)
    return client


def transmitting(server: RunningServer, **kw: object) -> RawClient:
    client = connect(server)
    client.handshake(**kw)  # type: ignore[arg-type]
    return client


def assert_closed_without_reply(client: RawClient, timeout: float = 5.0) -> None:
    assert client.wait_closed(timeout) == b""
    client.close()


# === handshake =====================================================================================


@pytest.mark.parametrize("flags", [0x4, 0x80000000, ClientFlag.FIXED_NEWSTYLE | 0x100])
def test_unknown_client_flag_closes(server: RunningServer, flags: int) -> None:
    assert_closed_without_reply(negotiating(server, flags))
    assert_healthy(server)


def test_bad_option_magic_closes(server: RunningServer) -> None:
    client = negotiating(server)
    client.send_option(Option.LIST, magic=0x1234567890ABCDEF)
    assert_closed_without_reply(client)
    # the reply magic in place of IHAVEOPT is just as wrong
    client = negotiating(server)
    client.send_option(Option.LIST, magic=Magic.OPTION_REPLY)
    assert_closed_without_reply(client)
    assert_healthy(server)


@pytest.mark.parametrize("claimed", [MAX_OPTION_BYTES + 1, 1 << 31, 0xFFFFFFFF])
def test_oversize_option_length_closes_before_the_data(server: RunningServer, claimed: int) -> None:
    # Only the header is sent: the server must decide from the length field alone, without
    # waiting for (or buffering) the data it announces.
    client = negotiating(server)
    client.send_option(Option.SET_META_CONTEXT, length=claimed)
    started = time.monotonic()
    assert_closed_without_reply(client, timeout=3.0)
    assert time.monotonic() - started < 3.0
    assert_healthy(server)


def test_option_of_exactly_the_limit_is_read_and_answered(server: RunningServer) -> None:
    client = negotiating(server)
    (reply,) = client.option(1000, bytes(MAX_OPTION_BYTES))
    assert reply.type == OptionReply.ERR_UNSUP
    assert client.opt_go().size == SIZE
    assert client.read_ok(0, 4096) == KNOWN[:4096]
    client.close()
    assert_healthy(server)


def test_unknown_options_get_unsup_and_negotiation_continues(server: RunningServer) -> None:
    client = negotiating(server)
    for option, data in ((Option.PEEK_EXPORT, b""), (12, b"payload"), (0x7FFFFFFF, b"x" * 1000), (0, b"")):
        (reply,) = client.option(option, data)
        assert reply.type == OptionReply.ERR_UNSUP, (option, reply)
        assert reply.message  # error replies carry a message
    assert client.opt_structured_reply().type == OptionReply.ACK
    assert client.opt_go().size == SIZE
    assert client.read_ok(0, len(KNOWN)) == KNOWN
    client.close()
    assert_healthy(server)


def test_list_with_data_is_invalid_and_list_works(server: RunningServer) -> None:
    client = negotiating(server)
    (reply,) = client.option(Option.LIST, b"junk")
    assert reply.type == OptionReply.ERR_INVALID
    replies = client.opt_list()
    assert [r.type for r in replies] == [OptionReply.SERVER, OptionReply.ACK]
    server_reply = replies[0].data
    namelen = int.from_bytes(server_reply[:4], "big")
    assert server_reply[4 : 4 + namelen] == b"disk.qed"
    assert server_reply[4 + namelen :] == b"raw test disk"
    assert client.opt_abort().type == OptionReply.ACK
    assert_closed_without_reply(client)
    assert_healthy(server)


def test_info_for_unknown_export_is_err_unknown(server: RunningServer) -> None:
    client = negotiating(server)
    replies = client.opt_info("no-such-export", ALL_INFOS).replies
    assert [r.type for r in replies] == [OptionReply.ERR_UNKNOWN]  # no INFO before the error
    replies = client.opt_go("no-such-export").replies
    assert [r.type for r in replies] == [OptionReply.ERR_UNKNOWN]
    assert client.opt_go("disk.qed").size == SIZE  # negotiation goes on
    client.close()
    assert_healthy(server)


@pytest.mark.parametrize("name", ["", "disk.qed"])
def test_info_then_go_report_the_same(server: RunningServer, name: str) -> None:
    client = negotiating(server)
    assert client.opt_structured_reply().type == OptionReply.ACK
    info = client.opt_info(name, ALL_INFOS)
    go = client.opt_go(name, ALL_INFOS)
    for details in (info, go):
        assert details.replies[-1].type == OptionReply.ACK
        assert details.replies[0].type == OptionReply.INFO
    assert info.size == go.size == SIZE
    assert info.flags == go.flags
    assert info.name == go.name == "disk.qed"
    assert info.description == go.description == "raw test disk"
    assert info.block_size == go.block_size
    assert go.block_size is not None
    minimum, preferred, maximum = go.block_size
    assert minimum <= preferred <= maximum and maximum >= 32 * MiB
    flags = TransmissionFlag(go.flags)
    for flag in (
        TransmissionFlag.HAS_FLAGS,
        TransmissionFlag.SEND_FLUSH,
        TransmissionFlag.SEND_FUA,
        TransmissionFlag.SEND_TRIM,
        TransmissionFlag.SEND_WRITE_ZEROES,
        TransmissionFlag.SEND_DF,
        TransmissionFlag.CAN_MULTI_CONN,
        TransmissionFlag.SEND_CACHE,
        TransmissionFlag.SEND_FAST_ZERO,
    ):
        assert flag in flags, flag
    assert TransmissionFlag.READ_ONLY not in flags
    assert client.read_ok(0, len(KNOWN)) == KNOWN
    client.close()
    assert_healthy(server)


def test_export_name_unknown_closes(server: RunningServer) -> None:
    client = negotiating(server)
    client.send_option(Option.EXPORT_NAME, b"no-such-export")
    assert_closed_without_reply(client)
    client = negotiating(server)
    client.send_option(Option.EXPORT_NAME, b"\xff\xfe not utf-8")
    assert_closed_without_reply(client)
    assert_healthy(server)


@pytest.mark.parametrize("no_zeroes", [True, False])
def test_export_name_empty_is_the_default_export(server: RunningServer, no_zeroes: bool) -> None:
    flags = ClientFlag.FIXED_NEWSTYLE | (ClientFlag.NO_ZEROES if no_zeroes else 0)
    client = negotiating(server, flags)
    details = client.opt_export_name("", no_zeroes=no_zeroes)  # reads (and checks) the 124 zeroes
    assert details.size == SIZE
    assert details.flags & TransmissionFlag.HAS_FLAGS
    assert not details.flags & TransmissionFlag.SEND_DF  # no structured replies negotiated
    # the stream is in sync: the next bytes are the simple reply to our read
    result = client.read(0, len(KNOWN))
    assert result.kind == "simple" and result.read_bytes() == KNOWN
    client.disconnect()
    assert_closed_without_reply(client)
    assert_healthy(server)


def test_export_name_after_structured_reply_gives_structured_transmission(server: RunningServer) -> None:
    client = negotiating(server)
    assert client.opt_structured_reply().type == OptionReply.ACK
    details = client.opt_export_name("disk.qed")
    assert details.flags & TransmissionFlag.SEND_DF
    result = client.read(0, 4096)
    assert result.kind == "structured" and result.read_bytes() == KNOWN[:4096]
    client.close()
    assert_healthy(server)


def test_starttls_is_unsupported_without_tls(server: RunningServer) -> None:
    client = negotiating(server)
    (reply,) = client.option(Option.STARTTLS)
    assert reply.type == OptionReply.ERR_UNSUP and reply.message
    (reply,) = client.option(Option.STARTTLS, b"data")
    assert reply.type in (OptionReply.ERR_INVALID, OptionReply.ERR_UNSUP)
    assert client.opt_go().size == SIZE
    assert client.read_ok(0, 4096) == KNOWN[:4096]
    client.close()
    assert_healthy(server)


def test_meta_context_before_structured_reply_is_invalid(server: RunningServer) -> None:
    client = negotiating(server)
    for option in (Option.SET_META_CONTEXT, Option.LIST_META_CONTEXT):
        replies = client.opt_meta_context(option, "", (BASE_ALLOCATION,))
        assert [r.type for r in replies] == [OptionReply.ERR_INVALID], option
    assert client.opt_structured_reply().type == OptionReply.ACK
    assert client.opt_set_meta_context("", (BASE_ALLOCATION,)) == {BASE_ALLOCATION: 1}
    client.close()
    assert_healthy(server)


def test_meta_context_wildcards_and_unknown_namespaces(server: RunningServer) -> None:
    client = negotiating(server)
    assert client.opt_structured_reply().type == OptionReply.ACK

    def listed(*queries: str) -> list[str]:
        replies = client.opt_meta_context(Option.LIST_META_CONTEXT, "", queries)
        assert replies[-1].type == OptionReply.ACK, replies
        assert all(r.type == OptionReply.META_CONTEXT for r in replies[:-1])
        assert all(r.data[:4] == bytes(4) for r in replies[:-1])  # LIST ids SHOULD be 0
        return sorted(r.data[4:].decode() for r in replies[:-1])

    both = sorted([BASE_ALLOCATION, QEMU_ALLOCATION_DEPTH])
    assert listed() == both
    assert listed("base:") == [BASE_ALLOCATION]
    assert listed("qemu:") == [QEMU_ALLOCATION_DEPTH]
    assert listed("nosuch:") == []
    assert listed("nosuch:thing", "qemu:dirty-bitmap:x", "base:other") == []
    assert listed("nosuch:", "base:allocation") == [BASE_ALLOCATION]
    selected = client.opt_set_meta_context("", ("nosuch:thing", BASE_ALLOCATION, "qemu:nonexistent"))
    assert list(selected) == [BASE_ALLOCATION]
    assert client.opt_go().size == SIZE
    result = client.request(Command.BLOCK_STATUS, 0, 4 * MiB)
    assert result.error == 0, result.message
    assert list(result.extents) == [selected[BASE_ALLOCATION]]  # one chunk, for the one context
    (first_len, first_flags), *rest = result.extents[selected[BASE_ALLOCATION]]
    assert first_len == len(KNOWN) and first_flags == 0  # data, then hole|zero
    assert rest and rest[0][1] == 3
    client.close()
    assert_healthy(server)


def test_too_many_options_close(server: RunningServer) -> None:
    client = negotiating(server)
    batch = OPTION.pack(Magic.IHAVEOPT, 1000, 0) * 32  # unknown option, no data; replies are read below
    sent = 0
    while sent < MAX_OPTIONS:
        client.send(batch)
        for _ in range(32):
            reply = client.read_option_reply()
            assert reply.type == OptionReply.ERR_UNSUP
        sent += 32
    assert sent == MAX_OPTIONS
    client.send_option(Option.LIST)
    assert_closed_without_reply(client)
    # exactly MAX_OPTIONS - 1 options, then GO, is fine
    client = negotiating(server)
    for _ in range(MAX_OPTIONS - 1):
        client.send_option(1000)
    for _ in range(MAX_OPTIONS - 1):
        assert client.read_option_reply().type == OptionReply.ERR_UNSUP
    assert client.opt_go().size == SIZE
    client.close()
    assert_healthy(server)


def test_abort_acks_then_closes(server: RunningServer) -> None:
    client = negotiating(server)
    client.send_option(Option.ABORT, b"ignored data")
    reply = client.read_option_reply()
    assert (reply.option, reply.type) == (Option.ABORT, OptionReply.ACK)
    assert_closed_without_reply(client)
    assert_healthy(server)


def test_client_vanishing_mid_handshake(server: RunningServer) -> None:
    # after the greeting, inside the flags, inside an option header, inside option data
    for cut in ("greeting", "flags", "header", "data"):
        client = connect(server)
        if cut != "greeting":
            client.read_greeting()
            if cut == "flags":
                client.send(b"\x00\x00")
            else:
                client.send_client_flags()
                whole = OPTION.pack(Magic.IHAVEOPT, Option.GO, 100)
                client.send(whole[:7] if cut == "header" else whole + b"x" * 10)
        client.close()
    assert_healthy(server)


@pytest.mark.slow
def test_handshake_timeout_drops_silent_clients_not_idle_ones(nbd_server: StartServer, image: Path) -> None:
    """Silent clients mid-handshake are dropped after the handshake limit; a connection idle in
    transmission for longer is not, and other clients are served meanwhile."""
    server = nbd_server(image, unix=True)
    started = time.monotonic()
    silent_after_greeting = connect(server)
    silent_mid_option = negotiating(server)
    silent_mid_option.send(OPTION.pack(Magic.IHAVEOPT, Option.GO, 100) + b"\0\0")
    idle = transmitting(server)
    # other clients work while those sit there
    worker = transmitting(server)
    for i in range(5):
        worker.write_ok(2 * MiB + i * 4096, pattern(i, 4096))
        time.sleep(HANDSHAKE_TIMEOUT_SECONDS / 10)
    worker.close()
    for client, unread in ((silent_after_greeting, GREETING.size), (silent_mid_option, 0)):
        left = HANDSHAKE_TIMEOUT_SECONDS + 3 - (time.monotonic() - started)
        assert len(client.wait_closed(timeout=left)) == unread  # closed, and nothing else was sent
        client.close()
    elapsed = time.monotonic() - started
    assert HANDSHAKE_TIMEOUT_SECONDS - 0.5 <= elapsed <= HANDSHAKE_TIMEOUT_SECONDS + 3
    time.sleep(max(0.0, HANDSHAKE_TIMEOUT_SECONDS + 1.5 - elapsed))
    # well past the handshake limit: the idle transmission connection is still open and works
    assert idle.is_open(0.1)
    assert idle.read_ok(0, len(KNOWN)) == KNOWN
    assert idle.read_ok(2 * MiB, 4096) == pattern(0, 4096)
    idle.disconnect()
    assert_closed_without_reply(idle)
    assert_healthy(server)


# === transmission ===================================================================================


def test_bad_request_magic_closes_only_that_connection(server: RunningServer) -> None:
    other = transmitting(server)
    for magic in (0xDEADBEEF, Magic.EXTENDED_REQUEST, Magic.SIMPLE_REPLY):
        bad = transmitting(server)
        good = bad.send_request(Command.READ, 0, 4096)
        bad.send(bad.request_bytes(Command.READ, 0, 4096, cookie=99, magic=magic))
        assert bad.wait(good).read_bytes() == KNOWN[:4096]  # the request before it is answered
        assert_closed_without_reply(bad)
        assert other.read_ok(0, len(KNOWN)) == KNOWN
    other.close()
    assert_healthy(server)


@pytest.mark.parametrize("structured", [True, False])
def test_unknown_command_is_einval_and_the_connection_goes_on(
    server: RunningServer, structured: bool
) -> None:
    client = transmitting(server, structured=structured)
    for command in (9, 99, 0xFFFF, Command.RESIZE):
        result = client.request(command, 0, 4096)
        assert result.error == Errno.EINVAL, command
        assert result.kind == ("structured" if structured else "simple")
        if structured:
            assert result.message
    # BLOCK_STATUS without a negotiated context is EINVAL as well
    assert client.request(Command.BLOCK_STATUS, 0, 4096).error == Errno.EINVAL
    assert client.read_ok(0, len(KNOWN)) == KNOWN
    client.close()
    assert_healthy(server)


def test_bad_flags_are_einval(server: RunningServer) -> None:
    client = transmitting(server)
    cases = [
        (Command.READ, CommandFlag.NO_HOLE, b""),
        (Command.READ, 1 << 15, b""),
        (Command.READ, CommandFlag.PAYLOAD_LEN, b""),  # only with extended headers
        (Command.WRITE, CommandFlag.DF, pattern(1, 4096)),  # payload drained
        (Command.WRITE, CommandFlag.REQ_ONE, pattern(1, 4096)),
        (Command.FLUSH, CommandFlag.DF, b""),
        (Command.TRIM, CommandFlag.NO_HOLE, b""),
        (Command.WRITE_ZEROES, CommandFlag.DF, b""),
        (Command.CACHE, CommandFlag.REQ_ONE, b""),
    ]
    for command, flags, payload in cases:
        result = client.request(command, 0, len(payload) or 4096, flags, payload)
        assert result.error == Errno.EINVAL, (command, flags)
    client.close()
    # without structured replies DF is not advertised, hence not allowed
    simple = transmitting(server, structured=False)
    assert simple.read(0, 4096, CommandFlag.DF).error == Errno.EINVAL
    assert simple.read(0, 4096, CommandFlag.FUA).error == 0  # FUA is accepted on any command
    simple.close()
    assert_healthy(server)  # nothing was written


@pytest.mark.parametrize("structured", [True, False])
def test_zero_length_requests_are_einval_without_disconnect(server: RunningServer, structured: bool) -> None:
    client = transmitting(server, structured=structured)
    for command in (Command.READ, Command.WRITE, Command.TRIM, Command.WRITE_ZEROES, Command.CACHE):
        result = client.request(command, 4096, 0)
        assert result.error == Errno.EINVAL, command
    assert client.read_ok(0, len(KNOWN)) == KNOWN
    client.close()
    assert_healthy(server)


def test_past_the_end(server: RunningServer) -> None:
    client = transmitting(server)
    tail = client.read_ok(SIZE - 4096, 4096)
    for offset, length in ((SIZE, 1), (SIZE - 512, 1024), (1 << 63, 512), ((1 << 64) - 512, 4096)):
        assert client.read(offset, length).error == Errno.EINVAL, (offset, length)
        assert client.request(Command.TRIM, offset, length).error == Errno.EINVAL
        assert client.request(Command.CACHE, offset, length).error == Errno.EINVAL
        assert client.request(Command.WRITE_ZEROES, offset, length).error == Errno.ENOSPC
        # the payload is drained: the next request is parsed from the right place
        assert client.write(offset, pattern(2, length)).error == Errno.ENOSPC
        assert client.read_ok(0, 4096) == KNOWN[:4096]
    big = client.write(SIZE - 512, pattern(3, 1 * MiB))
    assert big.error == Errno.ENOSPC
    assert client.read_ok(SIZE - 4096, 4096) == tail  # nothing of it was applied
    client.write_ok(SIZE - 512, pattern(4, 512))  # the last sector itself is fine
    assert client.read_ok(SIZE - 512, 512) == pattern(4, 512)
    client.close()
    assert_healthy(server)


def test_read_only_export_refuses_writes_with_eperm(nbd_server: StartServer, image: Path) -> None:
    server = nbd_server("-r", image, unix=True)
    client = connect(server)
    details = client.handshake()
    assert details.flags & TransmissionFlag.READ_ONLY
    assert client.write(0, pattern(5, 64 * 1024)).error == Errno.EPERM
    assert client.write(0, pattern(5, 4096), CommandFlag.FUA).error == Errno.EPERM
    assert client.request(Command.TRIM, 0, 1 * MiB).error == Errno.EPERM
    assert client.request(Command.WRITE_ZEROES, 0, 1 * MiB).error == Errno.EPERM
    assert client.flush().error == 0
    assert client.read_ok(0, len(KNOWN)) == KNOWN
    client.close()
    assert_healthy(server)


def test_requests_after_disc_are_ignored(server: RunningServer) -> None:
    client = transmitting(server)
    before = client.send_request(Command.WRITE, 2 * MiB, payload=pattern(6, 4096))
    fua = client.send_request(Command.WRITE, 2 * MiB + 4096, flags=CommandFlag.FUA, payload=pattern(16, 512))
    flush = client.send_request(Command.FLUSH)
    disc = client.request_bytes(Command.DISC, cookie=1000)
    after_write = client.request_bytes(Command.WRITE, 3 * MiB, 4096, cookie=1001) + pattern(7, 4096)
    after_read = client.request_bytes(Command.READ, 0, 4096, cookie=1002)
    client.send(disc + after_write + after_read)
    # the requests in flight before DISC are finished, those waiting for a flush included
    for cookie in (before, fua, flush):
        assert client.wait(cookie).error == 0
    assert_closed_without_reply(client)  # and nothing else: no reply to DISC or what followed
    fresh = transmitting(server)
    assert fresh.read_ok(2 * MiB, 4096) == pattern(6, 4096)
    assert fresh.read_ok(3 * MiB, 4096) == bytes(4096)
    fresh.close()
    assert_healthy(server)


def test_half_close_still_gets_the_replies_owed(server: RunningServer) -> None:
    """A client that shuts down its sending side right after its requests still gets every reply
    (a FLUSH's included), then the server closes."""
    client = transmitting(server, structured=False)
    write = client.send_request(Command.WRITE, 2 * MiB, payload=pattern(17, 8192))
    flush = client.send_request(Command.FLUSH)
    read = client.send_request(Command.READ, 0, len(KNOWN))
    client.sock.shutdown(socket.SHUT_WR)
    assert client.wait(write).error == 0 and client.wait(flush).error == 0
    assert client.wait(read).read_bytes() == KNOWN
    assert_closed_without_reply(client)
    fresh = transmitting(server)
    assert fresh.read_ok(2 * MiB, 8192) == pattern(17, 8192)
    fresh.close()
    assert_healthy(server)


@pytest.mark.parametrize("extended", [False, True])
def test_requests_in_the_same_packet_as_go(server: RunningServer, extended: bool) -> None:
    """Requests that arrive together with the GO that starts transmission are served."""
    client = negotiating(server)
    if extended:
        assert client.opt_extended_headers().type == OptionReply.ACK
    go = OPTION.pack(Magic.IHAVEOPT, Option.GO, 6) + RawClient.info_request("")
    read = client.request_bytes(Command.READ, 0, 4096, cookie=7)
    write = client.request_bytes(Command.WRITE, 2 * MiB, 512, CommandFlag.PAYLOAD_LEN * extended, 8)
    client.expect(7, Command.READ, 0, 4096)
    client.expect(8, Command.WRITE, 2 * MiB, 512)
    client.send(go + read + write + pattern(18, 512))
    replies = [client.read_option_reply() for _ in range(2)]
    assert [r.type for r in replies] == [OptionReply.INFO, OptionReply.ACK]
    assert client.wait(7).read_bytes() == KNOWN[:4096]
    assert client.wait(8).error == 0
    assert client.read_ok(2 * MiB, 512) == pattern(18, 512)
    client.close()
    assert_healthy(server)


def test_requests_in_the_same_packet_as_export_name(server: RunningServer) -> None:
    client = negotiating(server)
    read = client.request_bytes(Command.READ, 0, 4096, cookie=7)
    client.expect(7, Command.READ, 0, 4096)
    client.send(OPTION.pack(Magic.IHAVEOPT, Option.EXPORT_NAME, 0) + read)
    client.recv_exact(10)  # size and flags; NO_ZEROES
    assert client.wait(7).read_bytes() == KNOWN[:4096]
    client.close()
    assert_healthy(server)


def test_malformed_info_and_go_are_invalid(server: RunningServer) -> None:
    client = negotiating(server)
    name_too_long = (100).to_bytes(4, "big") + b"disk.qed" + bytes(2)
    count_mismatch = RawClient.info_request("", (InfoType.NAME,)) + bytes(2)
    bad_utf8 = (2).to_bytes(4, "big") + b"\xff\xfe" + bytes(2)
    for data in (b"", bytes(5), name_too_long, count_mismatch, bad_utf8):
        for option in (Option.INFO, Option.GO):
            replies = client.option(option, data)
            assert [r.type for r in replies] == [OptionReply.ERR_INVALID], (option, data)
    # unknown and repeated info requests are ignored
    details = client.opt_go("", (0x7FFF, InfoType.NAME, InfoType.NAME, InfoType.EXPORT))
    assert details.size == SIZE and details.name == "disk.qed"
    assert client.read_ok(0, 4096) == KNOWN[:4096]
    client.close()
    assert_healthy(server)


@pytest.mark.parametrize("sent", [10, 28, 28 + 30000])
def test_half_sent_write_then_close(server: RunningServer, sent: int) -> None:
    client = transmitting(server)
    message = client.request_bytes(Command.WRITE, 0, 64 * 1024, cookie=5) + pattern(8, 64 * 1024)
    client.send(message[:sent])
    client.close()
    time.sleep(0.2)
    assert_healthy(server)  # KNOWN at offset 0: the partial write was not applied


def test_pipelining_100_requests_before_reading_any_reply(server: RunningServer) -> None:
    client = transmitting(server)
    expected: dict[int, bytes | None] = {}
    batch = bytearray()
    for i in range(100):
        cookie = 10_000 + i * 7  # cookies are opaque: not 1, 2, 3 …
        if i % 10 == 9:
            batch += client.request_bytes(Command.FLUSH, cookie=cookie)
            client.expect(cookie, Command.FLUSH, 0, 0)
            expected[cookie] = None
        elif i % 2 == 0:
            offset = 4 * MiB + i * 4096
            flags = CommandFlag.FUA if i % 4 == 0 else 0
            batch += client.request_bytes(Command.WRITE, offset, 4096, flags, cookie) + pattern(i, 4096)
            client.expect(cookie, Command.WRITE, offset, 4096)
            expected[cookie] = None
        else:
            offset = (i % 16) * 64 * 1024 + 512
            batch += client.request_bytes(Command.READ, offset, 4096, cookie=cookie)
            client.expect(cookie, Command.READ, offset, 4096)
            expected[cookie] = KNOWN[offset : offset + 4096]
    client.send(batch)
    results = client.wait_all(list(expected))
    assert sorted(client.arrivals) == sorted(expected)  # every cookie answered exactly once
    for cookie, want in expected.items():
        assert results[cookie].error == 0, (cookie, results[cookie].message)
        if want is not None:
            assert bytes(results[cookie].data or b"") == want
    for i in range(0, 100, 2):
        if i % 10 != 9:
            assert client.read_ok(4 * MiB + i * 4096, 4096) == pattern(i, 4096)
    client.close()
    assert_healthy(server)


def test_df_read_of_mixed_range_is_one_content_chunk(server: RunningServer) -> None:
    client = transmitting(server)
    start, length = 512 * 1024, 1 * MiB  # half data, half hole
    plain = client.read(start, length)
    assert {c.type for c in plain.chunks} >= {ReplyType.OFFSET_DATA, ReplyType.OFFSET_HOLE}
    result = client.read(start, length, CommandFlag.DF)
    content = [c for c in result.chunks if c.type in (ReplyType.OFFSET_DATA, ReplyType.OFFSET_HOLE)]
    assert len(content) == 1 and client.full_coverage(result)
    assert result.chunks[-1].done and all(not c.done for c in result.chunks[:-1])
    assert result.read_bytes() == KNOWN[start:] + bytes(length - (len(KNOWN) - start))
    assert plain.read_bytes() == result.read_bytes()
    client.close()
    assert_healthy(server)


def test_structured_read_of_sparse_range_is_holes(server: RunningServer) -> None:
    client = transmitting(server)
    result = client.read(8 * MiB, 16 * MiB)
    assert result.error == 0
    assert {c.type for c in result.chunks} <= {ReplyType.OFFSET_HOLE, ReplyType.NONE}
    assert client.full_coverage(result) and result.read_bytes() == bytes(16 * MiB)
    # zero clusters (WRITE_ZEROES over unallocated clusters makes them) read as holes too
    assert client.request(Command.WRITE_ZEROES, 24 * MiB, 128 * 1024).error == 0
    result = client.read(24 * MiB, 128 * 1024)
    assert [c.type for c in result.chunks] == [ReplyType.OFFSET_HOLE]
    # zeroing data clusters rewrites them in place (as QEMU's QED does): zeroes, whatever the chunks
    client.write_ok(26 * MiB, pattern(9, 128 * 1024))
    assert client.request(Command.WRITE_ZEROES, 26 * MiB, 128 * 1024).error == 0
    assert client.read_ok(26 * MiB, 128 * 1024) == bytes(128 * 1024)
    # a mixed range: data chunks and hole chunks tile it exactly, in order or not
    result = client.read(0, 2 * MiB)
    assert client.full_coverage(result)
    assert result.read_bytes() == KNOWN + bytes(MiB)
    client.close()
    assert_healthy(server)


# --- large requests ----------------------------------------------------------------------------------


@pytest.fixture
def big_server(nbd_server: StartServer, tmp_path: Path) -> RunningServer:
    return nbd_server(make_image(tmp_path, "256M"), unix=True)


def test_50mb_write_and_read_like_integrityhuge(big_server: RunningServer) -> None:
    size = 50_000_000  # > the 32 MiB advertised maximum, not a multiple of 512
    offset = 3 * MiB + 512
    data = pattern(10, size)
    client = connect(big_server)
    details = client.handshake()
    assert details.block_size is not None and details.block_size[2] == 32 * MiB < size
    client.write_ok(offset, data)
    result = client.read(offset, size)
    assert result.error == 0 and client.full_coverage(result)
    assert result.read_bytes() == data
    client.close()
    simple = transmitting(big_server, structured=False)
    assert simple.read_ok(offset, size) == data
    simple.write_ok(offset + 1, data[: size - 1], CommandFlag.FUA)
    assert simple.read_ok(offset, size) == data[:1] + data[: size - 1]
    simple.close()
    assert_healthy(big_server)


def test_write_over_64mib_is_einval_or_closed(big_server: RunningServer) -> None:
    """transmission.py: READ/WRITE up to MAX_REQUEST_BYTES (64 MiB) are served; a larger WRITE is
    answered EINVAL once its payload is drained (up to MAX_SKIPPED_PAYLOAD_BYTES, 128 MiB); a
    WRITE announcing more than that closes the connection."""
    assert 64 * MiB == MAX_REQUEST_BYTES and 128 * MiB == MAX_SKIPPED_PAYLOAD_BYTES
    client = transmitting(big_server)
    over = MAX_REQUEST_BYTES + 4096
    result = client.write(0, pattern(11, over))
    assert result.error == Errno.EINVAL, result.message
    assert client.read_ok(0, len(KNOWN)) == KNOWN  # in sync, and nothing was written
    # a READ over the limit: EINVAL, or EOVERFLOW with DF
    assert client.read(0, over).error == Errno.EINVAL
    assert client.read(0, over, CommandFlag.DF).error == Errno.EOVERFLOW
    # exactly the limit is served
    client.write_ok(0, pattern(12, MAX_REQUEST_BYTES))
    assert client.read_ok(MAX_REQUEST_BYTES - 4096, 4096) == pattern(12, MAX_REQUEST_BYTES)[-4096:]
    client.write_ok(0, KNOWN)
    # the largest payload that is still drained rather than refused by closing
    assert client.write(0, bytes(MAX_SKIPPED_PAYLOAD_BYTES)).error == Errno.EINVAL
    assert client.read_ok(0, len(KNOWN)) == KNOWN
    client.close()
    # too large to skip: closed on the header, before any payload is sent
    client = transmitting(big_server)
    client.send(client.request_bytes(Command.WRITE, 0, MAX_SKIPPED_PAYLOAD_BYTES + 1, cookie=1))
    assert_closed_without_reply(client)
    assert_healthy(big_server)


def test_trim_and_write_zeroes_of_the_whole_device(big_server: RunningServer) -> None:
    client = transmitting(big_server)
    size = 256 * MiB
    spots = (0, 5 * MiB + 512, 100 * MiB, size - 4096)

    def scribble() -> None:
        for i, spot in enumerate(spots):
            client.write_ok(spot, pattern(20 + i, 4096))

    def assert_zero() -> None:
        result = client.read(0, 64 * MiB)
        assert result.error == 0 and result.read_bytes() == bytes(64 * MiB)
        for spot in spots:
            assert client.read_ok(spot, 4096) == bytes(4096)

    scribble()
    assert client.request(Command.WRITE_ZEROES, 0, size).error == 0
    assert_zero()
    scribble()
    assert client.request(Command.TRIM, 0, size).error == 0
    assert_zero()
    scribble()
    assert client.request(Command.WRITE_ZEROES, 0, size, CommandFlag.FUA).error == 0
    assert_zero()
    # FAST_ZERO: fine where nothing is allocated; refused with ENOTSUP, changing nothing, where
    # zeroing needs data writes (the clusters written above stay allocated)
    assert client.request(Command.WRITE_ZEROES, 128 * MiB, 64 * MiB, CommandFlag.FAST_ZERO).error == 0
    client.write_ok(spots[2], pattern(29, 4096))
    slow = client.request(Command.WRITE_ZEROES, 64 * MiB, 64 * MiB, CommandFlag.FAST_ZERO)
    assert slow.error == Errno.ENOTSUP
    assert client.read_ok(spots[2], 4096) == pattern(29, 4096)
    client.write_ok(0, KNOWN)
    client.close()
    assert_healthy(big_server)


# === extended headers ==================================================================================


@pytest.fixture
def huge_server(nbd_server: StartServer, tmp_path: Path) -> RunningServer:
    return nbd_server(make_image(tmp_path, "8G"))


def test_extended_headers_requests_and_replies(huge_server: RunningServer) -> None:
    client = connect(huge_server)
    client.read_greeting()
    client.send_client_flags()
    assert client.opt_extended_headers().type == OptionReply.ACK
    (reply,) = client.option(Option.EXTENDED_HEADERS)
    assert reply.type == OptionReply.ERR_INVALID  # a repeat
    (reply,) = client.option(Option.STRUCTURED_REPLY)
    assert reply.type == OptionReply.ERR_EXT_HEADER_REQD
    selected = client.opt_set_meta_context("", (BASE_ALLOCATION, QEMU_ALLOCATION_DEPTH))
    details = client.opt_go("", ALL_INFOS)
    assert details.size == 8 * GiB
    assert details.flags & TransmissionFlag.SEND_DF
    assert not details.flags & TransmissionFlag.BLOCK_STATUS_PAYLOAD
    # reads and writes: 32-byte requests; every reply is extended (the client checks the offset echo)
    assert client.read_ok(0, len(KNOWN)) == KNOWN
    high = 5 * GiB + 512
    client.write_ok(high, pattern(30, 128 * 1024))
    result = client.read(high, 128 * 1024)
    assert result.kind == "extended" and result.read_bytes() == pattern(30, 128 * 1024)
    ok = client.flush()
    assert ok.kind == "extended" and ok.chunk_types() == [ReplyType.NONE]
    # errors are extended ERROR chunks, never simple replies
    err = client.request(99, high, 4096)
    assert err.kind == "extended" and err.error == Errno.EINVAL and err.message
    assert client.read(8 * GiB, 512).error == Errno.EINVAL
    # a payload on a command that takes none: drained, EINVAL, stream in sync
    bad = client.send_request(Command.READ, 0, 100, CommandFlag.PAYLOAD_LEN, b"p" * 100)
    assert client.wait(bad).error == Errno.EINVAL
    # BLOCK_STATUS payloads (a filter of context ids) were not advertised: drained, EINVAL
    bad = client.send_request(Command.BLOCK_STATUS, 0, 12, CommandFlag.PAYLOAD_LEN, bytes(12))
    assert client.wait(bad).error == Errno.EINVAL
    assert client.read_ok(0, 4096) == KNOWN[:4096]
    # BLOCK_STATUS with a 64-bit length: one BLOCK_STATUS_EXT chunk per context
    status = client.request(Command.BLOCK_STATUS, 0, 8 * GiB)
    assert status.error == 0, status.message
    assert set(status.chunk_types()) == {ReplyType.BLOCK_STATUS_EXT}
    assert set(status.extents) == set(selected.values())
    base = status.extents[selected[BASE_ALLOCATION]]
    assert base[0] == (len(KNOWN), 0)
    assert base[1][1] == 3 and sum(n for n, _ in base) >= 1 * GiB
    first = client.request(Command.BLOCK_STATUS, 0, 6 * GiB, CommandFlag.REQ_ONE)
    assert first.extents[selected[BASE_ALLOCATION]] == [(len(KNOWN), 0)]
    high_status = client.request(Command.BLOCK_STATUS, high - 512, 3 * GiB - 4096, CommandFlag.REQ_ONE)
    assert high_status.error == 0, high_status.message
    (extent,) = high_status.extents[selected[BASE_ALLOCATION]]
    assert extent[1] == 0 and 0 < extent[0] <= 3 * GiB - 4096
    (depth,) = high_status.extents[selected[QEMU_ALLOCATION_DEPTH]]
    assert depth[1] == 1
    # 64-bit effect lengths: zero and trim more than 4 GiB in one request
    assert client.request(Command.WRITE_ZEROES, 1 * GiB, 6 * GiB).error == 0
    assert client.read_ok(high, 128 * 1024) == bytes(128 * 1024)
    client.write_ok(high, pattern(31, 4096))
    assert client.request(Command.TRIM, 0, 8 * GiB).error == 0
    assert client.read_ok(high, 4096) == bytes(4096)
    assert client.request(Command.WRITE_ZEROES, 0, 8 * GiB + 512).error == Errno.ENOSPC
    client.write_ok(0, KNOWN)
    client.disconnect()
    assert_closed_without_reply(client)
    assert_healthy(huge_server)


def test_export_name_after_extended_headers_closes(huge_server: RunningServer) -> None:
    client = connect(huge_server)
    client.read_greeting()
    client.send_client_flags()
    assert client.opt_extended_headers().type == OptionReply.ACK
    client.send_option(Option.EXPORT_NAME, b"")
    assert_closed_without_reply(client)
    assert_healthy(huge_server)


def test_structured_reply_then_extended_headers(huge_server: RunningServer) -> None:
    """Extended headers take precedence over structured replies negotiated before them."""
    client = connect(huge_server)
    client.read_greeting()
    client.send_client_flags()
    assert client.opt_structured_reply().type == OptionReply.ACK
    assert client.opt_extended_headers().type == OptionReply.ACK
    client.opt_go()
    result = client.read(0, 4096)
    assert result.kind == "extended" and result.read_bytes() == KNOWN[:4096]
    client.close()
    assert_healthy(huge_server)


def test_extended_headers_image_is_sparse(huge_server: RunningServer, tmp_path: Path) -> None:
    info = qemu_img("info", "--output=json", "-U", tmp_path / "disk.qed").stdout
    assert '"virtual-size": 8589934592' in info
    assert (tmp_path / "disk.qed").stat().st_blocks * 512 < 64 * MiB


def test_server_closed_is_reported(server: RunningServer) -> None:
    """The client's own check: a read on a connection the server closed raises ServerClosed."""
    client = negotiating(server)
    client.send_option(Option.LIST, magic=0)
    with pytest.raises(ServerClosed):
        client.read_option_reply()
    client.close()


# === backpressure and fairness ============================================================================


def server_rss_mib(server: RunningServer) -> float:
    with open(f"/proc/{server.pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_client_not_reading_its_replies_does_not_grow_server_memory(big_server: RunningServer) -> None:
    """server.py promises that "a client that does not read its replies stops being read". A
    client that pipelines many large READs in one packet and reads nothing must not make the
    server build every reply in memory."""
    chunk, count = 8 * MiB, 48  # 384 MiB of replies, announced in 1.3 KiB of requests
    writer = transmitting(big_server)
    writer.write_ok(8 * MiB, pattern(40, chunk))
    writer.close()
    client = transmitting(big_server, structured=False)
    before = server_rss_mib(big_server)
    batch = bytearray()
    for i in range(count):
        batch += client.request_bytes(Command.READ, 8 * MiB, chunk, cookie=i + 1)
        client.expect(i + 1, Command.READ, 8 * MiB, chunk)
    client.send(batch)
    peak = before
    for _ in range(20):  # 2 s for the server to do whatever it is going to do
        time.sleep(0.1)
        peak = max(peak, server_rss_mib(big_server))
    # the replies it may hold: what fits the socket buffers, plus a couple of replies in the making
    assert peak - before < 96, f"server RSS grew by {peak - before:.0f} MiB for {count} unread replies"
    assert client.wait(1).read_bytes() == pattern(40, chunk)
    client.close()  # with replies still owed
    assert_healthy(big_server)


@pytest.mark.slow
def test_pipelined_large_reads_do_not_stall_other_clients(big_server: RunningServer) -> None:
    """One connection pipelining big READs (and reading its replies as fast as it can) must not
    hold up another connection's small read for seconds."""
    writer = transmitting(big_server)
    writer.write_ok(16 * MiB, pattern(41, 32 * MiB))
    writer.close()
    probe = transmitting(big_server)
    latencies: list[float] = []
    stop = threading.Event()

    def probing() -> None:
        while not stop.is_set():
            started = time.monotonic()
            assert probe.read_ok(0, 4096) == KNOWN[:4096]
            latencies.append(time.monotonic() - started)
            time.sleep(0.01)

    thread = threading.Thread(target=probing)
    thread.start()
    try:
        time.sleep(0.2)
        heavy = transmitting(big_server, structured=False)
        batch = bytearray()
        for i in range(16):  # 512 MiB of replies
            batch += heavy.request_bytes(Command.READ, 16 * MiB, 32 * MiB, cookie=i + 1)
            heavy.expect(i + 1, Command.READ, 16 * MiB, 32 * MiB)
        started = time.monotonic()
        heavy.send(batch)
        for i in range(16):
            assert heavy.wait(i + 1).error == 0
        heavy_seconds = time.monotonic() - started
        time.sleep(0.1)
    finally:
        stop.set()
        thread.join(30)
    heavy.close()
    probe.close()
    worst = max(latencies)
    # one 32 MiB request takes well under 0.1 s here; being served behind all sixteen takes ~1 s
    assert worst < 0.5, f"a 4 KiB read waited {worst:.2f} s behind 16 x 32 MiB reads ({heavy_seconds:.1f} s)"
    assert_healthy(big_server)
