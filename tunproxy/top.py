"""``tunproxy top``: a live terminal view of the flows, over the controller API.

Like nethogs: one line per process (flows, rates and bytes each way), expanded on demand
into its flows (destination, state, rule, outbound). ``TopView`` is the model (a snapshot
in, rows and commands out, tested without a terminal); ``run`` is the curses adapter
(stdlib ``curses``: a terminal UI library that every Python on Linux has, which is all a
table with a cursor needs) and ``ApiClient`` the HTTP side (stdlib ``urllib``: one GET a
second and a DELETE per ``k``).

Keys: Up/Down/PgUp/PgDn/Home/End move, Enter/Right/Space expand or collapse a process,
Left collapses, ``a`` expands or collapses all, ``s`` cycles the sort, ``/`` filters
(process, host or address; Enter applies, Esc clears), ``k`` closes the selected flow
(or every flow of the selected process), ``q`` quits.
"""

from __future__ import annotations

import curses
import json
import os
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ApiClient", "Row", "TopView", "run"]

SORTS = ("down", "up", "total", "flows", "name")


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"  # pragma: no cover


@dataclass(slots=True)
class Flow:
    id: str
    group: str
    network: str
    dest: str
    state: str
    rule: str
    outbound: str
    up: int
    down: int
    rate_up: float
    rate_down: float

    @classmethod
    def parse(cls, c: dict[str, Any]) -> Flow:
        m = c.get("metadata", {})
        extra = c.get("tunproxy") or {}
        process = m.get("process") or ""
        pid = extra.get("pid")
        if process and pid:
            group = f"{process} ({pid})"
        elif process:
            group = process
        else:
            group = f"? ({extra.get('attribution') or 'unknown'})"
        host = m.get("host") or m.get("destinationIP", "")
        port = m.get("destinationPort", "")
        dest = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        rule_obj = extra.get("rule") or {}
        where = f" {rule_obj['file'].rsplit('/', 1)[-1]}:{rule_obj['line']}" \
            if rule_obj.get("file") else ""
        rule = f"{c.get('rule', '')} {c.get('rulePayload', '')}".strip() + where
        chains = c.get("chains") or []
        return cls(
            id=str(c.get("id")), group=group, network=m.get("network", ""), dest=dest,
            state=extra.get("state", ""), rule=rule, outbound=" > ".join(reversed(chains)),
            up=int(c.get("upload", 0)), down=int(c.get("download", 0)),
            rate_up=float(extra.get("uploadRate", 0.0)),
            rate_down=float(extra.get("downloadRate", 0.0)),
        )


@dataclass(slots=True)
class Row:
    """One screen line: a process group (``flow`` None) or one of its flows."""

    group: str
    flow: Flow | None
    text: str


@dataclass
class TopView:
    flows: list[Flow] = field(default_factory=list)
    totals: tuple[int, int] = (0, 0)
    sort: str = "down"
    filter: str = ""
    expanded: set[str] = field(default_factory=set)
    selected: int = 0
    selected_key: tuple[str, str | None] | None = None  # kept across refreshes
    message: str = ""

    def update(self, snapshot: dict[str, Any]) -> None:
        self.flows = [Flow.parse(c) for c in snapshot.get("connections", [])]
        self.totals = (int(snapshot.get("uploadTotal", 0)), int(snapshot.get("downloadTotal", 0)))
        self._restore_selection()

    # -- rows ---------------------------------------------------------------------------------
    def _visible(self) -> list[Flow]:
        text = self.filter.lower()
        if not text:
            return self.flows
        return [f for f in self.flows if text in f.group.lower() or text in f.dest.lower()]

    def groups(self) -> list[tuple[str, list[Flow]]]:
        by: dict[str, list[Flow]] = {}
        for f in self._visible():
            by.setdefault(f.group, []).append(f)
        sort = self.sort

        def flow_key(f: Flow) -> float:
            if sort == "down":
                return -f.rate_down
            if sort == "up":
                return -f.rate_up
            if sort == "total":
                return -(f.up + f.down)
            return 0.0

        def group_key(g: tuple[str, list[Flow]]) -> tuple[float, str]:
            if sort == "flows":
                return (-len(g[1]), g[0])
            if sort == "name":
                return (0.0, g[0])
            return (sum(flow_key(f) for f in g[1]), g[0])

        items = sorted(by.items(), key=group_key)
        return [(name, sorted(fl, key=lambda f: (flow_key(f), f.dest))) for name, fl in items]

    def rows(self) -> list[Row]:
        rows = []
        for name, flows in self.groups():
            open_ = name in self.expanded
            mark = "-" if open_ else "+"
            up = sum(f.up for f in flows)
            down = sum(f.down for f in flows)
            rate_up = sum(f.rate_up for f in flows)
            rate_down = sum(f.rate_down for f in flows)
            rows.append(Row(name, None,
                            f"{mark} {name[:34]:<34} {len(flows):>5} {human(rate_up) + '/s':>11} "
                            f"{human(rate_down) + '/s':>11} {human(up):>10} {human(down):>10}"))
            if open_:
                for f in flows:
                    rows.append(Row(name, f,
                                    f"    #{f.id:<6} {f.network} {f.dest[:40]:<40} {f.state:<11} "
                                    f"{human(f.rate_up) + '/s':>11} {human(f.rate_down) + '/s':>11}"
                                    f" {human(f.up):>10} {human(f.down):>10}  {f.rule} -> "
                                    f"{f.outbound}"))
        return rows

    def header(self) -> str:
        flows = self._visible()
        rate_up = sum(f.rate_up for f in flows)
        rate_down = sum(f.rate_down for f in flows)
        filt = f"  filter: {self.filter}" if self.filter else ""
        return (f"tunproxy top  {len(flows)} flows  up {human(rate_up)}/s  "
                f"down {human(rate_down)}/s  total up {human(self.totals[0])} "
                f"down {human(self.totals[1])}  sort: {self.sort}{filt}")

    @staticmethod
    def columns() -> str:
        return (f"  {'PROCESS':<34} {'FLOWS':>5} {'UP/s':>11} {'DOWN/s':>11} {'UP':>10} "
                f"{'DOWN':>10}")

    # -- selection and keys --------------------------------------------------------------------
    def _restore_selection(self) -> None:
        rows = self.rows()
        if self.selected_key is not None:
            for i, row in enumerate(rows):
                if (row.group, row.flow.id if row.flow else None) == self.selected_key:
                    self.selected = i
                    return
        self.selected = max(0, min(self.selected, len(rows) - 1))
        self._remember(rows)

    def _remember(self, rows: list[Row]) -> None:
        if rows:
            row = rows[self.selected]
            self.selected_key = (row.group, row.flow.id if row.flow else None)
        else:
            self.selected_key = None

    def move(self, delta: int) -> None:
        rows = self.rows()
        self.selected = max(0, min(self.selected + delta, len(rows) - 1))
        self._remember(rows)

    def current(self) -> Row | None:
        rows = self.rows()
        return rows[self.selected] if 0 <= self.selected < len(rows) else None

    def toggle(self, expand: bool | None = None) -> None:
        row = self.current()
        if row is None:
            return
        want = (row.group not in self.expanded) if expand is None else expand
        if want:
            self.expanded.add(row.group)
        else:
            self.expanded.discard(row.group)
            if row.flow is not None:  # collapse from a flow: select its process
                self.selected_key = (row.group, None)
        self._restore_selection()

    def toggle_all(self) -> None:
        names = [name for name, _ in self.groups()]
        self.expanded = set() if self.expanded >= set(names) else set(names)
        self._restore_selection()

    def cycle_sort(self) -> None:
        self.sort = SORTS[(SORTS.index(self.sort) + 1) % len(SORTS)]
        self._restore_selection()

    def to_close(self) -> list[str]:
        """``k``: the ids of the selected flow, or of every flow of the selected process."""
        row = self.current()
        if row is None:
            return []
        if row.flow is not None:
            return [row.flow.id]
        return [f.id for name, flows in self.groups() if name == row.group for f in flows]


class ApiClient:
    def __init__(self, base: str, secret: str | None, timeout: float = 3.0) -> None:
        self.base = base.rstrip("/")
        self.headers = {"Authorization": f"Bearer {secret}"} if secret else {}
        self.timeout = timeout

    def _request(self, method: str, path: str) -> bytes:
        req = urllib.request.Request(self.base + path, method=method, headers=self.headers)
        with urllib.request.urlopen(req, timeout=self.timeout) as resp:
            return bytes(resp.read())

    def snapshot(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self._request("GET", "/connections"))
        return data

    def close(self, flow_id: str) -> bool:
        try:
            self._request("DELETE", f"/connections/{flow_id}")
            return True
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return False
            raise


def _describe(exc: Exception) -> str:
    if isinstance(exc, urllib.error.HTTPError):
        if exc.code == 401:
            return "the controller wants a secret: --secret, or --rules with the config"
        return f"the controller answered {exc.code}"
    if isinstance(exc, urllib.error.URLError):
        return f"cannot reach the controller: {exc.reason}"
    return f"{type(exc).__name__}: {exc}"


def run(client: ApiClient, interval: float = 1.0) -> int:
    """The curses loop: refresh every ``interval`` seconds, keys in between."""
    # The terminal's own size (ncurses asks the tty), not a COLUMNS/LINES inherited from
    # whatever shell started us, which would freeze the view at that size.
    os.environ.pop("COLUMNS", None)
    os.environ.pop("LINES", None)
    return int(curses.wrapper(_main, client, interval))


def _main(screen: Any, client: ApiClient, interval: float) -> int:
    curses.curs_set(0)
    screen.timeout(100)
    view = TopView()
    next_fetch = 0.0
    notice_until = 0.0  # a notice ("closed 1 flow") stays this long over refreshes
    editing: str | None = None
    while True:
        now = time.monotonic()
        if now >= next_fetch:
            try:
                view.update(client.snapshot())
                if now >= notice_until:
                    view.message = ""
            except Exception as exc:  # shown, retried; the view never dies of the network
                view.message = _describe(exc)
            next_fetch = now + interval
        _draw(screen, view, editing)
        key = screen.getch()
        if key == -1:
            continue
        if editing is not None:
            if key in (10, 13, curses.KEY_ENTER):
                view.filter, editing = editing, None
                view._restore_selection()
            elif key == 27:
                view.filter, editing = "", None
                view._restore_selection()
            elif key in (curses.KEY_BACKSPACE, 127, 8):
                editing = editing[:-1]
            elif 32 <= key < 127:
                editing += chr(key)
            continue
        if key in (ord("q"), ord("Q")):
            return 0
        if key == curses.KEY_DOWN:
            view.move(1)
        elif key == curses.KEY_UP:
            view.move(-1)
        elif key == curses.KEY_NPAGE:
            view.move(max(1, screen.getmaxyx()[0] - 4))
        elif key == curses.KEY_PPAGE:
            view.move(-max(1, screen.getmaxyx()[0] - 4))
        elif key == curses.KEY_HOME:
            view.move(-(1 << 30))
        elif key == curses.KEY_END:
            view.move(1 << 30)
        elif key in (10, 13, curses.KEY_ENTER, ord(" ")):
            view.toggle()
        elif key == curses.KEY_RIGHT:
            view.toggle(True)
        elif key == curses.KEY_LEFT:
            view.toggle(False)
        elif key == ord("a"):
            view.toggle_all()
        elif key == ord("s"):
            view.cycle_sort()
        elif key == ord("/"):
            editing = view.filter
        elif key == ord("k"):
            ids = view.to_close()
            try:
                closed = sum(1 for i in ids if client.close(i))
                view.message = f"closed {closed} flow{'s' if closed != 1 else ''}"
            except Exception as exc:
                view.message = _describe(exc)
            notice_until = time.monotonic() + 3.0
            next_fetch = 0.0


def _draw(screen: Any, view: TopView, editing: str | None) -> None:
    screen.erase()
    height, width = screen.getmaxyx()

    def put(y: int, text: str, attr: int = 0) -> None:
        if 0 <= y < height:
            screen.addnstr(y, 0, text.ljust(width), width - 1, attr)

    put(0, view.header(), curses.A_BOLD)
    put(1, view.columns(), curses.A_REVERSE)
    rows = view.rows()
    space = max(1, height - 3)
    top = max(0, min(view.selected - space // 2, len(rows) - space))
    for i, row in enumerate(rows[top: top + space]):
        attr = curses.A_REVERSE if top + i == view.selected else 0
        put(2 + i, row.text, attr | (curses.A_BOLD if row.flow is None else 0))
    if editing is not None:
        status = f"filter: {editing}_"
    else:
        status = view.message or ("q quit  arrows move  Enter expand  a all  s sort  "
                                  "/ filter  k close flow")
    put(height - 1, status, curses.A_DIM)
    screen.refresh()


def add_arguments(parser: Any) -> None:
    parser.add_argument("--controller", metavar="HOST:PORT", default=None,
                        help="the controller to watch (default: from --config, else "
                        "127.0.0.1:9090)")
    parser.add_argument("--secret", default=None, help="the controller's secret")
    parser.add_argument("--config", metavar="FILE", default=None,
                        help="take the controller's address and secret from this rules file")
    parser.add_argument("--interval", type=float, default=1.0,
                        help="seconds between refreshes (default: 1)")


def main(args: Any) -> int:
    listen, secret = "127.0.0.1:9090", args.secret
    if args.config is not None:
        from tunproxy.config import load_config

        controller = load_config(args.config).controller
        if controller is None:
            from tunproxy.errors import ConfigError

            raise ConfigError("has no 'controller' section for tunproxy top to connect to",
                              args.config)
        host = f"[{controller.host}]" if ":" in controller.host else controller.host
        listen = f"{host}:{controller.port}"
        secret = secret or controller.secret
    if args.controller is not None:
        listen = args.controller
    return run(ApiClient(f"http://{listen}", secret), max(0.2, args.interval))
