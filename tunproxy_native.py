"""Which build of the sans-I/O packages runs: compiled by mypyc, or the pure-Python sources.

``setup.py`` compiles every module of ``stack/`` and ``rules/`` but their ``__init__.py``
with mypyc when it can, and writes beside each package a manifest (``_native.crc``) of the
sources it compiled. Each compiled module's ``.so`` sits beside its ``.py``, and Python's
import system prefers the ``.so``: after an edit to a ``.py`` in an editable install, the
old compiled code would run instead. So both packages' ``__init__`` import this module first,
and it checks, once per process, before any of their modules load:

- no compiled module: pure Python (nothing to do);
- ``TUNPROXY_PURE_PYTHON=1`` (non-empty, not ``0``) in the environment: pure Python, the
  ``.so`` files ignored (tests run the stack this way too);
- a source changed, added or removed since it was compiled (its CRC-32 and size differ from
  the manifest's): pure Python, with one line on stderr naming the file and how to rebuild;
- else the compiled modules.

Pure Python here means a finder put first on ``sys.meta_path`` that loads the packages'
modules from their ``.py`` only. Cost at start: reading the ~30 sources once (~1 ms).
``STATUS`` maps each package to what runs (``tunproxy --version`` prints it).

Stdlib only and no ``hashlib`` (it loads OpenSSL: issue 17's resident size): setup.py
imports this module from the source tree at build time.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys
import zlib
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

PACKAGES = ("stack", "rules")
PURE_ENV = "TUNPROXY_PURE_PYTHON"
MANIFEST = "_native.crc"
COMPILED = "compiled (mypyc)"
PURE = "pure Python"


def compiled_sources(root: Path) -> list[Path]:
    """The modules mypyc compiles, under the source tree ``root``: every ``.py`` of the
    packages but their ``__init__.py`` (kept interpreted so that this check runs first)."""
    return sorted(
        p
        for pkg in PACKAGES
        for p in (root / pkg).rglob("*.py")
        if p.name != "__init__.py" and "__pycache__" not in p.parts
    )


def manifest_paths() -> list[str]:
    return [f"{pkg}/{MANIFEST}" for pkg in PACKAGES]


def _fingerprint(path: Path) -> str:
    data = path.read_bytes()
    return f"{zlib.crc32(data):08x} {len(data)}"


def _manifest_lines(pkg_dir: Path) -> list[str]:
    return sorted(
        f"{p.relative_to(pkg_dir).as_posix()} {_fingerprint(p)}"
        for p in pkg_dir.rglob("*.py")
        if p.name != "__init__.py" and "__pycache__" not in p.parts
    )


def write_manifest(src_root: Path, out_root: Path) -> None:
    """Record the sources under ``src_root`` that were compiled into ``out_root``."""
    for pkg in PACKAGES:
        out = out_root / pkg / MANIFEST
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("\n".join(_manifest_lines(src_root / pkg)) + "\n")


def _has_compiled(pkg_dir: Path) -> bool:
    suffixes = tuple(importlib.machinery.EXTENSION_SUFFIXES)
    return any(p.name.endswith(suffixes) for p in pkg_dir.rglob("*.so"))


def _stale(pkg_dir: Path) -> str | None:
    """The first source that differs from what was compiled, or None."""
    try:
        recorded = (pkg_dir / MANIFEST).read_text().splitlines()
    except OSError:
        return f"{pkg_dir.name}/{MANIFEST} (the list of compiled sources) is missing"
    now = _manifest_lines(pkg_dir)
    if now == recorded:
        return None
    old = {line.split(" ", 1)[0]: line for line in recorded}
    new = {line.split(" ", 1)[0]: line for line in now}
    for name in sorted(old.keys() | new.keys()):
        if old.get(name) != new.get(name):
            what = "added" if name not in old else "removed" if name not in new else "changed"
            return f"{pkg_dir.name}/{name} was {what} since it was compiled"
    return "the list of compiled sources differs"  # pragma: no cover (same names, same lines)


class SourceOnlyFinder:
    """Finds the modules of ``packages`` from their ``.py`` files only.

    A meta path finder by protocol (``find_spec``), not by subclassing
    ``importlib.abc.MetaPathFinder``: importing ``importlib.abc`` loads
    ``importlib.resources``, ``tempfile``, ``shutil``, ``random``, bz2 and lzma into the
    long-running process (issue 17's resident size; ``tests/test_lean_imports.py``)."""

    def __init__(self, packages: Sequence[str]) -> None:
        self.packages = frozenset(packages)
        self._loader = (importlib.machinery.SourceFileLoader, importlib.machinery.SOURCE_SUFFIXES)

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        # The packages' own __init__.py is never compiled: the usual finders load it.
        if path is None or fullname.partition(".")[0] not in self.packages:
            return None
        for entry in path:
            finder = importlib.machinery.FileFinder(entry or ".", self._loader)
            spec = finder.find_spec(fullname, target)
            if spec is not None and spec.loader is not None:
                return spec
        return None


def _choose() -> dict[str, str]:
    status: dict[str, str] = {}
    pure: list[str] = []
    forced = os.environ.get(PURE_ENV, "") not in ("", "0")
    for pkg in PACKAGES:
        # Through every finder on sys.meta_path (editable installs add one of their own);
        # imports no module of the package, only the package itself when it is not yet.
        spec = importlib.util.find_spec(pkg)
        locations = list(spec.submodule_search_locations or []) if spec else []
        if not locations or not _has_compiled(Path(locations[0])):
            status[pkg] = f"{PURE} (not compiled)"
            continue
        stale = _stale(Path(locations[0]))
        if forced:
            status[pkg] = f"{PURE} ({PURE_ENV}=1)"
        elif stale is not None:
            status[pkg] = f"{PURE} (compiled build is stale: {stale})"
            print(
                f"tunproxy: {stale}: running {pkg}/ as pure Python; rebuild the compiled "
                "modules with `pip install -e .` (or install.sh) to use them again",
                file=sys.stderr,
            )
        else:
            status[pkg] = COMPILED
            continue
        pure.append(pkg)
    if pure:
        sys.meta_path.insert(0, SourceOnlyFinder(pure))
    return status


STATUS: dict[str, str] = _choose()


def describe() -> str:
    """One line: what runs, e.g. ``stack: compiled (mypyc), rules: compiled (mypyc)``."""
    return ", ".join(f"{pkg}: {STATUS[pkg]}" for pkg in PACKAGES)
