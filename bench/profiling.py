"""py-spy profiles of tunproxy under load: record raw stacks, reduce them to a top-N table.

``py-spy record --format raw`` writes collapsed stacks, one line per distinct stack::

    <module> (tunproxy/__main__.py:3);main (tunproxy/cli.py:80);... 1234

(root first, leaf last, then the sample count). *Self* time is a function's share of
samples in which it is the leaf; *total* is its share of samples in which it appears at
all. The self column says where the interpreter actually spends its time.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")


@dataclass(frozen=True)
class ProfileRow:
    function: str
    self_pct: float
    total_pct: float


@dataclass(frozen=True)
class Profile:
    title: str
    samples: int
    rows: list[ProfileRow]
    raw_path: str
    # Share of the recording the thread was running (py-spy leaves idle samples out).
    busy_pct: float | None = None
    notes: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, object]:
        return {
            "title": self.title, "samples": self.samples, "raw": self.raw_path,
            "busy_pct": self.busy_pct, "notes": list(self.notes),
            "top": [vars(row) for row in self.rows],
        }


def available() -> bool:
    return shutil.which("py-spy") is not None


RATE = 200  # samples per second


def start_recording(pid: int, seconds: int, output: Path) -> subprocess.Popen[bytes]:
    """Sample ``pid`` for ``seconds``; ``--nonblocking`` so the proxy is not paused to read it."""
    return subprocess.Popen(
        ["py-spy", "record", "--pid", str(pid), "--duration", str(seconds),
         "--rate", str(RATE), "--format", "raw", "--nonblocking", "--output", str(output)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )


def frame_name(frame: str) -> str:
    """``func (path/to/file.py:123)`` -> ``func (file.py)``: one row per function, not per line."""
    match = _FRAME.match(frame.strip())
    if match is None:
        return frame.strip()
    path = match.group("file")
    # Keep the package-relative part of the path: .../site-packages/x/y.py -> x/y.py.
    for marker in ("site-packages/", "/main/", "/lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{match.group('func')} ({path})"


def summarize(
    raw: str, title: str, raw_path: str, top: int = 15, seconds: float | None = None,
    notes: tuple[str, ...] = (),
) -> Profile:
    self_counts: Counter[str] = Counter()
    total_counts: Counter[str] = Counter()
    samples = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [frame_name(f) for f in stack.split(";") if f]
        if not frames:
            continue
        samples += count
        self_counts[frames[-1]] += count
        for name in set(frames):
            total_counts[name] += count
    rows = [
        ProfileRow(name, 100.0 * n / samples, 100.0 * total_counts[name] / samples)
        for name, n in self_counts.most_common(top)
    ] if samples else []
    busy = None if not seconds else min(100.0, 100.0 * samples / (RATE * seconds))
    return Profile(title, samples, rows, raw_path, busy, notes)


def render(profile: Profile) -> str:
    busy = f", busy {profile.busy_pct:.0f}% of the time" if profile.busy_pct is not None else ""
    lines = [f"py-spy: {profile.title} ({profile.samples} samples{busy}; raw stacks: "
             f"{profile.raw_path})"]
    lines += [f"  {note}" for note in profile.notes]
    lines.append(f"  {'self%':>6} {'total%':>7}  function")
    for row in profile.rows:
        lines.append(f"  {row.self_pct:6.1f} {row.total_pct:7.1f}  {row.function}")
    if not profile.rows:
        lines.append("  (no samples)")
    return "\n".join(lines)
