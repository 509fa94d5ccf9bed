"""Server side of the fixed-newstyle NBD handshake, sans I/O.

Theory of operation
-------------------
* :class:`ServerHandshake` owns no socket. The server feeds it what it reads
  (:meth:`~ServerHandshake.receive_data`, ``b""`` for end of stream), pulls events with
  :meth:`~ServerHandshake.next_event` until it gets :data:`NEED_DATA` or a terminal event, and
  after every call writes whatever :meth:`~ServerHandshake.data_to_send` returns. All replies to
  one option come out of one ``data_to_send()`` as one contiguous ``bytes``, so each reply batch
  leaves in a single write (qemu-nbd pays a 44 ms delayed-ACK stall per connection because it
  does not). Fed whole or byte by byte, the machine produces the same bytes and events.
* The greeting (``NBDMAGIC IHAVEOPT FIXED_NEWSTYLE|NO_ZEROES``) is queued at construction.
  Client flags with an unknown bit close the connection (spec MUST).
* States are :class:`HandshakeState`; the only legal moves are listed in ``_TRANSITIONS``.
  Options are strictly request/response, so the machine handles one complete option at a time:
  header, then data (bounded by :data:`MAX_OPTION_BYTES`, checked before anything is buffered),
  then exactly one handler from ``_HANDLERS``. Unknown options get ``NBD_REP_ERR_UNSUP`` and the
  next option is parsed. Malformed but bounded options get ``NBD_REP_ERR_INVALID`` and the
  negotiation goes on; only MUST violations and denial-of-service bounds end it.
* Terminal events: :class:`Ready` (transmission starts: after an EXPORT_NAME reply, or after the
  ACK of a GO) or :class:`Closed` (ABORT, end of stream, violation, or an EXPORT_NAME we cannot
  satisfy — it has no way to carry an error). Bytes the client sent after the option that ended
  the handshake are kept in :attr:`~ServerHandshake.trailing_data` for the transmission parser.
* What the catalog says about an export is an :class:`ExportInfo`; the server passes any object
  with ``lookup(name)`` and ``names()`` (:class:`ExportCatalog`). The empty name is the default
  export and is resolved by the catalog; replies and :class:`Ready` carry the canonical name.
* Negotiation state: structured replies, extended headers (which take precedence and forbid a
  later EXPORT_NAME or STRUCTURED_REPLY), and the meta contexts of the last SET_META_CONTEXT —
  which replaces the selection even when it fails, and counts only if it named the export that
  GO/EXPORT_NAME finally selects. INFO and GO compute the same transmission flags from the same
  state (SEND_DF only with structured replies).
* TLS (:class:`TlsMode`): OFF answers STARTTLS ``NBD_REP_ERR_UNSUP``. Otherwise STARTTLS is
  ACKed and :meth:`~ServerHandshake.next_event` returns :class:`StartTls`: the server sends the
  ACK, runs the TLS handshake on the connection and calls
  :meth:`~ServerHandshake.tls_started`, which forgets structured replies, extended headers and
  meta contexts (spec MUST); bytes that arrived after STARTTLS before TLS close the connection.
  REQUIRE answers every option but STARTTLS and ABORT with ``NBD_REP_ERR_TLS_REQD`` until TLS
  is up (EXPORT_NAME, which cannot carry an error, closes). ON lets plaintext clients use the
  exports not marked ``tls_only``: INFO/GO for those get ``NBD_REP_ERR_TLS_REQD``, EXPORT_NAME
  closes, and LIST leaves them out until TLS is up.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Final, Literal, Protocol

from qednbd.errors import ConfigError, NbdProtocolError
from qednbd.nbd.constants import (
    BASE_ALLOCATION,
    CLIENT_FLAGS,
    DEFAULT_MAX_PAYLOAD_BYTES,
    EXPORT_NAME_REPLY,
    EXPORT_NAME_ZEROES,
    GREETING,
    INFO_BLOCK_SIZE,
    INFO_EXPORT,
    MAX_MIN_BLOCK_SIZE,
    MAX_STRING_BYTES,
    MIN_PREFERRED_BLOCK_SIZE,
    NO_PAYLOAD_LIMIT,
    OPTION,
    OPTION_REPLY,
    QEMU_ALLOCATION_DEPTH,
    U16,
    U32,
    U64_MAX,
    ClientFlag,
    HandshakeFlag,
    InfoType,
    Magic,
    Option,
    OptionReply,
    TransmissionFlag,
)

# --- bounds -----------------------------------------------------------------------------------

# The largest legitimate option is a SET_META_CONTEXT with a few 4 KiB strings; anything longer
# is refused before it is buffered (qemu and nbdkit close at 32/64 MiB; we need far less).
MAX_OPTION_BYTES: Final = 64 * 1024
# Listing and querying every export costs about two options per export; a client that has not
# picked an export after this many is not going to (nbdkit stops at 32, too few for nbdinfo --list).
MAX_OPTIONS: Final = 256

SERVER_HANDSHAKE_FLAGS: Final = HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES
# Plain ints: ``~`` on an IntFlag complements only within its defined members, hiding unknown bits.
KNOWN_CLIENT_FLAGS: Final = int(ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES)

# Features a QED export supports; the export layer may advertise fewer.
DEFAULT_EXPORT_FLAGS: Final = (
    TransmissionFlag.SEND_FLUSH
    | TransmissionFlag.SEND_FUA
    | TransmissionFlag.SEND_TRIM
    | TransmissionFlag.SEND_WRITE_ZEROES
    | TransmissionFlag.SEND_DF
    | TransmissionFlag.CAN_MULTI_CONN
    | TransmissionFlag.SEND_CACHE
    | TransmissionFlag.SEND_FAST_ZERO
)
# Never advertised: RESIZE and BLOCK_STATUS payloads are extensions the transmission layer lacks.
UNSUPPORTED_EXPORT_FLAGS: Final = int(TransmissionFlag.SEND_RESIZE | TransmissionFlag.BLOCK_STATUS_PAYLOAD)
DEFAULT_META_CONTEXTS: Final = (BASE_ALLOCATION, QEMU_ALLOCATION_DEPTH)


class StateError(NbdProtocolError):
    """The *caller* used a protocol object in a state that does not allow it (a server bug)."""


class _NeedData(enum.Enum):
    NEED_DATA = "NEED_DATA"


NEED_DATA: Final = _NeedData.NEED_DATA  # next_event(): feed more bytes, then ask again
NeedData = Literal[_NeedData.NEED_DATA]


# --- values -----------------------------------------------------------------------------------


def _is_power_of_two(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


def _check_string(what: str, value: str) -> None:
    if "\0" in value or len(value.encode("utf-8")) > MAX_STRING_BYTES:
        raise ConfigError(f"{what} must be at most {MAX_STRING_BYTES} UTF-8 bytes without NUL: {value!r}")


@dataclass(frozen=True, slots=True)
class ExportInfo:
    """What the handshake tells a client about one export (sizes in bytes)."""

    name: str  # canonical name, as NBD_OPT_LIST and NBD_INFO_NAME report it
    size: int
    read_only: bool = False
    description: str = ""
    flags: TransmissionFlag = DEFAULT_EXPORT_FLAGS  # features to advertise
    min_block_size: int = 1
    preferred_block_size: int = 4096
    max_payload_size: int = DEFAULT_MAX_PAYLOAD_BYTES
    meta_contexts: tuple[str, ...] = DEFAULT_META_CONTEXTS
    tls_only: bool = False  # only for clients that did STARTTLS (with TlsMode.ON)

    def __post_init__(self) -> None:
        _check_string("export name", self.name)
        _check_string("export description", self.description)
        if not 0 <= self.size <= U64_MAX:
            raise ConfigError(f"export size {self.size} does not fit 64 bits")
        if not _is_power_of_two(self.min_block_size) or self.min_block_size > MAX_MIN_BLOCK_SIZE:
            raise ConfigError(f"minimum block size {self.min_block_size} is not a power of two <= 64 KiB")
        preferred_floor = max(self.min_block_size, MIN_PREFERRED_BLOCK_SIZE)
        if not _is_power_of_two(self.preferred_block_size) or self.preferred_block_size < preferred_floor:
            raise ConfigError(
                f"preferred block size {self.preferred_block_size} is not a power of two >= {preferred_floor}"
            )
        if self.max_payload_size != NO_PAYLOAD_LIMIT and (
            self.max_payload_size < self.preferred_block_size
            or self.max_payload_size > NO_PAYLOAD_LIMIT
            or self.max_payload_size % self.min_block_size
        ):
            raise ConfigError(
                f"maximum payload {self.max_payload_size} must be a multiple of the minimum block size,"
                " at least the preferred block size, and fit 32 bits"
            )
        for context in self.meta_contexts:
            _check_string("meta context name", context)
            if ":" not in context:
                raise ConfigError(f"meta context name {context!r} lacks a namespace")

    def transmission_flags(self, structured: bool) -> int:
        """The u16 sent in the EXPORT_NAME reply and in ``NBD_INFO_EXPORT``."""
        flags = (int(self.flags) | TransmissionFlag.HAS_FLAGS) & ~UNSUPPORTED_EXPORT_FLAGS
        if self.read_only:
            flags |= TransmissionFlag.READ_ONLY
        if not structured:  # spec: SEND_DF MUST be clear without structured replies
            flags &= ~int(TransmissionFlag.SEND_DF)
        if not flags & TransmissionFlag.SEND_WRITE_ZEROES:  # spec: FAST_ZERO requires WRITE_ZEROES
            flags &= ~int(TransmissionFlag.SEND_FAST_ZERO)
        return int(flags)


class ExportCatalog(Protocol):
    """What the handshake needs from the server's set of exports."""

    def lookup(self, name: str) -> ExportInfo | None:
        """The export called ``name`` (``""`` = the default export), or None."""

    def names(self) -> Sequence[str]:
        """Canonical names of the exports NBD_OPT_LIST reports, in order."""


class StaticCatalog:
    """An :class:`ExportCatalog` over a fixed list; ``default`` names the export ``""`` selects."""

    def __init__(self, exports: Iterable[ExportInfo], default: str | None = None) -> None:
        self._exports = {export.name: export for export in exports}
        if default is not None and default not in self._exports:
            raise ConfigError(f"default export {default!r} is not among the exports")
        self._default = default

    def lookup(self, name: str) -> ExportInfo | None:
        if name == "" and self._default is not None:
            return self._exports[self._default]
        return self._exports.get(name)

    def names(self) -> Sequence[str]:
        return list(self._exports)


@dataclass(frozen=True, slots=True)
class MetaContext:
    """A meta context selected by SET_META_CONTEXT; ``id`` is what BLOCK_STATUS chunks carry."""

    id: int
    name: str


@dataclass(frozen=True, slots=True)
class Negotiated:
    """Everything the options changed, as the transmission phase needs it."""

    structured_replies: bool = False
    extended_headers: bool = False  # takes precedence over structured_replies
    meta_contexts: tuple[MetaContext, ...] = ()
    block_size_requested: bool = False  # GO asked for NBD_INFO_BLOCK_SIZE, so the client MUST obey it
    no_zeroes: bool = False
    tls: bool = False  # the connection did STARTTLS


@dataclass(frozen=True, slots=True)
class Ready:
    """Terminal event: the handshake is over and transmission begins."""

    export: ExportInfo
    transmission_flags: int  # exactly what the client was told
    negotiated: Negotiated
    option: int  # Option.GO or Option.EXPORT_NAME


@dataclass(frozen=True, slots=True)
class Closed:
    """Terminal event: drain :meth:`ServerHandshake.data_to_send`, then close the connection."""

    reason: str
    graceful: bool = False  # ABORT, or end of stream between options


@dataclass(frozen=True, slots=True)
class StartTls:
    """Send :meth:`ServerHandshake.data_to_send` (the STARTTLS ACK), run the TLS handshake on the
    connection, then call :meth:`ServerHandshake.tls_started` (or close if TLS fails)."""


class TlsMode(enum.Enum):
    OFF = "off"  # no TLS (NOTLS)
    ON = "on"  # TLS optional; exports marked tls_only need it (SELECTIVETLS)
    REQUIRE = "require"  # nothing but STARTTLS before TLS (FORCEDTLS)


HandshakeEvent = Ready | Closed | StartTls | NeedData


# --- the state machine ------------------------------------------------------------------------


class HandshakeState(enum.Enum):
    CLIENT_FLAGS = "awaiting the client flags"
    OPTION_HEADER = "awaiting an option header"
    OPTION_DATA = "awaiting option data"
    TLS = "upgrading the connection to TLS"
    READY = "handshake finished"
    CLOSED = "closed"


class _Step(enum.Enum):
    ACCEPT = "accept"  # the awaited message was acceptable: await the next one
    ENTER_TRANSMISSION = "enter transmission"
    START_TLS = "start TLS"
    CLOSE = "close"


_S = HandshakeState
_TRANSITIONS: Final[dict[tuple[HandshakeState, _Step], HandshakeState]] = {
    (_S.CLIENT_FLAGS, _Step.ACCEPT): _S.OPTION_HEADER,
    (_S.CLIENT_FLAGS, _Step.CLOSE): _S.CLOSED,
    (_S.OPTION_HEADER, _Step.ACCEPT): _S.OPTION_DATA,
    (_S.OPTION_HEADER, _Step.CLOSE): _S.CLOSED,
    (_S.OPTION_DATA, _Step.ACCEPT): _S.OPTION_HEADER,
    (_S.OPTION_DATA, _Step.ENTER_TRANSMISSION): _S.READY,
    (_S.OPTION_DATA, _Step.CLOSE): _S.CLOSED,
    (_S.OPTION_DATA, _Step.START_TLS): _S.TLS,
    (_S.TLS, _Step.ACCEPT): _S.OPTION_HEADER,
    (_S.TLS, _Step.CLOSE): _S.CLOSED,
}
_TERMINAL: Final = frozenset({_S.READY, _S.CLOSED})

_OptionResult = Ready | Closed | StartTls | None  # None: replied, negotiation goes on


def _decode_string(raw: bytes) -> str | None:
    """A protocol string, or None if it is not UTF-8, contains NUL or exceeds 4096 bytes."""
    if len(raw) > MAX_STRING_BYTES:
        return None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return None if "\0" in text else text


def encode_message(message: str) -> bytes:
    """An error message for a reply, cut to the 4096-byte string limit on a character boundary."""
    return message.encode("utf-8")[:MAX_STRING_BYTES].decode("utf-8", "ignore").encode("utf-8")


def _parse_info_request(data: bytes) -> tuple[str, list[int]] | str:
    """INFO/GO data → (name, info requests), or a reason for NBD_REP_ERR_INVALID."""
    if len(data) < 6:
        return "option data shorter than 6 bytes"
    (name_length,) = U32.unpack_from(data, 0)
    if name_length > len(data) - 6:
        return "export name longer than the option"
    name = _decode_string(data[4 : 4 + name_length])
    if name is None:
        return "export name is not a valid string of at most 4096 bytes"
    (count,) = U16.unpack_from(data, 4 + name_length)
    if len(data) != 4 + name_length + 2 + 2 * count:
        return f"option length does not match {count} information requests"
    first = 6 + name_length
    return name, [U16.unpack_from(data, first + 2 * i)[0] for i in range(count)]


def _parse_meta_request(data: bytes) -> tuple[str, list[str]] | str:
    """LIST/SET_META_CONTEXT data → (export name, queries), or a reason for NBD_REP_ERR_INVALID."""
    if len(data) < 8:
        return "option data shorter than 8 bytes"
    (name_length,) = U32.unpack_from(data, 0)
    if name_length > len(data) - 8:
        return "export name longer than the option"
    name = _decode_string(data[4 : 4 + name_length])
    if name is None:
        return "export name is not a valid string of at most 4096 bytes"
    pos = 4 + name_length
    (count,) = U32.unpack_from(data, pos)
    pos += 4
    if count > (len(data) - pos) // 4:  # each query takes at least its 4-byte length
        return f"{count} queries cannot fit in the option"
    queries = []
    for _ in range(count):
        if len(data) - pos < 4:
            return "query length runs past the option"
        (query_length,) = U32.unpack_from(data, pos)
        pos += 4
        if query_length > len(data) - pos:
            return "query runs past the option"
        query = _decode_string(data[pos : pos + query_length])
        if query is None:
            return "query is not a valid string of at most 4096 bytes"
        queries.append(query)
        pos += query_length
    if pos != len(data):
        return "trailing bytes after the queries"
    return name, queries


def _query_matches(query: str, context: str, listing: bool) -> bool:
    """Exact names select; in LIST, a query ending in ':' (``base:``, ``qemu:``) is a wildcard.

    Queries for unknown namespaces or unknown leaves simply match nothing (spec: MUST ignore).
    """
    if query == context:
        return True
    return listing and query.endswith(":") and context.startswith(query)


class ServerHandshake:
    """The server side of one connection's handshake. See the module docstring."""

    def __init__(self, catalog: ExportCatalog, tls: TlsMode = TlsMode.OFF) -> None:
        self._catalog = catalog
        self._tls_mode = tls
        self._tls = False  # STARTTLS done
        self._state = HandshakeState.CLIENT_FLAGS
        self._inbuf = bytearray()
        self._outbuf: list[bytes] = [GREETING.pack(Magic.NBDMAGIC, Magic.IHAVEOPT, SERVER_HANDSHAKE_FLAGS)]
        self._eof = False
        self._client_flags = ClientFlag(0)
        self._option = 0
        self._option_length = 0
        self._options_seen = 0
        self._refusal: tuple[OptionReply, str] | None = None
        self._structured = False
        self._extended = False
        self._meta_export: str | None = None  # canonical export the last SET_META_CONTEXT named
        self._meta_contexts: tuple[MetaContext, ...] = ()

    # --- the server's interface ---------------------------------------------------------------

    @property
    def state(self) -> HandshakeState:
        return self._state

    @property
    def trailing_data(self) -> bytes:
        """Bytes received after the option that ended the handshake (requests sent early)."""
        if self._state not in _TERMINAL:
            raise StateError(f"trailing_data is only defined after the handshake, not in {self._state.name}")
        return bytes(self._inbuf)

    def data_to_send(self) -> bytes:
        """Everything queued since the last call, as one contiguous chunk."""
        out = b"".join(self._outbuf)
        self._outbuf.clear()
        return out

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes from the client; ``b""`` means the client closed its side."""
        if self._state in _TERMINAL or self._state is HandshakeState.TLS:
            raise StateError(f"receive_data in state {self._state.name}")
        if self._eof:
            raise StateError("receive_data after end of stream")
        if data:
            self._inbuf += data
        else:
            self._eof = True

    def tls_started(self) -> None:
        """The TLS handshake that :class:`StartTls` asked for succeeded: negotiation starts over
        (what was negotiated in plaintext is forgotten), now over TLS."""
        if self._state is not HandshakeState.TLS:
            raise StateError(f"tls_started in state {self._state.name}")
        self._tls = True
        self._structured = self._extended = False
        self._meta_export, self._meta_contexts = None, ()
        self._advance(_Step.ACCEPT)

    def begin_shutdown(self) -> None:
        """From now on answer every option except ABORT with NBD_REP_ERR_SHUTDOWN (spec SHOULD)."""
        self._refusal = (OptionReply.ERR_SHUTDOWN, "server is shutting down")

    def refuse(self, message: str) -> None:
        """Serve nothing on this connection: every option but ABORT gets NBD_REP_ERR_POLICY with
        ``message`` (e.g. the client limit), so the client learns why; EXPORT_NAME closes."""
        self._refusal = (OptionReply.ERR_POLICY, message)

    def next_event(self) -> HandshakeEvent:
        """Process buffered input; return :data:`NEED_DATA` or a terminal event."""
        if self._state in _TERMINAL or self._state is HandshakeState.TLS:
            raise StateError(f"next_event in state {self._state.name}")
        while True:
            if self._state is HandshakeState.CLIENT_FLAGS:
                if len(self._inbuf) < CLIENT_FLAGS.size:
                    return self._need_data()
                (flags,) = CLIENT_FLAGS.unpack_from(self._inbuf)
                del self._inbuf[: CLIENT_FLAGS.size]
                unknown = flags & ~KNOWN_CLIENT_FLAGS
                if unknown:
                    return self._close(f"client set unknown handshake flags 0x{unknown:x}")
                self._client_flags = ClientFlag(flags)
                self._advance(_Step.ACCEPT)
            elif self._state is HandshakeState.OPTION_HEADER:
                if len(self._inbuf) < OPTION.size:
                    return self._need_data()
                magic, option, length = OPTION.unpack_from(self._inbuf)
                del self._inbuf[: OPTION.size]
                if magic != Magic.IHAVEOPT:
                    return self._close(f"bad option magic 0x{magic:016x}")
                if length > MAX_OPTION_BYTES:
                    return self._close(
                        f"option {option} claims {length} bytes of data (limit {MAX_OPTION_BYTES})"
                    )
                if self._options_seen >= MAX_OPTIONS:
                    return self._close(f"more than {MAX_OPTIONS} options without choosing an export")
                if option != Option.EXPORT_NAME and not self._client_flags & ClientFlag.FIXED_NEWSTYLE:
                    return self._close(f"option {option} from a client without fixed newstyle")
                self._options_seen += 1
                self._option, self._option_length = option, length
                self._advance(_Step.ACCEPT)
            else:  # OPTION_DATA
                if len(self._inbuf) < self._option_length:
                    return self._need_data()
                data = bytes(self._inbuf[: self._option_length])
                del self._inbuf[: self._option_length]
                result = self._dispatch(self._option, data)
                if result is None:
                    self._advance(_Step.ACCEPT)
                    continue
                if isinstance(result, Ready):
                    self._advance(_Step.ENTER_TRANSMISSION)
                elif isinstance(result, StartTls):
                    self._advance(_Step.START_TLS)
                return result

    # --- machinery ----------------------------------------------------------------------------

    def _advance(self, step: _Step) -> None:
        try:
            self._state = _TRANSITIONS[(self._state, step)]
        except KeyError:
            raise StateError(f"no transition {step.name} from handshake state {self._state.name}") from None

    def _need_data(self) -> NeedData | Closed:
        if not self._eof:
            return NEED_DATA
        at_boundary = self._state is HandshakeState.OPTION_HEADER and not self._inbuf
        where = "between options" if at_boundary else f"while {self._state.value}"
        return self._close(f"client closed the connection {where}", graceful=at_boundary)

    def _close(self, reason: str, graceful: bool = False) -> Closed:
        self._advance(_Step.CLOSE)
        return Closed(reason, graceful)

    def _reply(self, option: int, reply: OptionReply, payload: bytes = b"") -> None:
        self._outbuf.append(OPTION_REPLY.pack(Magic.OPTION_REPLY, option, reply, len(payload)) + payload)

    def _error(self, option: int, reply: OptionReply, message: str) -> None:
        self._reply(option, reply, encode_message(message))

    def _dispatch(self, option: int, data: bytes) -> _OptionResult:
        if self._refusal is not None and option != Option.ABORT:
            reply, message = self._refusal
            if option == Option.EXPORT_NAME:
                return self._close(f"EXPORT_NAME refused: {message}")
            self._error(option, reply, message)
            return None
        if (
            self._tls_mode is TlsMode.REQUIRE
            and not self._tls
            and option not in (Option.STARTTLS, Option.ABORT)
        ):
            if option == Option.EXPORT_NAME:
                return self._close("EXPORT_NAME before STARTTLS, and TLS is required")
            self._error(option, OptionReply.ERR_TLS_REQD, "TLS is required: send NBD_OPT_STARTTLS first")
            return None
        handler = _HANDLERS.get(option)
        if handler is None:
            self._error(option, OptionReply.ERR_UNSUP, f"option {option} is not supported")
            return None
        return handler(self, option, data)

    def _ready(self, export: ExportInfo, flags: int, option: int, block_size_requested: bool) -> Ready:
        contexts = self._meta_contexts if self._meta_export == export.name else ()
        negotiated = Negotiated(
            structured_replies=self._structured,
            extended_headers=self._extended,
            meta_contexts=contexts,
            block_size_requested=block_size_requested,
            no_zeroes=bool(self._client_flags & ClientFlag.NO_ZEROES),
            tls=self._tls,
        )
        return Ready(export, flags, negotiated, option)

    # --- one handler per option ---------------------------------------------------------------

    def _opt_export_name(self, option: int, data: bytes) -> _OptionResult:
        # EXPORT_NAME cannot carry an error: every failure ends the session (spec MUST).
        if self._extended:
            return self._close("EXPORT_NAME after extended headers were negotiated")
        name = _decode_string(data)
        if name is None:
            return self._close("EXPORT_NAME with an invalid export name")
        export = self._catalog.lookup(name)
        if export is None:
            return self._close(f"EXPORT_NAME for unknown export {name!r}")
        if export.tls_only and not self._tls:
            return self._close(f"EXPORT_NAME for TLS-only export {name!r} without TLS")
        flags = export.transmission_flags(self._structured)
        reply = EXPORT_NAME_REPLY.pack(export.size, flags)
        if not self._client_flags & ClientFlag.NO_ZEROES:
            reply += bytes(EXPORT_NAME_ZEROES)
        self._outbuf.append(reply)
        return self._ready(export, flags, option, block_size_requested=False)

    def _opt_abort(self, option: int, data: bytes) -> _OptionResult:
        # Any data is ignored (spec SHOULD); the ACK goes out before the close.
        self._reply(option, OptionReply.ACK)
        return self._close("client aborted the handshake", graceful=True)

    def _opt_list(self, option: int, data: bytes) -> _OptionResult:
        if data:
            self._error(option, OptionReply.ERR_INVALID, "NBD_OPT_LIST takes no data")
            return None
        for name in self._catalog.names():
            export = self._catalog.lookup(name)
            if export is not None and export.tls_only and not self._tls:
                continue  # listed once TLS is up (spec MAY)
            raw_name = name.encode("utf-8")
            description = export.description.encode("utf-8") if export is not None else b""
            self._reply(option, OptionReply.SERVER, U32.pack(len(raw_name)) + raw_name + description)
        self._reply(option, OptionReply.ACK)
        return None

    def _opt_starttls(self, option: int, data: bytes) -> _OptionResult:
        if data:
            self._error(option, OptionReply.ERR_INVALID, "NBD_OPT_STARTTLS takes no data")
        elif self._tls_mode is TlsMode.OFF:
            self._error(option, OptionReply.ERR_UNSUP, "TLS is not configured on this server")
        elif self._tls:
            self._error(option, OptionReply.ERR_INVALID, "TLS is already in use")
        elif self._inbuf:  # the client must wait for our ACK before it starts TLS
            return self._close("data after NBD_OPT_STARTTLS before the TLS handshake")
        else:
            self._reply(option, OptionReply.ACK)
            return StartTls()
        return None

    def _opt_info_go(self, option: int, data: bytes) -> _OptionResult:
        parsed = _parse_info_request(data)
        if isinstance(parsed, str):
            self._error(option, OptionReply.ERR_INVALID, parsed)
            return None
        name, requests = parsed
        export = self._catalog.lookup(name)
        if export is None:
            self._error(option, OptionReply.ERR_UNKNOWN, f"export {name!r} is not available")
            return None
        if export.tls_only and not self._tls:
            self._error(option, OptionReply.ERR_TLS_REQD, f"export {name!r} needs TLS: send NBD_OPT_STARTTLS")
            return None
        flags = export.transmission_flags(self._structured or self._extended)
        self._reply(option, OptionReply.INFO, INFO_EXPORT.pack(InfoType.EXPORT, export.size, flags))
        answered = {InfoType.EXPORT.value}
        for info in requests:  # in the client's order; repeats and unknown types are ignored
            if info in answered:
                continue
            answered.add(info)
            if info == InfoType.NAME:
                self._reply(option, OptionReply.INFO, U16.pack(InfoType.NAME) + export.name.encode("utf-8"))
            elif info == InfoType.DESCRIPTION and export.description:
                payload = U16.pack(InfoType.DESCRIPTION) + export.description.encode("utf-8")
                self._reply(option, OptionReply.INFO, payload)
            elif info == InfoType.BLOCK_SIZE:
                payload = INFO_BLOCK_SIZE.pack(
                    InfoType.BLOCK_SIZE,
                    export.min_block_size,
                    export.preferred_block_size,
                    export.max_payload_size,
                )
                self._reply(option, OptionReply.INFO, payload)
        self._reply(option, OptionReply.ACK)
        if option == Option.GO:
            return self._ready(export, flags, option, block_size_requested=InfoType.BLOCK_SIZE in answered)
        return None

    def _opt_structured_reply(self, option: int, data: bytes) -> _OptionResult:
        if data:
            self._error(option, OptionReply.ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data")
        elif self._extended:
            self._error(option, OptionReply.ERR_EXT_HEADER_REQD, "extended headers are already in use")
        elif self._structured:
            self._error(option, OptionReply.ERR_INVALID, "structured replies are already negotiated")
        else:
            self._structured = True
            self._reply(option, OptionReply.ACK)
        return None

    def _opt_extended_headers(self, option: int, data: bytes) -> _OptionResult:
        if data:
            self._error(option, OptionReply.ERR_INVALID, "NBD_OPT_EXTENDED_HEADERS takes no data")
        elif self._extended:
            self._error(option, OptionReply.ERR_INVALID, "extended headers are already negotiated")
        else:
            self._extended = True
            self._reply(option, OptionReply.ACK)
        return None

    def _opt_meta_context(self, option: int, data: bytes) -> _OptionResult:
        setting = option == Option.SET_META_CONTEXT
        if setting:  # spec: SET replaces the selection, even when it fails
            self._meta_export, self._meta_contexts = None, ()
        if not (self._structured or self._extended):
            self._error(option, OptionReply.ERR_INVALID, "meta contexts need structured replies first")
            return None
        parsed = _parse_meta_request(data)
        if isinstance(parsed, str):
            self._error(option, OptionReply.ERR_INVALID, parsed)
            return None
        name, queries = parsed
        export = self._catalog.lookup(name)
        if export is None:
            self._error(option, OptionReply.ERR_UNKNOWN, f"export {name!r} is not available")
            return None
        available = export.meta_contexts
        if queries:
            chosen = [c for c in available if any(_query_matches(q, c, not setting) for q in queries)]
        else:  # zero queries: LIST returns everything, SET selects nothing
            chosen = [] if setting else list(available)
        if setting:
            selected = tuple(MetaContext(available.index(c) + 1, c) for c in chosen)
            self._meta_export, self._meta_contexts = export.name, selected
            for context in selected:
                self._reply(option, OptionReply.META_CONTEXT, U32.pack(context.id) + context.name.encode())
        else:  # LIST: the context id is reserved and SHOULD be 0
            for name_ in chosen:
                self._reply(option, OptionReply.META_CONTEXT, U32.pack(0) + name_.encode("utf-8"))
        self._reply(option, OptionReply.ACK)
        return None


_HANDLERS: Final[dict[int, Callable[[ServerHandshake, int, bytes], _OptionResult]]] = {
    Option.EXPORT_NAME: ServerHandshake._opt_export_name,
    Option.ABORT: ServerHandshake._opt_abort,
    Option.LIST: ServerHandshake._opt_list,
    Option.STARTTLS: ServerHandshake._opt_starttls,
    Option.INFO: ServerHandshake._opt_info_go,
    Option.GO: ServerHandshake._opt_info_go,
    Option.STRUCTURED_REPLY: ServerHandshake._opt_structured_reply,
    Option.LIST_META_CONTEXT: ServerHandshake._opt_meta_context,
    Option.SET_META_CONTEXT: ServerHandshake._opt_meta_context,
    Option.EXTENDED_HEADERS: ServerHandshake._opt_extended_headers,
}
