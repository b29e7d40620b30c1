"""``tunproxy capture [--process NAME ...] -w FILE|-``: pcapng from a running tunproxy.

Asks the controller (``GET /capture``) for the selected flows' packets and writes the
stream to FILE, or to stdout with ``-w -`` (``tunproxy capture --process curl -w - |
wireshark -k -i -``). Only whole pcapng blocks are written, so Ctrl-C (or the end of the
stream at ``--limit``) leaves a valid file. HTTP with stdlib ``urllib``, as ``top`` does.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, BinaryIO

__all__ = ["BlockSplitter", "add_arguments", "main"]

DEFAULT_FILE_LIMIT = 256 * 1024 * 1024  # -w FILE without --limit: a capture cannot fill the disk
READ_SIZE = 65536
_SHB = 0x0A0D0D0A
_MAGIC = 0x1A2B3C4D


class BlockSplitter:
    """Bytes in, whole pcapng blocks out (a block's length is in its header)."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._order: Any = None

    def feed(self, data: bytes) -> bytes:
        buf = self._buf
        buf += data
        end = 0
        while len(buf) - end >= 12:
            if self._order is None:
                magic = buf[end + 8:end + 12]
                self._order = "little" if int.from_bytes(magic, "little") == _MAGIC else "big"
            length = int.from_bytes(buf[end + 4:end + 8], self._order)
            if length < 12 or length % 4:
                raise ValueError("the controller sent something that is not pcapng")
            if len(buf) - end < length:
                break
            end += length
        out = bytes(buf[:end])
        del buf[:end]
        return out


def add_arguments(parser: Any) -> None:
    parser.add_argument("--controller", metavar="HOST:PORT", default="127.0.0.1:9090",
                        help="the controller of the running tunproxy (default: 127.0.0.1:9090)")
    parser.add_argument("--secret", default=None, help="the controller's secret")
    for key, meta, what in (("process", "NAME", "a process name"), ("pid", "N", "a pid"),
                            ("uid", "N", "a user id"), ("domain", "D", "a domain (and its "
                            "subdomains)"), ("rule", "R", "a part of the rule's text"),
                            ("flow", "ID", "a flow id")):
        parser.add_argument(f"--{key}", metavar=meta, action="append", default=[],
                            help=f"only the flows of {what} (repeatable)")
    parser.add_argument("-c", "--limit", metavar="BYTES", type=int, default=None,
                        help="stop after this many bytes (default: 256 MiB to a file, none "
                        "to stdout)")
    parser.add_argument("-w", dest="write", metavar="FILE", required=True,
                        help="write the pcapng here; - for stdout")


def _url(args: Any) -> str:
    query: list[tuple[str, str]] = []
    for key in ("process", "pid", "uid", "domain", "rule", "flow"):
        query.extend((key, str(v)) for v in getattr(args, key))
    limit = args.limit if args.limit is not None else (
        None if args.write == "-" else DEFAULT_FILE_LIMIT)
    if limit is not None:
        query.append(("limit", str(limit)))
    return f"http://{args.controller}/capture?{urllib.parse.urlencode(query)}"


def _fail(message: str) -> int:
    print(f"tunproxy capture: {message}", file=sys.stderr)
    return 1


def main(args: Any) -> int:
    if args.limit is not None and args.limit <= 0:
        return _fail("--limit takes a number of bytes above 0")
    request = urllib.request.Request(_url(args))
    if args.secret:
        request.add_header("Authorization", f"Bearer {args.secret}")
    # SIGTERM ends a capture as Ctrl-C does: with a valid file.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        response = urllib.request.urlopen(request, timeout=None)
    except urllib.error.HTTPError as exc:
        reason = exc.reason
        with contextlib.suppress(Exception):
            import json

            reason = json.loads(exc.read()).get("message", reason)
        hint = " (give --secret)" if exc.code == 401 else ""
        return _fail(f"the controller at {args.controller} answered {exc.code}: "
                     f"{reason}{hint}")
    except (urllib.error.URLError, OSError) as exc:
        why = getattr(exc, "reason", exc)
        return _fail(f"cannot reach the controller at {args.controller}: {why}")
    except KeyboardInterrupt:
        return 130
    try:
        out: BinaryIO = sys.stdout.buffer if args.write == "-" else open(args.write, "wb")  # noqa: SIM115
    except OSError as exc:
        response.close()
        return _fail(f"cannot write {args.write}: {exc.strerror}")
    splitter = BlockSplitter()
    try:
        with response:
            while True:
                data = response.read1(READ_SIZE)
                if not data:
                    break
                blocks = splitter.feed(data)
                if blocks:
                    out.write(blocks)
                    out.flush()
    except KeyboardInterrupt:
        pass
    except BrokenPipeError:
        # The reader (wireshark) went: that ends the capture; no complaint at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except (OSError, ValueError) as exc:
        return _fail(f"the capture stream broke: {exc}")
    finally:
        if args.write != "-":
            with contextlib.suppress(OSError):
                out.close()
    return 0
