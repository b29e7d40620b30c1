"""GeoIP, ASN and geosite databases for GEOIP / IP-ASN / GEOSITE rules, opened lazily.

- GeoIP: an MMDB file read with ``maxminddb`` (MaxMind's reader): MaxMind/DB-IP country
  databases (``country.iso_code``), sing-geoip (a string per network) and MetaCubeX's
  ``geoip.metadb`` (a string or a list of strings), told apart by the database type as
  mihomo's ``component/mmdb`` does. Opened at the first lookup, not at start.
- ASN: a GeoLite2-ASN-shaped MMDB (``autonomous_system_number``).
- geosite: v2ray's ``geosite.dat`` (protobuf ``GeoSiteList``), read here by hand: only the
  lists the rules name are decoded, into classical rule sets (Plain -> DOMAIN-KEYWORD,
  Regex -> DOMAIN-REGEX, Domain -> DOMAIN-SUFFIX, Full -> DOMAIN). ``name@attr`` keeps the
  entries carrying that attribute, as mihomo does.

Settings (``geodata:`` in tunproxy's dialect): ``mmdb``, ``asn``, ``geosite`` paths relative
to the config file. Without them, the files mihomo users have beside their config are used
when present: ``geoip.metadb`` or ``Country.mmdb``, ``GeoLite2-ASN.mmdb`` or ``ASN.mmdb``,
``GeoSite.dat`` or ``geosite.dat``.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import rules
from rules.provider import rule_set_from_entries
from rules.syntax import Leaf
from tunproxy.errors import ConfigError

__all__ = ["GeoData", "parse_geosite_index", "read_geosite_list"]

_DEFAULTS = {
    "mmdb": ("geoip.metadb", "Country.mmdb", "country.mmdb"),
    "asn": ("GeoLite2-ASN.mmdb", "ASN.mmdb"),
    "geosite": ("GeoSite.dat", "geosite.dat"),
}
_KINDS = {0: "DOMAIN-KEYWORD", 1: "DOMAIN-REGEX", 2: "DOMAIN-SUFFIX", 3: "DOMAIN"}
_LABEL = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
_PLAIN_HOST = re.compile(rf"(?:{_LABEL}\.)*{_LABEL}\Z")


# --- protobuf, only what geosite.dat uses (varints and length-delimited fields) ----------


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ValueError("truncated or overlong varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def _fields(buf: bytes, start: int = 0, end: int | None = None) -> list[tuple[int, int, Any]]:
    """(field number, wire type, value): an int for varints, (start, end) for bytes."""
    end = len(buf) if end is None else end
    pos = start
    out: list[tuple[int, int, Any]] = []
    while pos < end:
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
            out.append((number, wire, value))
        elif wire == 2:
            n, pos = _varint(buf, pos)
            if pos + n > end:
                raise ValueError("a field runs past its message")
            out.append((number, wire, (pos, pos + n)))
            pos += n
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
    if pos != end:
        raise ValueError("a field runs past its message")
    return out


def parse_geosite_index(buf: bytes) -> dict[str, tuple[int, int]]:
    """List name (lower case) -> where its GeoSite message is. Raises ValueError."""
    index: dict[str, tuple[int, int]] = {}
    for number, wire, value in _fields(buf):
        if number != 1 or wire != 2:
            continue
        start, end = value
        for n2, w2, v2 in _fields(buf, start, end):
            if n2 == 1 and w2 == 2:
                code = buf[v2[0] : v2[1]].decode("utf-8", "replace").lower()
                index[code] = (start, end)
                break
    return index


def _domain_fast(buf: bytes, start: int, end: int) -> tuple[int, str] | None:
    """The usual Domain message, ``08 type 12 len value`` with one-byte varints and no
    attributes, read without the general field walker; None for anything else."""
    kind = 0
    p = start
    if p < end and buf[p] == 0x08:
        if p + 1 >= end or buf[p + 1] & 0x80:
            return None
        kind = buf[p + 1]
        p += 2
    if p + 1 >= end or buf[p] != 0x12 or buf[p + 1] & 0x80 or p + 2 + buf[p + 1] != end:
        return None
    return kind, buf[p + 2 : end].decode("utf-8", "replace")


def read_geosite_list(buf: bytes, where: tuple[int, int], attr: str | None) -> list[str]:
    """The classical rule lines of one GeoSite message. Raises ValueError."""
    out: list[str] = []
    for number, wire, value in _fields(buf, *where):
        if number != 2 or wire != 2:
            continue
        fast = _domain_fast(buf, *value) if attr is None else None
        if fast is not None:
            kind, text = fast
        else:
            kind = 0
            text = ""
            attrs: set[str] = set()
            for n2, w2, v2 in _fields(buf, *value):
                if n2 == 1 and w2 == 0:
                    kind = v2
                elif n2 == 2 and w2 == 2:
                    text = buf[v2[0] : v2[1]].decode("utf-8", "replace")
                elif n2 == 3 and w2 == 2:
                    for n3, w3, v3 in _fields(buf, *v2):
                        if n3 == 1 and w3 == 2:
                            attrs.add(buf[v3[0] : v3[1]].decode("utf-8", "replace").lower())
            if attr is not None and attr not in attrs:
                continue
        rule = _KINDS.get(kind)
        if rule is not None and text:
            out.append(f"{rule},{text}")
    return out


def _geosite_set(name: str, lines: list[str], file: str) -> rules.RuleSetData:
    """The list's rule lines as a classical set, the plain kinds built directly (a geosite
    list has ~100k of them; the general parser would take ~4 us each)."""
    parsed: list[Any] = []
    kept: list[str] = []
    numbers: list[int] = []
    slow: list[tuple[str, int]] = []
    for i, line in enumerate(lines, 1):
        kind, _, value = line.partition(",")
        if kind in ("DOMAIN", "DOMAIN-SUFFIX") and _PLAIN_HOST.match(value):
            parsed.append(Leaf(kind, value))
            kept.append(line)
            numbers.append(i)
        else:
            slow.append((line, i))
    rest = rule_set_from_entries(name, slow, behavior="classical", format="geosite", file=file) \
        if slow else None
    if rest is not None:
        parsed.extend(rest.parsed)
        kept.extend(rest.entries)
        numbers.extend(rest.lines)
    if not parsed:
        raise ValueError(f"{name}: no usable entry")
    return rules.RuleSetData(name=name, behavior="classical", format="geosite", file=file,
                             entries=kept, lines=numbers, parsed=parsed,
                             skipped=rest.skipped if rest is not None else ())


class GeoData:
    """``rules.GeoIP`` over MMDB files, and geosite lists, each file opened on first use."""

    def __init__(self, mmdb: Path | None, asn: Path | None, geosite: Path | None) -> None:
        self.paths = {"mmdb": mmdb, "asn": asn, "geosite": geosite}
        self._readers: dict[str, Any] = {}
        self._kind = ""
        self._site: tuple[bytes, dict[str, tuple[int, int]]] | None = None

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any] | None, base_dir: Path,
                      file: str | None = None, line: int | None = None) -> GeoData:
        settings = settings or {}
        paths: dict[str, Path | None] = {}
        for key, names in _DEFAULTS.items():
            given = settings.get(key)
            if given is not None:
                if not isinstance(given, str) or not given:
                    raise ConfigError(f"geodata.{key}: expected a file path", file, line)
                paths[key] = base_dir / given
                continue
            paths[key] = next((base_dir / n for n in names if (base_dir / n).is_file()), None)
        unknown = sorted(set(settings) - set(_DEFAULTS) - {"__line__", "__file__"})
        if unknown:
            raise ConfigError(f"geodata: unknown key {unknown[0]!r} (known: mmdb, asn, geosite)",
                              file, line)
        return cls(paths["mmdb"], paths["asn"], paths["geosite"])

    # --- MMDB ------------------------------------------------------------------------------

    def _reader(self, which: str) -> Any:
        reader = self._readers.get(which)
        if reader is None:
            import maxminddb

            path = self.paths[which]
            assert path is not None
            reader = maxminddb.open_database(str(path))
            self._readers[which] = reader
            if which == "mmdb":
                kind = str(reader.metadata().database_type)
                self._kind = ("sing" if "sing-geoip" in kind
                              else "meta" if "Meta-geoip" in kind else "maxmind")
        return reader

    @staticmethod
    def _ip(v6: bool, addr: int) -> str:
        return str(ipaddress.IPv6Address(addr) if v6 else ipaddress.IPv4Address(addr))

    def countries(self, v6: bool, addr: int) -> Sequence[str]:
        try:
            record = self._reader("mmdb").get(self._ip(v6, addr))
        except (ValueError, OSError):
            return ()
        if self._kind == "maxmind":
            if isinstance(record, dict):
                code = (record.get("country") or {}).get("iso_code")
                return (code.lower(),) if isinstance(code, str) and code else ()
            return ()
        if isinstance(record, str):
            return (record.lower(),)
        if isinstance(record, list):
            return tuple(str(r).lower() for r in record)
        return ()

    def asn(self, v6: bool, addr: int) -> str | None:
        try:
            record = self._reader("asn").get(self._ip(v6, addr))
        except (ValueError, OSError):
            return None
        if isinstance(record, dict):
            n = record.get("autonomous_system_number")
            if isinstance(n, int):
                return str(n)
        return None

    # --- geosite ---------------------------------------------------------------------------

    def geosite(self, code: str) -> rules.RuleSetData:
        """The list ``code`` (``name`` or ``name@attr``) as a classical rule set.
        Raises ValueError (the rule engine reports it at the rule's line)."""
        path = self.paths["geosite"]
        if path is None:
            raise ValueError(f"GEOSITE,{code} needs a geosite database (geodata.geosite, or "
                             "GeoSite.dat beside the config)")
        if self._site is None:
            try:
                buf = path.read_bytes()
            except OSError as exc:
                raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from None
            self._site = (buf, parse_geosite_index(buf))
        buf, index = self._site
        name, _, attr = code.lower().partition("@")
        where = index.get(name)
        if where is None:
            raise ValueError(f"no list {name!r} in {path}")
        lines = read_geosite_list(buf, where, attr or None)
        return _geosite_set(f"geosite:{code}", lines, f"{path} ({name})")

    def release(self) -> None:
        """Drop the geosite file's bytes once the rules are compiled (lists are read at
        compile time only)."""
        self._site = None

    def available(self, what: str) -> bool:
        path = self.paths["mmdb" if what == "country" else "asn"]
        return path is not None and path.is_file()
