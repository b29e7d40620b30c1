"""Real-world rule-provider files: format detection, skipped entries, ``rules:``, ``//``
comments, ``.mrs`` (encoded here from mihomo's documented layout), inline and http providers."""

from __future__ import annotations

import http.server
import struct
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zstandard

import rules
from rules import FlowMeta, RuleSource
from tunproxy.cli import main
from tunproxy.errors import ConfigError
from tunproxy.ruleload import load_rules


def flow(domain: str | None = None, dst_ip: str | None = None) -> FlowMeta:
    return FlowMeta("tcp", "10.0.0.2", 40000, dst_ip, 443, domain)


def one(data: rules.RuleSetData, target: str = "REJECT") -> rules.RuleSet:
    return rules.compile([RuleSource(f"RULE-SET,{data.name},{target}", "c.yaml", 1)],
                         {data.name: data}, ())


# --- mrs encoder, after mihomo's component/trie/domain_set.go and ipcidr_set_bin.go ---------


def _set_bit(words: list[int], i: int) -> None:
    while i >> 6 >= len(words):
        words.append(0)
    words[i >> 6] |= 1 << (i & 63)


def domain_set_bin(trie_keys: list[str]) -> bytes:
    """DomainSet.WriteBin for keys as mihomo's DomainTrie.Foreach yields them (``+.x`` for a
    subdomain wildcard, plain ``x``, ``*.x``)."""
    keys = sorted(k[::-1] for k in trie_keys)
    leaves: list[int] = []
    bitmap: list[int] = []
    labels = bytearray()
    queue = [(0, len(keys), 0)]
    bm = 0
    i = 0
    while i < len(queue):
        s, e, col = queue[i]
        if col == len(keys[s]):
            s += 1
            _set_bit(leaves, i)
        j = s
        while j < e:
            frm = j
            while j < e and keys[j][col] == keys[frm][col]:
                j += 1
            queue.append((frm, j, col + 1))
            labels.append(ord(keys[frm][col]))
            bm += 1  # a 0 bit
        _set_bit(bitmap, bm)
        bm += 1
        i += 1
    out = bytearray(b"\x01")
    for words in (leaves, bitmap):
        out += struct.pack(">q", len(words)) + b"".join(struct.pack(">Q", w) for w in words)
    out += struct.pack(">q", len(labels)) + bytes(labels)
    return bytes(out)


def ipcidr_set_bin(ranges: list[tuple[str, str]]) -> bytes:
    import ipaddress

    def a16(text: str) -> bytes:
        a = ipaddress.ip_address(text)
        if a.version == 4:
            return b"\x00" * 10 + b"\xff\xff" + a.packed
        return a.packed

    out = bytearray(b"\x01") + struct.pack(">q", len(ranges))
    for lo, hi in ranges:
        out += a16(lo) + a16(hi)
    return bytes(out)


def mrs(behavior: int, count: int, body: bytes) -> bytes:
    raw = b"MRS\x01" + bytes([behavior]) + struct.pack(">qq", count, 0) + body
    return zstandard.ZstdCompressor().compress(raw)


def test_mrs_domain_set_matches_like_mihomo(tmp_path: Path) -> None:
    # Inserting "+.google.com" gives the trie keys "google.com" and "+.google.com".
    keys = ["google.com", "+.google.com", "exact.org", "*.one.net", "+.sub.io", "a.*.pat.cn"]
    path = tmp_path / "g.mrs"
    path.write_bytes(mrs(0, 5, domain_set_bin(keys)))
    data = rules.parse_rule_set("g", path.read_bytes(), behavior="domain", format=None,
                                file=str(path))
    assert data.format == "mrs"
    assert sorted(data.entries) == sorted(["google.com", ".google.com", "exact.org",
                                           "*.one.net", ".sub.io", "a.*.pat.cn"])
    rs = one(data)
    for domain, hit in [
        ("google.com", True), ("mail.google.com", True), ("exact.org", True),
        ("x.exact.org", False), ("a.one.net", True), ("one.net", False), ("a.b.one.net", False),
        ("sub.io", False), ("x.sub.io", True), ("a.x.pat.cn", True), ("example.com", False),
    ]:
        assert (rs.match(flow(domain)).target == "REJECT") is hit, domain
    v = rs.match(flow("exact.org"))
    assert v.rule_set_entry is not None and f"({path}, entry " in v.rule_set_entry


def test_mrs_ipcidr_set(tmp_path: Path) -> None:
    body = ipcidr_set_bin([("10.0.0.0", "10.255.255.255"), ("1.2.3.4", "1.2.3.9"),
                           ("2001:db8::", "2001:db8::ffff")])
    data = rules.parse_rule_set("c", mrs(1, 3, body), behavior="ipcidr", format="mrs", file="c")
    rs = one(data)
    for ip, hit in [("10.1.2.3", True), ("11.0.0.1", False), ("1.2.3.4", True),
                    ("1.2.3.9", True), ("1.2.3.10", False), ("2001:db8::12", True),
                    ("::ffff:10.0.0.1", True), ("2001:db9::", False)]:
        assert (rs.match(flow(dst_ip=ip)).target == "REJECT") is hit, ip
    # A range that is not one CIDR is kept as the CIDRs that cover it exactly.
    assert "1.2.3.4/30" in data.entries and "1.2.3.8/31" in data.entries


@pytest.mark.parametrize(
    ("blob", "problem"),
    [
        (b"not zstd at all", "not a zstd stream"),
        (zstandard.ZstdCompressor().compress(b"MRX\x01\x00"), "magic"),
        (mrs(1, 1, ipcidr_set_bin([("1.1.1.1", "1.1.1.1")])), "holds a ipcidr set"),
        (mrs(0, 1, domain_set_bin(["a.com"]))[:-6], "zstd"),
        (zstandard.ZstdCompressor().compress(b"MRS\x01\x00" + b"\x00" * 16 + b"\x01"),
         "truncated"),
    ],
)
def test_bad_mrs_is_one_error(blob: bytes, problem: str) -> None:
    with pytest.raises(rules.RuleError) as info:
        rules.parse_rule_set("x", blob, behavior="domain", format="mrs", file="x.mrs")
    assert info.value.file == "x.mrs"
    assert problem in info.value.message


# --- formats and skipped entries -----------------------------------------------------------


def test_format_detected_from_content() -> None:
    detect = rules.provider.detect_format
    assert detect(b"payload:\n  - a.com\n") == "yaml"
    assert detect(b"# header\nrules:\n  - DOMAIN,a.com\n") == "yaml"
    assert detect(b"a.com\n+.b.com\n") == "text"
    assert detect(b"\x28\xb5\x2f\xfd....") == "mrs"


def test_rules_key_comments_and_bad_entries_skipped() -> None:
    text = (
        "rules:\n"
        "  - DOMAIN-SUFFIX,ok.com\n"
        "  - URL-REGEX,^http://x\n"
        "  - USER-AGENT,foo*\n"
        "  - DOMAIN,fine.org\n"
    )
    data = rules.parse_rule_set("s", text, behavior="classical", format=None, file="s.yaml")
    assert data.entries == ("DOMAIN-SUFFIX,ok.com", "DOMAIN,fine.org")
    assert [(line, why.split(":")[0]) for line, why in data.skipped] == [
        (3, "URL-REGEX,^http"), (4, "USER-AGENT,foo*")
    ]
    assert "unknown rule type 'URL-REGEX'" in data.skipped[0][1]
    text = "// premium-style comment\n# hash comment\n+.a.com\n*.pimg.tw\nbad..name\n"
    data = rules.parse_rule_set("t", text, behavior="domain", format=None, file="t.list")
    assert data.format == "text"
    assert data.entries == ("+.a.com", "*.pimg.tw")
    assert [line for line, _ in data.skipped] == [5]


def test_check_counts_skipped_entries(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                      caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "ads.list").write_text("+.ads.example\nnot a domain\nhttp://x/y\n")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("rule-sets:\n  ads:\n    path: ads.list\n    behavior: domain\n"
                   "rules:\n  - RULE-SET,ads,REJECT\n  - MATCH,DIRECT\n")
    assert main(["check", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "ok: 2 rules" in out and "2 warnings" in out
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warned == [
        f"{tmp_path / 'ads.list'}:2: rule set ads: entry skipped: not a domain: "
        "'not a domain' is not a domain name",
        f"{tmp_path / 'ads.list'}:3: rule set ads: entry skipped: http://x/y: a domain has no '/'",
    ]


def settings(**kw: Any) -> dict[str, Any]:
    return {**kw, "__file__": "cfg.yaml", "__line__": 4}


def test_inline_provider() -> None:
    s = settings(type="inline", behavior="classical",
                 payload=["DOMAIN,a.com", "GARBAGE,x", "IP-CIDR,10.0.0.0/8"],
                 __payload_lines__=[5, 6, 7])
    warnings: list[str] = []
    rs = load_rules([RuleSource("RULE-SET,in,REJECT", "cfg.yaml", 9)], {"in": s}, Path("."),
                    (), warnings)
    assert rs.match(flow("a.com")).target == "REJECT"
    assert rs.match(flow(dst_ip="10.9.9.9")).target == "REJECT"
    assert warnings == ["cfg.yaml:6: rule set in: entry skipped: GARBAGE,x: "
                        "unknown rule type 'GARBAGE'"]


# --- http providers: cached beside the config ------------------------------------------------


@pytest.fixture
def server() -> Iterator[tuple[str, dict[str, bytes], http.server.HTTPServer]]:
    files: dict[str, bytes] = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = files.get(self.path)
            self.send_response(200 if body is not None else 404)
            self.end_headers()
            if body is not None:
                self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    srv = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}", files, srv
    finally:
        srv.shutdown()
        srv.server_close()


def test_http_provider_cached_and_cache_used_when_refresh_fails(
    tmp_path: Path, server: tuple[str, dict[str, bytes], http.server.HTTPServer],
    caplog: pytest.LogCaptureFixture,
) -> None:
    base, files, _ = server
    files["/ads.yaml"] = b"payload:\n  - '+.ads.example'\n"
    s = settings(type="http", behavior="domain", url=f"{base}/ads.yaml", interval=3600)
    line = [RuleSource("RULE-SET,ads,REJECT", "cfg.yaml", 9)]
    rs = load_rules(line, {"ads": s}, tmp_path, ())
    assert rs.match(flow("x.ads.example")).target == "REJECT"
    cached = tmp_path / "providers" / "ads"
    assert cached.read_bytes() == files["/ads.yaml"]
    # Fresh within interval: used without asking the server (which now has other content).
    files["/ads.yaml"] = b"payload:\n  - '+.other.example'\n"
    rs = load_rules(line, {"ads": s}, tmp_path, ())
    assert rs.match(flow("x.ads.example")).target == "REJECT"
    # Stale (interval 1 s, file made old) and the server fails: the cached copy is used.
    import os

    os.utime(cached, (1, 1))
    del files["/ads.yaml"]
    s1 = settings(type="http", behavior="domain", url=f"{base}/ads.yaml", interval=1)
    rs = load_rules(line, {"ads": s1}, tmp_path, ())
    assert rs.match(flow("x.ads.example")).target == "REJECT"
    assert any("using the cached copy" in r.getMessage() for r in caplog.records)
    # Stale and the server answers: refreshed.
    files["/ads.yaml"] = b"payload:\n  - '+.other.example'\n"
    rs = load_rules(line, {"ads": s1}, tmp_path, ())
    assert rs.match(flow("x.other.example")).target == "REJECT"
    assert rs.match(flow("x.ads.example")).target == "DIRECT"


def test_http_provider_without_cache_or_server_is_an_error(
    tmp_path: Path, server: tuple[str, dict[str, bytes], http.server.HTTPServer],
) -> None:
    base, _, _ = server
    s = settings(type="http", behavior="domain", url=f"{base}/missing", path="rules/m.yaml")
    with pytest.raises(ConfigError) as info:
        load_rules([], {"m": s}, tmp_path, ())
    assert (info.value.file, info.value.line) == ("cfg.yaml", 4)
    assert "no cached copy" in info.value.message and "rules/m.yaml" in info.value.message


# --- rule lines: options, PASS, COMPATIBLE, aliases ------------------------------------------


def compile_lines(lines: list[str], **kw: Any) -> rules.RuleSet:
    return rules.compile([RuleSource(t, "c.yaml", i) for i, t in enumerate(lines, 1)], {},
                         ["proxy"], **kw)


def test_options_mihomo_ignores_are_accepted() -> None:
    rs = compile_lines(["DOMAIN,a.com,proxy,src", "IP-CIDR,10.0.0.0/8,REJECT,no-resolve,foo",
                        "IP-CIDR,10.0.0.0/8,DROP,src"])
    assert rs.match(flow("a.com")).target == "proxy"
    assert rs.match(flow(dst_ip="10.1.1.1")).target == "REJECT"
    f = FlowMeta("tcp", "10.0.0.2", 1, "8.8.8.8", 53)
    assert rs.match(f).target == "DROP"  # src: the source address matched


def test_pass_goes_on_and_compatible_is_direct() -> None:
    rs = compile_lines(["DOMAIN-SUFFIX,a.com,PASS", "DOMAIN,x.a.com,proxy", "MATCH,COMPATIBLE"])
    v = rs.match(flow("x.a.com"))
    assert (v.target, v.rule and v.rule.line) == ("proxy", 2)
    v = rs.match(flow("y.a.com"))
    assert (v.target, v.rule and v.rule.line) == ("DIRECT", 3)


def test_aliases_and_refused_targets() -> None:
    rs = compile_lines(["DOMAIN,a.com,Auto", "MATCH,Final"],
                       aliases={"Auto": "proxy", "Final": "REJECT"})
    assert rs.match(flow("a.com")).target == "proxy"
    assert rs.match(flow("b.com")).target == "REJECT"
    with pytest.raises(rules.RuleError) as info:
        compile_lines(["DOMAIN,a.com,proxy", "MATCH,hk-vmess"],
                      refused={"hk-vmess": "proxy 'hk-vmess' is of type vmess, which tunproxy "
                                            "does not implement"})
    assert info.value.line == 2 and "type vmess" in info.value.message


def test_http_provider_not_downloaded_from_inside_the_event_loop(
    tmp_path: Path, server: tuple[str, dict[str, bytes], http.server.HTTPServer],
) -> None:
    """A reload runs in the event loop: a stale cached copy is kept, not fetched again."""
    import asyncio
    import os

    base, files, _ = server
    (tmp_path / "providers").mkdir()
    cached = tmp_path / "providers" / "ads"
    cached.write_bytes(b"payload:\n  - '+.old.example'\n")
    os.utime(cached, (1, 1))
    files["/ads.yaml"] = b"payload:\n  - '+.new.example'\n"
    s = settings(type="http", behavior="domain", url=f"{base}/ads.yaml", interval=60)
    line = [RuleSource("RULE-SET,ads,REJECT", "cfg.yaml", 9)]

    async def reload() -> rules.RuleSet:
        return load_rules(line, {"ads": s}, tmp_path, ())

    rs = asyncio.run(reload())
    assert rs.match(flow("x.old.example")).target == "REJECT"
    rs = load_rules(line, {"ads": s}, tmp_path, ())  # at start: refreshed
    assert rs.match(flow("x.new.example")).target == "REJECT"
