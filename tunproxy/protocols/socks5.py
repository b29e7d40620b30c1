"""A sans-I/O SOCKS5 client: RFC 1928 (CONNECT, UDP ASSOCIATE) and RFC 1929 (username/password).

Like h11 or aioquic, ``Socks5Client`` does no I/O: the caller asks for a
command, writes ``data_to_send()`` to the proxy, feeds what the proxy sends to
``receive_data()`` and gets events back::

    client = Socks5Client(auth=("user", "pass"))
    client.connect("example.com", 443)
    send(client.data_to_send())
    for event in client.receive_data(recv()):   # Connected or Failed
        ...
    send(client.data_to_send())                 # after every receive_data

Bytes the proxy sent after its final reply (the first payload bytes of a
CONNECT) come back in ``Connected.leftover``; from then on the caller reads
the stream itself and the client takes no more input.

``Socks5Client(pipeline=True)`` sends greeting, credentials and request in one
write instead of waiting for each reply: one round trip less per connection,
for proxies that accept it (see ``_start``).

Errors follow h11's split: ``Socks5RemoteError`` means the proxy broke the
protocol (anything it sends either parses into events or raises this, never
anything else); ``Socks5LocalError`` means the caller misused the client.
A refusal the protocol allows (a reply code, a rejected password, no
acceptable method) is not an error: it is a ``Failed`` event.

``UdpDatagram`` is the RFC 1928 section 7 header that wraps every datagram
sent to and from a UDP relay.

Why not socksio (the sans-I/O SOCKS library on PyPI): its last release is from
2020, its UDP datagram header is unimplemented (``NotImplementedError``), and
its ``receive_data`` assumes each call holds exactly one whole message, so it
cannot be fed a stream cut anywhere nor hand back the bytes that follow a reply.
"""

from __future__ import annotations

import enum
import ipaddress
import struct
from dataclasses import dataclass

__all__ = [
    "REPLY_MESSAGES",
    "AddressType",
    "Command",
    "Connected",
    "Event",
    "Failed",
    "Method",
    "Reply",
    "Socks5Client",
    "Socks5LocalError",
    "Socks5RemoteError",
    "State",
    "UdpDatagram",
    "emit_address",
]

VERSION = 5  # RFC 1928 section 3: VER is X'05' in every message of this protocol version
# RFC 1929 section 2: "The VER field contains the current version of the subnegotiation,
# which is X'01'"
AUTH_VERSION = 1

_PORT = struct.Struct("!H")


class Method(enum.IntEnum):
    """RFC 1928 section 3: authentication METHOD values."""

    NO_AUTH = 0x00
    GSSAPI = 0x01
    USERNAME_PASSWORD = 0x02  # RFC 1929
    NO_ACCEPTABLE = 0xFF


class Command(enum.IntEnum):
    """RFC 1928 section 4: CMD."""

    CONNECT = 0x01
    BIND = 0x02
    UDP_ASSOCIATE = 0x03


class AddressType(enum.IntEnum):
    """RFC 1928 section 5: ATYP."""

    IPV4 = 0x01
    DOMAIN = 0x03
    IPV6 = 0x04


class Reply(enum.IntEnum):
    """RFC 1928 section 6: REP."""

    SUCCEEDED = 0x00
    GENERAL_FAILURE = 0x01
    NOT_ALLOWED = 0x02
    NETWORK_UNREACHABLE = 0x03
    HOST_UNREACHABLE = 0x04
    CONNECTION_REFUSED = 0x05
    TTL_EXPIRED = 0x06
    COMMAND_NOT_SUPPORTED = 0x07
    ADDRESS_TYPE_NOT_SUPPORTED = 0x08


REPLY_MESSAGES: dict[int, str] = {
    Reply.SUCCEEDED: "succeeded",
    Reply.GENERAL_FAILURE: "general SOCKS server failure",
    Reply.NOT_ALLOWED: "connection not allowed by ruleset",
    Reply.NETWORK_UNREACHABLE: "network unreachable",
    Reply.HOST_UNREACHABLE: "host unreachable",
    Reply.CONNECTION_REFUSED: "connection refused",
    Reply.TTL_EXPIRED: "TTL expired",
    Reply.COMMAND_NOT_SUPPORTED: "command not supported",
    Reply.ADDRESS_TYPE_NOT_SUPPORTED: "address type not supported",
}


class Socks5RemoteError(Exception):
    """The proxy sent something RFC 1928/1929 does not allow."""


class Socks5LocalError(Exception):
    """The caller misused the client (a bug, or an argument SOCKS5 cannot carry)."""


@dataclass(frozen=True, slots=True)
class Connected:
    """The command succeeded. For CONNECT, ``bound_addr``/``bound_port`` are the
    proxy's outgoing socket; for UDP ASSOCIATE, the relay to send datagrams to
    (RFC 1928 section 6). ``leftover``: stream bytes that followed the reply."""

    bound_addr: str
    bound_port: int
    leftover: bytes = b""


@dataclass(frozen=True, slots=True)
class Failed:
    """The proxy refused. ``reply_code`` is RFC 1928's REP, or None when the
    refusal came before the request (no acceptable method, bad credentials)."""

    reply_code: int | None
    message: str


Event = Connected | Failed


class State(enum.Enum):
    IDLE = "idle"  # no command asked for yet
    AWAIT_METHOD = "await-method"  # greeting sent (RFC 1928 section 3)
    AWAIT_AUTH = "await-auth"  # username/password sent (RFC 1929 section 2)
    AWAIT_REPLY = "await-reply"  # request sent (RFC 1928 sections 4 and 6)
    ESTABLISHED = "established"  # Connected emitted: the stream now belongs to the caller
    FAILED = "failed"  # Failed emitted: the caller should close the connection


# --- addresses: RFC 1928 section 5 (ATYP, DST.ADDR, DST.PORT) ---------------------------------


def emit_address(host: str, port: int) -> bytes:
    """ATYP + ADDR + PORT for an IP literal or a domain name (sent as is, for the
    proxy to resolve: RFC 1928 section 5, X'03')."""
    if not 0 <= port <= 0xFFFF:
        raise Socks5LocalError(f"port {port} out of range")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    if isinstance(ip, ipaddress.IPv4Address):
        return bytes((AddressType.IPV4,)) + ip.packed + _PORT.pack(port)
    if isinstance(ip, ipaddress.IPv6Address):
        return bytes((AddressType.IPV6,)) + ip.packed + _PORT.pack(port)
    try:
        name = host.encode("ascii") if host.isascii() else host.encode("idna")
    except UnicodeError as exc:
        raise Socks5LocalError(f"domain {host!r} cannot be encoded: {exc}") from None
    # "the first octet of the address field contains the number of octets of name that follow"
    if not 1 <= len(name) <= 255:
        raise Socks5LocalError(f"domain of {len(name)} bytes: SOCKS5 carries 1 to 255")
    return bytes((AddressType.DOMAIN, len(name))) + name + _PORT.pack(port)


def _address_len(data: bytes | bytearray | memoryview, offset: int) -> int | None:
    """Length of the ATYP+ADDR+PORT at ``offset``, or None while too few bytes
    arrived to tell. An unknown ATYP is the proxy's fault."""
    if len(data) <= offset:
        return None
    atype = data[offset]
    if atype == AddressType.IPV4:
        return 1 + 4 + 2
    if atype == AddressType.IPV6:
        return 1 + 16 + 2
    if atype == AddressType.DOMAIN:
        if len(data) <= offset + 1:
            return None
        return 2 + data[offset + 1] + 2
    raise Socks5RemoteError(f"unknown address type {atype:#04x}")


def _parse_address(data: bytes | bytearray | memoryview, offset: int) -> tuple[str, int]:
    """Decode a complete ATYP+ADDR+PORT (``_address_len`` said it is all there)."""
    atype = data[offset]
    if atype == AddressType.IPV4:
        host = str(ipaddress.IPv4Address(bytes(data[offset + 1 : offset + 5])))
        end = offset + 5
    elif atype == AddressType.IPV6:
        host = ipaddress.IPv6Address(bytes(data[offset + 1 : offset + 17])).compressed
        end = offset + 17
    else:
        length = data[offset + 1]
        raw = bytes(data[offset + 2 : offset + 2 + length])
        try:
            host = raw.decode("ascii")
        except UnicodeDecodeError:
            raise Socks5RemoteError(f"domain {raw!r} is not ASCII") from None
        end = offset + 2 + length
    (port,) = _PORT.unpack_from(data, end)
    return host, port


# --- the client state machine ------------------------------------------------------------------


class Socks5Client:
    """One SOCKS5 control connection, from greeting to the command's reply."""

    def __init__(self, auth: tuple[str, str] | None = None, *, pipeline: bool = False) -> None:
        self._pipeline = pipeline
        self._credentials: bytes | None = None
        if auth is not None:
            username, password = (part.encode("utf-8") for part in auth)
            # RFC 1929 section 2: ULEN and PLEN are one octet each, 1 to 255.
            if not 1 <= len(username) <= 255 or not 1 <= len(password) <= 255:
                raise Socks5LocalError("username and password must each be 1 to 255 bytes")
            self._credentials = (
                bytes((AUTH_VERSION, len(username)))
                + username
                + bytes((len(password),))
                + password
            )
        self._state = State.IDLE
        self._request = b""
        self._offered: tuple[Method, ...] = ()
        self._inbox = bytearray()
        self._outbox = bytearray()

    @property
    def state(self) -> State:
        return self._state

    # commands

    def connect(self, host: str, port: int) -> None:
        """Ask for a CONNECT to ``host`` (IP literal, or a domain the proxy resolves)."""
        self._start(Command.CONNECT, host, port)

    def udp_associate(self, host: str = "0.0.0.0", port: int = 0) -> None:
        """Ask for a UDP relay. ``host``/``port``: where our datagrams will come
        from; RFC 1928 section 4 says all zeros when not known yet."""
        self._start(Command.UDP_ASSOCIATE, host, port)

    def _start(self, command: Command, host: str, port: int) -> None:
        if self._state is not State.IDLE:
            raise Socks5LocalError(f"one command per connection (state is {self._state.value})")
        # RFC 1928 section 4: VER CMD RSV ATYP DST.ADDR DST.PORT
        self._request = bytes((VERSION, command, 0x00)) + emit_address(host, port)
        # RFC 1928 section 3: VER NMETHODS METHODS. With credentials we offer
        # both, so a proxy that needs none may still pick NO_AUTH.
        if self._credentials is None:
            self._offered = (Method.NO_AUTH,)
        elif self._pipeline:
            # One method, so the proxy's choice is known before it answers.
            self._offered = (Method.USERNAME_PASSWORD,)
        else:
            self._offered = (Method.NO_AUTH, Method.USERNAME_PASSWORD)
        self._outbox += bytes((VERSION, len(self._offered), *self._offered))
        if self._pipeline:
            # Greeting, credentials and request in one write: one round trip less. RFC
            # 1928 has each message wait for the reply before it; a proxy that reads
            # its input as a stream (dante does) takes them early, one that reads a
            # message per recv() (microsocks, ssh -D) ignores the rest and stalls.
            self._outbox += (self._credentials or b"") + self._request
        self._state = State.AWAIT_METHOD

    # I/O boundary

    def data_to_send(self) -> bytes:
        data = bytes(self._outbox)
        self._outbox.clear()
        return data

    def receive_data(self, data: bytes) -> list[Event]:
        """Feed bytes from the proxy; return the events they complete."""
        if self._state is State.FAILED:
            return []  # the refusal is known; whatever follows does not matter
        if self._state is State.ESTABLISHED:
            raise Socks5LocalError("the handshake is over: stream bytes belong to the caller")
        if self._state is State.IDLE:
            if data:
                raise Socks5RemoteError("the proxy spoke before the client")
            return []
        self._inbox += data
        events: list[Event] = []
        while True:
            event, progressed = self._step()
            if event is not None:
                events.append(event)
            if not progressed or self._state in (State.ESTABLISHED, State.FAILED):
                return events

    def receive_eof(self) -> list[Event]:
        """The proxy closed its side. Mid-handshake that breaks the protocol."""
        if self._state in (State.AWAIT_METHOD, State.AWAIT_AUTH, State.AWAIT_REPLY):
            raise Socks5RemoteError(
                f"the proxy closed the connection during the handshake ({self._state.value})"
            )
        return []

    def _step(self) -> tuple[Event | None, bool]:
        """Parse one message from the inbox if it is complete: (event, progressed)."""
        inbox = self._inbox
        if self._state is State.AWAIT_METHOD:
            # RFC 1928 section 3: VER METHOD
            if len(inbox) < 2:
                return None, False
            version, method = inbox[0], inbox[1]
            del inbox[:2]
            if version != VERSION:
                raise Socks5RemoteError(f"method selection with version {version}, not 5")
            if method == Method.NO_ACCEPTABLE:
                self._fail()
                return Failed(None, "the proxy accepts none of our authentication methods"), True
            if method not in self._offered:
                raise Socks5RemoteError(f"the proxy chose method {method:#04x}, never offered")
            if method == Method.USERNAME_PASSWORD:
                assert self._credentials is not None  # only offered with credentials
                if not self._pipeline:
                    self._outbox += self._credentials
                self._state = State.AWAIT_AUTH
            else:
                self._send_request()
            return None, True

        if self._state is State.AWAIT_AUTH:
            # RFC 1929 section 2: VER STATUS; "A STATUS field of X'00' indicates success."
            if len(inbox) < 2:
                return None, False
            version, status = inbox[0], inbox[1]
            del inbox[:2]
            # Some servers answer with VER 5 (the outer protocol's); nothing is ambiguous.
            if version not in (AUTH_VERSION, VERSION):
                raise Socks5RemoteError(f"username/password reply with version {version}")
            if status != 0x00:
                self._fail()
                return Failed(None, "the proxy rejected the username or password"), True
            self._send_request()
            return None, True

        # State.AWAIT_REPLY. RFC 1928 section 6: VER REP RSV ATYP BND.ADDR BND.PORT
        if len(inbox) < 4:
            return None, False
        version, reply = inbox[0], inbox[1]
        if version != VERSION:
            raise Socks5RemoteError(f"reply with version {version}, not 5")
        # RSV (inbox[2]) is ignored: RFC 1928 gives it no meaning, and being strict buys nothing.
        length = _address_len(inbox, 3)
        if length is None or len(inbox) < 3 + length:
            return None, False
        host, port = _parse_address(inbox, 3)
        leftover = bytes(inbox[3 + length :])
        inbox.clear()
        if reply == Reply.SUCCEEDED:
            self._state = State.ESTABLISHED
            return Connected(host, port, leftover), True
        self._fail()
        message = REPLY_MESSAGES.get(reply, f"unassigned reply code {reply:#04x}")
        return Failed(reply, message), True

    def _send_request(self) -> None:
        if not self._pipeline:
            self._outbox += self._request
        self._state = State.AWAIT_REPLY

    def _fail(self) -> None:
        self._state = State.FAILED
        self._inbox.clear()


# --- UDP relay datagrams: RFC 1928 section 7 ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class UdpDatagram:
    """RSV(2) FRAG(1) ATYP DST.ADDR DST.PORT DATA.

    To the relay, host/port name the destination; from the relay, the source
    the payload came from."""

    host: str
    port: int
    payload: bytes
    frag: int = 0

    @classmethod
    def parse(cls, data: bytes) -> UdpDatagram:
        """Parse one datagram; raise Socks5RemoteError if it is malformed."""
        length = _address_len(data, 3)
        if len(data) < 4 or length is None or len(data) < 3 + length:
            raise Socks5RemoteError(f"UDP datagram of {len(data)} bytes: header truncated")
        # RSV (data[0:2]) should be X'0000'; as for the TCP reply, it carries nothing.
        host, port = _parse_address(data, 3)
        return cls(host, port, bytes(data[3 + length :]), frag=data[2])

    @classmethod
    def unwrap(cls, data: bytes) -> UdpDatagram | None:
        """Parse a datagram from the relay; None for a fragment.

        RFC 1928 section 7: "An implementation that does not support
        fragmentation MUST drop any datagram whose FRAG field is other than X'00'."
        """
        datagram = cls.parse(data)
        return None if datagram.frag != 0 else datagram

    @staticmethod
    def payload_of(data: bytes) -> bytes | None:
        """The payload of a datagram from the relay, its source address skipped, not
        decoded (the session knows whom it talks to): ``unwrap(data).payload`` at a
        fraction of the cost, per datagram. None for a fragment; raises
        Socks5RemoteError for a truncated header or an unknown address type."""
        length = _address_len(data, 3)
        if len(data) < 4 or length is None or len(data) < 3 + length:
            raise Socks5RemoteError(f"UDP datagram of {len(data)} bytes: header truncated")
        return None if data[2] != 0 else data[3 + length :]

    def emit(self) -> bytes:
        if not 0 <= self.frag <= 0xFF:
            raise Socks5LocalError(f"FRAG {self.frag} out of range")
        return bytes((0x00, 0x00, self.frag)) + emit_address(self.host, self.port) + self.payload

    @staticmethod
    def header(host: str, port: int) -> bytes:
        """The header alone, to prepend to many payloads for one destination."""
        return b"\x00\x00\x00" + emit_address(host, port)
