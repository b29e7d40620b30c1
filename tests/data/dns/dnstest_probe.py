"""Run a DnsService inside a test's network namespace and report what it answered.

    ip netns exec NS python3 dnstest_probe.py '{"dns": {...}, "steps": [...]}'

``"socks5": "host:port"`` sends every upstream flow through that proxy.
Steps: ``{"op": "query", "name": "a.test", "type": "A", "network": "udp",
"count": 1, "edns": false}`` (``count`` identical queries at once) and
``{"op": "resolve", "name": "a.test"}``. Prints one JSON object: a result list
per step, the service's counters, and the domain each answered address maps to.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

from dnslib import EDNS0, QTYPE, RCODE, DNSRecord

from tunproxy.dns.config import parse_dns_config
from tunproxy.dns.service import DnsService
from tunproxy.outbounds.base import Outbound, Target
from tunproxy.outbounds.direct import DirectOutbound
from tunproxy.outbounds.socks5 import Socks5Outbound

DIRECT = DirectOutbound()
flows: list[list[str]] = []  # what the "rules" were asked: [network, target]


def make_outbound_for(spec: dict[str, Any]) -> Any:
    """DIRECT, or every upstream flow through the SOCKS5 proxy in ``spec["socks5"]``."""
    outbound: Outbound = DIRECT
    if spec.get("socks5"):
        host, _, port = spec["socks5"].rpartition(":")
        outbound = Socks5Outbound("proxy", host, int(port))

    def outbound_for(network: str, target: Target) -> Outbound:
        flows.append([network, str(target)])
        return outbound

    return outbound_for


async def query(svc: DnsService, step: dict[str, Any], ident: int) -> dict[str, Any]:
    record = DNSRecord.question(step["name"], step.get("type", "A"))
    record.header.id = ident
    if step.get("edns"):
        record.add_ar(EDNS0(udp_len=4096))
    start = time.monotonic()
    wire = await svc.handle_query(
        record.pack(), network=step.get("network", "udp"), client=("127.0.0.1", 50000 + ident)
    )
    elapsed = time.monotonic() - start
    if wire is None:
        return {"dropped": True, "elapsed": elapsed}
    reply = DNSRecord.parse(wire)
    return {
        "id": reply.header.id,
        "rcode": RCODE.get(reply.header.rcode),
        "tc": bool(reply.header.tc),
        "answers": [str(rr.rdata) for rr in reply.rr],
        "types": [QTYPE.get(rr.rtype) for rr in reply.rr],
        "elapsed": elapsed,
    }


async def main(spec: dict[str, Any]) -> dict[str, Any]:
    svc = DnsService(parse_dns_config(spec["dns"], "probe"), make_outbound_for(spec))
    results: list[Any] = []
    mapped: dict[str, str | None] = {}
    try:
        for step in spec["steps"]:
            if step["op"] == "query":
                count = int(step.get("count", 1))
                answers = await asyncio.gather(*(query(svc, step, i + 1) for i in range(count)))
                for answer in answers:
                    for address in answer.get("answers", []):
                        mapped[address] = svc.domain_for(address)
                results.append(answers)
            elif step["op"] == "resolve":
                start = time.monotonic()
                addresses = await svc.resolve(step["name"])
                results.append({"addresses": addresses, "elapsed": time.monotonic() - start})
            else:
                raise ValueError(f"unknown op {step['op']!r}")
    finally:
        await svc.aclose()
    return {"results": results, "counters": svc.counters, "mapped": mapped, "flows": flows}


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(json.loads(sys.argv[1])))))
