"""mihomo's binary rule-set format (``.mrs``), read into ``RuleSetData``.

An ``.mrs`` file is one zstd stream holding (all integers big-endian)::

    b"MRS\\x01"  behavior:u8 (0 domain, 1 ipcidr)  count:i64  extra_len:i64  extra
    then the behaviour's own binary (mihomo rules/provider/mrs_reader.go):

    ipcidr  version:u8=1  n:i64  n x (from:16 bytes, to:16 bytes)   inclusive ranges,
            IPv4 as IPv4-mapped IPv6 (component/cidr/ipcidr_set_bin.go)
    domain  version:u8=1  n:i64 n x leaves:u64  n:i64 n x label_bitmap:u64  n:i64 labels
            (component/trie/domain_set_bin.go): a LOUDS-encoded character trie of the
            *reversed* keys. Nodes are numbered breadth first; the bitmap holds, node after
            node, a 0 per child edge (its label in ``labels``, in the same order) and a 1
            closing the node; bit i of the bitmap is bit i%64 of word i//64; ``leaves`` has
            bit ``node`` set when a key ends there. A key ``+.example.com`` means subdomains
            only (mihomo stores ``+.x`` rules as ``x`` and ``+.x``); ``*`` stands for one
            label.

Decoding is pure; ``zstandard`` is imported on first use.
"""

from __future__ import annotations

import struct
from array import array

from rules.provider import RuleSetData, rule_set_from_entries

__all__ = ["MAGIC", "decode_mrs"]

MAGIC = b"MRS\x01"
_BEHAVIORS = {0: "domain", 1: "ipcidr", 2: "classical"}
_I64 = struct.Struct(">q")
# A rule set over this size once decompressed is refused (a zstd bomb, not a rule set).
MAX_SIZE = 1 << 30


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise ValueError(f"truncated at byte {self.pos} (wanted {n} more)")
        b = self.data[self.pos : self.pos + n]
        self.pos += n
        return b

    def i64(self) -> int:
        value: int = _I64.unpack(self.take(8))[0]
        return value

    def length(self, what: str, width: int) -> int:
        n = self.i64()
        if n < 1 or n * width > len(self.data) - self.pos:
            raise ValueError(f"bad {what} length {n}")
        return n

    def u64s(self, what: str) -> list[int]:
        n = self.length(what, 8)
        return list(struct.unpack(f">{n}Q", self.take(8 * n)))


def decompress(raw: bytes) -> bytes:
    import zstandard

    out = bytearray()
    dec = zstandard.ZstdDecompressor().decompressobj()
    try:
        # Fed in pieces, so a zstd bomb is refused near MAX_SIZE, not after filling memory.
        for start in range(0, len(raw), 1 << 16):
            out += dec.decompress(raw[start : start + (1 << 16)])
            if len(out) > MAX_SIZE:
                raise ValueError("larger than 1 GiB once decompressed")
    except zstandard.ZstdError as exc:
        raise ValueError(f"not a zstd stream: {exc}") from None
    if not dec.eof:
        raise ValueError("the zstd stream is cut short")
    return bytes(out)


def decode_mrs(name: str, raw: bytes, *, behavior: str, file: str) -> RuleSetData:
    """Decode a whole ``.mrs`` file. Raises ValueError when it is malformed or holds
    another behaviour than ``behavior``."""
    r = _Reader(decompress(raw))
    if r.take(4) != MAGIC:
        raise ValueError("no MRS\\x01 magic")
    kind = _BEHAVIORS.get(r.take(1)[0], "unknown")
    if kind != behavior:
        raise ValueError(f"it holds a {kind} set, the config says behavior: {behavior}")
    r.i64()  # count of source rules: informative only
    extra = r.i64()
    if extra < 0:
        raise ValueError("bad extra length")
    r.take(extra)
    if r.take(1) != b"\x01":
        raise ValueError("unknown set version")
    entries = _ipcidr_entries(r) if kind == "ipcidr" else _domain_entries(r)
    # Entries are numbered from 1 in place of line numbers.
    items = [(e, i) for i, e in enumerate(entries, 1)]
    return rule_set_from_entries(name, items, behavior=kind, format="mrs", file=file)


def _ipcidr_entries(r: _Reader) -> list[str]:
    import ipaddress

    n = r.length("range", 32)
    out: list[str] = []
    for _ in range(n):
        lo = int.from_bytes(r.take(16), "big")
        hi = int.from_bytes(r.take(16), "big")
        v4 = lo >> 32 == 0xFFFF and hi >> 32 == 0xFFFF
        if v4:
            lo &= 0xFFFFFFFF
            hi &= 0xFFFFFFFF
        if lo > hi:
            raise ValueError("a range ends before it starts")
        first = ipaddress.ip_address(lo) if v4 else ipaddress.IPv6Address(lo)
        last = ipaddress.ip_address(hi) if v4 else ipaddress.IPv6Address(hi)
        out.extend(str(net) for net in ipaddress.summarize_address_range(first, last))
    return out


def _domain_entries(r: _Reader) -> list[str]:
    leaves = r.u64s("leaves")
    bitmap = r.u64s("label bitmap")
    labels = r.take(r.length("labels", 1))
    n_nodes = len(labels) + 1
    parent = array("i", [-1]) * n_nodes
    node = 0
    edge = 0  # edges seen = index into labels; edge k leads to node k + 1
    bits = "".join(format(w, "064b")[::-1] for w in bitmap)
    for bit in bits:
        if bit == "0":
            if edge >= len(labels):
                raise ValueError("label bitmap has more edges than labels")
            parent[edge + 1] = node
            edge += 1
        else:
            node += 1
            if node >= n_nodes:
                break
    if edge != len(labels):
        raise ValueError("label bitmap has fewer edges than labels")
    out: list[str] = []
    for w, word in enumerate(leaves):
        while word:
            low = word & -word
            leaf = w * 64 + low.bit_length() - 1
            word ^= low
            if leaf >= n_nodes:
                raise ValueError("a leaf past the last node")
            chars = bytearray()
            n = leaf
            while n > 0:
                chars.append(labels[n - 1])
                n = parent[n]
            # The trie holds the key reversed rune by rune (mihomo's utils.Reverse).
            chars.reverse()
            key = chars.decode("utf-8", "replace")[::-1]
            # mihomo's "+." key is subdomains only: our ".x" form.
            out.append(key[1:] if key.startswith("+.") else key)
    return out
