"""Transmission phase, sans I/O: request framing and validation in, reply encoding out.

Theory of operation
-------------------
* :class:`Transmission` is built from the handshake's :class:`~qednbd.nbd.handshake.Ready`. The
  server feeds it bytes (:meth:`~Transmission.receive_data`, ``b""`` = end of stream) and drains
  :meth:`~Transmission.next_event` (or :meth:`~Transmission.events`) until :data:`NEED_DATA`,
  so one received chunk yields every request it completes. Fed whole or byte by byte, the
  events are identical.
* Headers are compact (28 bytes, 32-bit length) or, after NBD_OPT_EXTENDED_HEADERS, extended
  (32 bytes, 64-bit length); the other magic is a framing error. A WRITE always carries
  *length* bytes of payload; in extended mode any command with ``PAYLOAD_LEN`` carries one too.
* Three kinds of outcome, kept apart (DESIGN.md rule 7):
  - **framing error** → :class:`ProtocolViolation`, terminal: bad magic, a payload too large to
    skip (:data:`MAX_SKIPPED_PAYLOAD_BYTES`), end of stream inside a request. Close the connection.
  - **request error** → a :class:`Request` whose ``error`` is an NBD errno: unknown command,
    command not advertised, invalid flag, write to a read-only export (EPERM), zero length, range
    past the end (EINVAL; ENOSPC for WRITE/WRITE_ZEROES), misalignment when the client asked for
    block sizes, READ longer than :data:`MAX_REQUEST_BYTES` (EOVERFLOW with DF). Every check uses
    the header alone, so an errored request's payload is discarded as it arrives, never buffered.
    Reply with the error and go on.
  - **valid request** → a :class:`Request` with ``error == 0``; WRITE data in ``payload``.
* DISC is returned like any request and ends the machine: nothing after it is parsed and it
  gets no reply. Its offset, length and flags are not checked (there is no reply to carry an
  error). FLUSH ignores offset and length (qemu does too); FUA is accepted on every command.
* Bounds: the export advertises a 32 MiB maximum payload, but READ and WRITE up to
  :data:`MAX_REQUEST_BYTES` are served, as nbd-server and nbdkit do (the reference test client's
  "integrityhuge" sends ~50 MB requests). Larger WRITE payloads are skipped and answered EINVAL.
* Replies: :class:`ReplyEncoder` (``Transmission.replies``) encodes for the negotiated mode —
  simple replies, structured chunks (20-byte header) or extended chunks (32-byte header echoing
  the request offset). Data-carrying replies are lists of buffers (header, then the caller's
  payload object uncopied) for ``writelines``/``sendmsg``.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Final, NamedTuple

from qednbd.nbd.constants import (
    BLOCK_DESCRIPTOR,
    BLOCK_DESCRIPTOR_EXT,
    BLOCK_STATUS_EXT_PREFIX,
    ERROR_OFFSET_SUFFIX,
    ERROR_PREFIX,
    EXTENDED_REPLY,
    EXTENDED_REQUEST,
    OFFSET_DATA_PREFIX,
    OFFSET_HOLE,
    REQUEST,
    SIMPLE_REPLY,
    STRUCTURED_OFFSET_DATA,
    STRUCTURED_REPLY,
    U32,
    U32_MAX,
    U64_MAX,
    Command,
    CommandFlag,
    Errno,
    Magic,
    ReplyFlag,
    ReplyType,
    TransmissionFlag,
)
from qednbd.nbd.handshake import NEED_DATA, NeedData, Ready, StateError, encode_message

# --- bounds -----------------------------------------------------------------------------------

# Largest READ or WRITE served: above the advertised 32 MiB because the reference test client's
# "integrityhuge" run sends ~50 MB requests that nbd-server and nbdkit (64 MiB cap) serve.
MAX_REQUEST_BYTES: Final = 64 * 1024 * 1024
# An unusable payload is discarded as it arrives (no memory), but a client that announces more
# than this is broken or hostile: close rather than read on (nbdkit uses the same factor).
MAX_SKIPPED_PAYLOAD_BYTES: Final = 2 * MAX_REQUEST_BYTES
# Consumed input is dropped from the receive buffer once this much has piled up in front.
# The largest payload buffer kept for reuse (one per connection).
MAX_SPARE_PAYLOAD_BYTES: Final = 4 * 1024 * 1024
_COMPACT_AFTER_BYTES: Final = 64 * 1024

Buffer = bytes | bytearray | memoryview

# Plain ints on the per-request path: hashing and combining IntEnum/IntFlag members runs Python code.
_KNOWN_COMMANDS: Final = frozenset(int(c) for c in Command)
_MODIFYING: Final = frozenset(
    int(c) for c in (Command.WRITE, Command.TRIM, Command.WRITE_ZEROES, Command.RESIZE)
)
_NEED_LENGTH: Final = frozenset(
    int(c)
    for c in (
        Command.READ,
        Command.WRITE,
        Command.TRIM,
        Command.CACHE,
        Command.WRITE_ZEROES,
        Command.BLOCK_STATUS,
    )
)
_NO_SPACE: Final = frozenset({int(Command.WRITE), int(Command.WRITE_ZEROES)})  # past the end: ENOSPC
_READ: Final = int(Command.READ)
_WRITE: Final = int(Command.WRITE)
_DISC: Final = int(Command.DISC)
_PAYLOAD_LEN: Final = int(CommandFlag.PAYLOAD_LEN)
_DF: Final = int(CommandFlag.DF)
_FUA: Final = int(CommandFlag.FUA)
_STRUCTURED_MAGIC: Final = int(Magic.STRUCTURED_REPLY)
_DONE: Final = int(ReplyFlag.DONE)
_OFFSET_DATA: Final = int(ReplyType.OFFSET_DATA)
_PACK_OFFSET_DATA: Final = STRUCTURED_OFFSET_DATA.pack
_PACK_SIMPLE: Final = SIMPLE_REPLY.pack
_SIMPLE_MAGIC: Final = int(Magic.SIMPLE_REPLY)


def command_name(command: int) -> str:
    return Command(command).name if command in _KNOWN_COMMANDS else f"command {command}"


# --- events -----------------------------------------------------------------------------------


class Request(NamedTuple):
    """One request. ``error != 0``: reply with that NBD errno (``message`` says why), do nothing.

    A NamedTuple, not a frozen dataclass: one is built per request, and a frozen dataclass's
    ``__init__`` costs ~1 us against ~0.3 us.
    """

    cookie: int
    command: int  # a Command value, or an unknown number (then error == EINVAL)
    flags: int  # CommandFlag bits as sent
    offset: int
    length: int  # effect length; for WRITE (or PAYLOAD_LEN) the payload length
    payload: bytes | bytearray | None = None  # WRITE data; None when error != 0
    error: int = 0
    message: str = ""

    @property
    def fua(self) -> bool:
        return bool(self.flags & _FUA)


@dataclass(frozen=True, slots=True)
class ProtocolViolation:
    """Terminal: the stream cannot be framed any more. Close the connection."""

    reason: str


@dataclass(frozen=True, slots=True)
class EndOfStream:
    """Terminal: the client closed the connection between requests (without DISC)."""


TransmissionEvent = Request | ProtocolViolation | EndOfStream | NeedData


# --- the state machine ------------------------------------------------------------------------


class TransmissionState(enum.Enum):
    HEADER = "awaiting a request header"
    PAYLOAD = "receiving a request payload"
    SKIP = "discarding a request payload"
    CLOSED = "closed"

    __hash__ = object.__hash__  # members are singletons; Enum's own __hash__ is Python code


class _Step(enum.Enum):
    NO_PAYLOAD = "request without payload"
    PAYLOAD = "payload follows"
    SKIP = "payload to discard follows"
    COMPLETE = "payload complete"
    CLOSE = "close"

    __hash__ = object.__hash__


_S = TransmissionState
_HEADER: Final = TransmissionState.HEADER
_TRANSITIONS: Final[dict[tuple[TransmissionState, _Step], TransmissionState]] = {
    (_S.HEADER, _Step.NO_PAYLOAD): _S.HEADER,
    (_S.HEADER, _Step.PAYLOAD): _S.PAYLOAD,
    (_S.HEADER, _Step.SKIP): _S.SKIP,
    (_S.HEADER, _Step.CLOSE): _S.CLOSED,
    (_S.PAYLOAD, _Step.COMPLETE): _S.HEADER,
    (_S.PAYLOAD, _Step.CLOSE): _S.CLOSED,
    (_S.SKIP, _Step.COMPLETE): _S.HEADER,
    (_S.SKIP, _Step.CLOSE): _S.CLOSED,
}


@functools.lru_cache(maxsize=64)
def _command_rules(
    transmission_flags: int, extended: bool, has_contexts: bool
) -> tuple[frozenset[int], dict[int, int]]:
    """The commands a connection may send and the flags each may carry, by what was negotiated
    (cached: every connection to an export usually negotiates the same)."""
    flags = TransmissionFlag(transmission_flags)
    enabled = {_READ, _WRITE}
    for flag, command in (
        (TransmissionFlag.SEND_FLUSH, Command.FLUSH),
        (TransmissionFlag.SEND_TRIM, Command.TRIM),
        (TransmissionFlag.SEND_WRITE_ZEROES, Command.WRITE_ZEROES),
        (TransmissionFlag.SEND_CACHE, Command.CACHE),
    ):
        if flags & flag:
            enabled.add(int(command))
    if has_contexts:
        enabled.add(int(Command.BLOCK_STATUS))
    fua = int(CommandFlag.FUA)  # plain ints: ~IntFlag would hide undefined bits
    valid_flags = {
        Command.READ: fua | (CommandFlag.DF if flags & TransmissionFlag.SEND_DF else 0),
        Command.WRITE: fua | (CommandFlag.PAYLOAD_LEN if extended else 0),
        Command.FLUSH: fua,
        Command.TRIM: fua,
        Command.CACHE: fua,
        Command.WRITE_ZEROES: fua
        | CommandFlag.NO_HOLE
        | (CommandFlag.FAST_ZERO if flags & TransmissionFlag.SEND_FAST_ZERO else 0),
        Command.BLOCK_STATUS: fua | CommandFlag.REQ_ONE,
    }
    return frozenset(enabled), {int(c): int(f) for c, f in valid_flags.items()}


class Transmission:
    """Request framing for one connection after the handshake. See the module docstring."""

    def __init__(
        self,
        ready: Ready,
        *,
        max_request_bytes: int = MAX_REQUEST_BYTES,
        max_skipped_payload_bytes: int = MAX_SKIPPED_PAYLOAD_BYTES,
    ) -> None:
        negotiated = ready.negotiated
        self._size = ready.export.size
        self._read_only = bool(ready.transmission_flags & TransmissionFlag.READ_ONLY)
        self._alignment = ready.export.min_block_size if negotiated.block_size_requested else 1
        self._max_request = max_request_bytes
        self._max_skip = max_skipped_payload_bytes
        self._extended = negotiated.extended_headers
        self._header = EXTENDED_REQUEST if self._extended else REQUEST
        self._header_size = self._header.size
        self._magic = Magic.EXTENDED_REQUEST if self._extended else Magic.REQUEST
        if self._extended:
            mode = ReplyMode.EXTENDED
        elif negotiated.structured_replies:
            mode = ReplyMode.STRUCTURED
        else:
            mode = ReplyMode.SIMPLE
        self.replies = ReplyEncoder(mode)
        self._enabled, self._valid_flags = _command_rules(
            ready.transmission_flags, self._extended, bool(negotiated.meta_contexts)
        )
        self._read_flags = self._valid_flags[_READ]
        # Whether WRITE headers may take the fast path (not with extended headers, where
        # PAYLOAD_LEN rules apply, nor on read-only exports, where WRITE is an error).
        self._fast_write = not self._extended and not self._read_only
        self._state = TransmissionState.HEADER
        self._buf = bytearray()
        self._pos = 0  # consumed bytes at the front of _buf
        self._eof = False
        self._pending: Request | None = None  # header of the request whose payload is arriving
        self._payload: bytearray | None = None
        self._payload_length = 0
        self._payload_filled = 0
        self._skip_remaining = 0
        self._spare: bytearray | None = None  # a payload buffer given back by recycle()

    # --- the server's interface ---------------------------------------------------------------

    @property
    def state(self) -> TransmissionState:
        return self._state

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes from the client; ``b""`` means the client closed its side."""
        if self._state is TransmissionState.CLOSED:
            raise StateError("receive_data in state CLOSED")
        if self._eof:
            raise StateError("receive_data after end of stream")
        if not data:
            self._eof = True
            return
        view = memoryview(data).cast("B")
        if self._pos == len(self._buf):  # nothing buffered: payload bytes can bypass the buffer
            if self._state is TransmissionState.SKIP:
                taken = min(len(view), self._skip_remaining)
                self._skip_remaining -= taken
                view = view[taken:]
            elif self._state is TransmissionState.PAYLOAD and self._payload is not None:
                taken = min(len(view), self._payload_length - self._payload_filled)
                self._payload[self._payload_filled : self._payload_filled + taken] = view[:taken]
                self._payload_filled += taken
                view = view[taken:]
        if view:
            self._buf += view

    def payload_buffer(self, min_bytes: int) -> memoryview | None:
        """Where the rest of the current WRITE payload can be received directly (no copies), if
        that is at least ``min_bytes`` and nothing else is buffered; else None. Report what was
        put there with :meth:`payload_received`; :meth:`next_event` then returns the request."""
        if self._state is not TransmissionState.PAYLOAD or self._pos != len(self._buf):
            return None
        if self._payload_length - self._payload_filled < min_bytes:
            return None
        if self._payload is None:
            self._payload = self._new_payload()
        return memoryview(self._payload)[self._payload_filled :]

    def payload_received(self, n: int) -> None:
        """``n`` bytes were written into the buffer :meth:`payload_buffer` returned."""
        if self._state is not TransmissionState.PAYLOAD or self._payload is None:
            raise StateError("payload_received without a payload buffer")
        if not 0 <= n <= self._payload_length - self._payload_filled:
            raise ValueError(f"{n} bytes do not fit the payload")
        self._payload_filled += n

    def recycle(self, payload: Buffer) -> None:
        """The caller is done with a WRITE payload this connection produced: its buffer may
        receive a later payload of the same size (a stream of equal WRITEs then allocates no
        memory; fresh large buffers cost page faults on every request)."""
        if type(payload) is bytearray and len(payload) <= MAX_SPARE_PAYLOAD_BYTES:
            self._spare = payload

    def _new_payload(self) -> bytearray:
        spare, self._spare = self._spare, None
        if spare is not None and len(spare) == self._payload_length:
            return spare
        return bytearray(self._payload_length)

    def next_event(self) -> TransmissionEvent:
        """The next complete request, :data:`NEED_DATA`, or a terminal event."""
        if self._state is _HEADER:
            return self._read_header()
        if self._state is TransmissionState.PAYLOAD:
            return self._read_payload()
        if self._state is TransmissionState.SKIP:
            return self._skip_payload()
        raise StateError("next_event in state CLOSED")

    def events(self) -> Iterator[Request | ProtocolViolation | EndOfStream]:
        """Every event the buffered input completes; stops at NEED_DATA or after a terminal one."""
        while self._state is not TransmissionState.CLOSED:
            event = self.next_event()
            if event is NEED_DATA:
                return
            yield event

    # --- framing ------------------------------------------------------------------------------

    def _advance(self, step: _Step) -> None:
        try:
            self._state = _TRANSITIONS[(self._state, step)]
        except KeyError:
            raise StateError(
                f"no transition {step.name} from transmission state {self._state.name}"
            ) from None

    def _available(self) -> int:
        return len(self._buf) - self._pos

    def _need_data(self, where: str) -> NeedData | ProtocolViolation:
        if self._eof:
            return self._violation(f"client closed the connection {where}")
        if self._pos >= _COMPACT_AFTER_BYTES or self._pos == len(self._buf):
            del self._buf[: self._pos]
            self._pos = 0
        return NEED_DATA

    def _violation(self, reason: str) -> ProtocolViolation:
        self._advance(_Step.CLOSE)
        return ProtocolViolation(reason)

    def _read_header(self) -> TransmissionEvent:
        pos = self._pos
        size = self._header_size
        available = len(self._buf) - pos
        if available < size:
            if self._eof and available == 0:
                self._advance(_Step.CLOSE)
                return EndOfStream()
            return self._need_data("inside a request header")
        magic, flags, command, cookie, offset, length = self._header.unpack_from(self._buf, pos)
        self._pos = pos + size
        if magic != self._magic:
            return self._violation(f"bad request magic 0x{magic:08x} (expected 0x{self._magic:08x})")
        if (  # the common case, a valid READ, without the general checks below (state stays HEADER)
            command == _READ
            and not flags & ~self._read_flags
            and 0 < length <= self._max_request
            and offset + length <= self._size
            and not (offset | length) % self._alignment
        ):
            return Request(cookie, command, flags, offset, length)
        if (  # a valid WRITE whose payload is all here: no state change, one copy
            command == _WRITE
            and self._fast_write
            and not flags & ~_FUA
            and 0 < length <= self._max_request
            and offset + length <= self._size
            and not (offset | length) % self._alignment
            and len(self._buf) - self._pos >= length
        ):
            start = self._pos
            self._pos = start + length
            return Request(cookie, command, flags, offset, length, self._buf[start : self._pos])
        if command == _DISC:
            self._advance(_Step.CLOSE)
            return Request(cookie, command, flags, offset, length)
        has_payload = command == _WRITE or (self._extended and flags & _PAYLOAD_LEN)
        error, message = self._validate(command, flags, offset, length)
        if not has_payload:
            self._advance(_Step.NO_PAYLOAD)
            return Request(cookie, command, flags, offset, length, None, error, message)
        if not error and length > self._max_request:
            error, message = Errno.EINVAL, f"payload of {length} bytes exceeds {self._max_request}"
        if error:
            if length > self._max_skip:
                return self._violation(
                    f"{command_name(command)} payload of {length} bytes is too large to skip"
                )
            self._pending = Request(cookie, command, flags, offset, length, None, error, message)
            self._skip_remaining = length
            self._advance(_Step.SKIP)
            return self._skip_payload()
        self._pending = Request(cookie, command, flags, offset, length)
        self._payload, self._payload_length, self._payload_filled = None, length, 0
        self._advance(_Step.PAYLOAD)
        return self._read_payload()

    def _read_payload(self) -> TransmissionEvent:
        assert self._pending is not None
        needed = self._payload_length - self._payload_filled
        available = self._available()
        if self._payload is None and available >= needed:  # all here: one copy out of the buffer
            payload: bytes | bytearray = bytes(memoryview(self._buf)[self._pos : self._pos + needed])
            self._pos += needed
        else:
            if self._payload is None:
                self._payload = self._new_payload()
            taken = min(needed, available)
            end = self._payload_filled + taken
            self._payload[self._payload_filled : end] = memoryview(self._buf)[self._pos : self._pos + taken]
            self._payload_filled = end
            self._pos += taken
            if self._payload_filled < self._payload_length:
                return self._need_data("inside a request payload")
            payload, self._payload = self._payload, None
        request = self._pending
        self._pending = None
        self._advance(_Step.COMPLETE)
        return Request(
            request.cookie, request.command, request.flags, request.offset, request.length, payload
        )

    def _skip_payload(self) -> TransmissionEvent:
        assert self._pending is not None
        taken = min(self._skip_remaining, self._available())
        self._pos += taken
        self._skip_remaining -= taken
        if self._skip_remaining:
            return self._need_data("inside a request payload")
        request = self._pending
        self._pending = None
        self._advance(_Step.COMPLETE)
        return request

    def _validate(self, command: int, flags: int, offset: int, length: int) -> tuple[int, str]:
        """(NBD errno, reason) for a well-framed request; (0, "") if it may be executed."""
        if command not in _KNOWN_COMMANDS:
            return Errno.EINVAL, f"unknown command {command}"
        # Before "not negotiated": a read-only export does not advertise TRIM or WRITE_ZEROES.
        if self._read_only and command in _MODIFYING:
            return Errno.EPERM, f"{command_name(command)} on a read-only export"
        if command not in self._enabled:
            return Errno.EINVAL, f"{command_name(command)} was not negotiated"
        invalid = flags & ~self._valid_flags[command]
        if invalid:
            return Errno.EINVAL, f"flags 0x{invalid:x} are not valid for {command_name(command)}"
        if command not in _NEED_LENGTH:
            return 0, ""
        if length == 0:
            return Errno.EINVAL, f"{command_name(command)} of length 0"
        if offset + length > self._size:
            code = Errno.ENOSPC if command in _NO_SPACE else Errno.EINVAL
            return (
                code,
                f"{command_name(command)} of {length} bytes at {offset} runs past the end ({self._size})",
            )
        if (offset | length) % self._alignment:
            return Errno.EINVAL, f"{command_name(command)} is not aligned to {self._alignment} bytes"
        if command == _READ and length > self._max_request:
            code = Errno.EOVERFLOW if flags & _DF else Errno.EINVAL
            return code, f"READ of {length} bytes exceeds {self._max_request}"
        return 0, ""


# --- replies ----------------------------------------------------------------------------------


class ReplyMode(enum.Enum):
    SIMPLE = "simple replies only"
    STRUCTURED = "structured reply chunks, simple replies for payload-less success"
    EXTENDED = "extended reply chunks only"


def _ignore(nbd_errno: int) -> None:
    pass


def _simple_ok(request: Request) -> bytes:
    return _PACK_SIMPLE(_SIMPLE_MAGIC, 0, request.cookie)


def _structured_read_header(request: Request) -> bytes:
    return _PACK_OFFSET_DATA(
        _STRUCTURED_MAGIC, _DONE, _OFFSET_DATA, request.cookie, 8 + request.length, request.offset
    )


class ReplyEncoder:
    """Reply messages for one connection's negotiated mode.

    Methods take the :class:`Request` being answered (for its cookie, and the offset that
    extended headers echo). ``done`` sets ``NBD_REPLY_FLAG_DONE``: set it on the last chunk only.
    """

    def __init__(self, mode: ReplyMode) -> None:
        self.mode = mode
        self.on_error: Callable[[int], None] = _ignore  # told the errno of every error reply
        # What goes before the data of a successful READ answered in one piece: per request, so
        # the common mode gets a function without data_header's checks and keyword arguments.
        self.read_header: Callable[[Request], bytes] = (
            _structured_read_header if mode is ReplyMode.STRUCTURED else self._read_header
        )
        # Likewise the reply to a successful WRITE, FLUSH, TRIM...: a simple reply unless extended.
        self.ok_reply: Callable[[Request], bytes] = self.ok if mode is ReplyMode.EXTENDED else _simple_ok

    def _read_header(self, request: Request) -> bytes:
        return self.data_header(request, request.offset, request.length, done=True)

    def simple(self, request: Request, error: int = 0) -> bytes:
        """A simple reply header (the READ data, if any, follows it)."""
        if self.mode is ReplyMode.EXTENDED:
            raise StateError("simple replies are forbidden with extended headers")
        return SIMPLE_REPLY.pack(Magic.SIMPLE_REPLY, error, request.cookie)

    def chunk_header(self, request: Request, reply_type: int, payload_length: int, done: bool) -> bytes:
        """A structured (20-byte) or extended (32-byte) chunk header."""
        flags = ReplyFlag.DONE if done else 0
        if self.mode is ReplyMode.EXTENDED:
            return EXTENDED_REPLY.pack(
                Magic.EXTENDED_REPLY, flags, reply_type, request.cookie, request.offset, payload_length
            )
        if self.mode is ReplyMode.STRUCTURED:
            return STRUCTURED_REPLY.pack(
                Magic.STRUCTURED_REPLY, flags, reply_type, request.cookie, payload_length
            )
        raise StateError("structured replies were not negotiated")

    def ok(self, request: Request) -> bytes:
        """Success of a command whose reply carries no data (everything but READ/BLOCK_STATUS)."""
        if self.mode is ReplyMode.EXTENDED:
            return self.chunk_header(request, ReplyType.NONE, 0, done=True)
        return self.simple(request)

    def error(self, request: Request, error: int, message: str = "") -> bytes:
        """The final reply for a failed request: a simple reply, or an ERROR chunk with a message."""
        if not error:
            raise ValueError("an error reply needs a nonzero error")
        self.on_error(error)
        if self.mode is ReplyMode.SIMPLE:
            return self.simple(request, error)
        text = encode_message(message)
        payload = ERROR_PREFIX.pack(error, len(text)) + text
        return self.chunk_header(request, ReplyType.ERROR, len(payload), done=True) + payload

    def error_offset(
        self, request: Request, error: int, offset: int, message: str = "", *, done: bool
    ) -> bytes:
        """An ERROR_OFFSET chunk: the request failed at ``offset``."""
        if not error:
            raise ValueError("an error reply needs a nonzero error")
        self.on_error(error)
        text = encode_message(message)
        payload = ERROR_PREFIX.pack(error, len(text)) + text + ERROR_OFFSET_SUFFIX.pack(offset)
        return self.chunk_header(request, ReplyType.ERROR_OFFSET, len(payload), done) + payload

    def done(self, request: Request) -> bytes:
        """A NONE chunk: the final chunk of a successful structured reply."""
        return self.chunk_header(request, ReplyType.NONE, 0, done=True)

    def read_data(self, request: Request, offset: int, data: Buffer, *, done: bool) -> list[Buffer]:
        """READ data: [header, data] with ``data`` itself uncopied.

        In SIMPLE mode this is the whole reply, so ``data`` must be the whole request;
        otherwise it is an OFFSET_DATA chunk for ``len(data)`` bytes at ``offset``.
        """
        return [self.data_header(request, offset, memoryview(data).nbytes, done=done), data]

    def data_header(self, request: Request, offset: int, size: int, *, done: bool) -> bytes:
        """What goes before ``size`` bytes of READ data at ``offset`` (for data sent separately,
        e.g. with sendfile): the simple reply header, or an OFFSET_DATA chunk's header."""
        if self.mode is ReplyMode.SIMPLE:
            if offset != request.offset or size != request.length:
                raise ValueError("a simple READ reply carries exactly the requested range")
            return self.simple(request)
        if size == 0:
            raise ValueError("an OFFSET_DATA chunk carries at least one byte")
        if self.mode is ReplyMode.STRUCTURED:
            return STRUCTURED_OFFSET_DATA.pack(
                _STRUCTURED_MAGIC, _DONE if done else 0, _OFFSET_DATA, request.cookie, 8 + size, offset
            )
        prefix = OFFSET_DATA_PREFIX.pack(offset)
        return self.chunk_header(request, ReplyType.OFFSET_DATA, len(prefix) + size, done) + prefix

    def read_hole(self, request: Request, offset: int, size: int, *, done: bool) -> bytes:
        """An OFFSET_HOLE chunk: ``size`` bytes at ``offset`` read as zeroes."""
        if not 0 < size <= U32_MAX:
            raise ValueError(f"hole size {size} is not in 1..2^32-1")
        return self.chunk_header(request, ReplyType.OFFSET_HOLE, OFFSET_HOLE.size, done) + OFFSET_HOLE.pack(
            offset, size
        )

    def block_status(
        self, request: Request, context_id: int, extents: Sequence[tuple[int, int]], *, done: bool
    ) -> bytes:
        """One context's extents ``(length, flags)``: BLOCK_STATUS, or BLOCK_STATUS_EXT if extended."""
        if not extents:
            raise ValueError("a block status chunk needs at least one extent")
        extended = self.mode is ReplyMode.EXTENDED
        descriptor = BLOCK_DESCRIPTOR_EXT if extended else BLOCK_DESCRIPTOR
        limit = U64_MAX if extended else U32_MAX
        head = BLOCK_STATUS_EXT_PREFIX.pack(context_id, len(extents)) if extended else U32.pack(context_id)
        payload = bytearray(len(head) + descriptor.size * len(extents))
        payload[: len(head)] = head
        pos = len(head)
        for length, status in extents:
            if not 0 < length <= limit or not 0 <= status <= limit:
                raise ValueError(f"extent ({length}, {status}) does not fit this reply's fields")
            descriptor.pack_into(payload, pos, length, status)
            pos += descriptor.size
        reply_type = ReplyType.BLOCK_STATUS_EXT if extended else ReplyType.BLOCK_STATUS
        return self.chunk_header(request, reply_type, len(payload), done) + payload
