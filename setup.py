"""Build hook: compile the sans-I/O packages (``stack/``, ``rules/``) with mypyc when it can.

The pure-Python sources stay the source of truth and the fallback: every module keeps its
``.py`` beside its compiled ``.so``, and ``tunproxy_native`` picks which one runs (and refuses
a stale ``.so``). Compiling needs mypy (a build requirement in pyproject.toml), a C compiler
and the Python headers (Debian: gcc, python3-dev). When one is missing, or compiling fails,
the build prints one line saying why and installs pure Python. ``TUNPROXY_PURE_PYTHON=1`` in
the environment skips compiling (``install.sh --pure``).
"""

from __future__ import annotations

import os
import shutil
import sys
import sysconfig
from pathlib import Path
from typing import Any

from setuptools import setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import tunproxy_native  # noqa: E402  (the module that owns the list and the manifest format)

# The C compiler's optimisation level (mypyc's opt_level; gcc -O3 by default).
OPT_ENV = "TUNPROXY_MYPYC_OPT"


def say(line: str) -> None:
    # pip shows a build's output only with -v; stderr of a successful build is shown by
    # neither, so install.sh repeats the outcome from `tunproxy --version`.
    print(f"tunproxy: {line}", file=sys.stderr, flush=True)


def why_not_compile() -> str | None:
    """Why this build cannot compile, or None when it can try."""
    if os.environ.get(tunproxy_native.PURE_ENV, "") not in ("", "0"):
        return f"{tunproxy_native.PURE_ENV} is set"
    if sys.implementation.name != "cpython":
        return f"{sys.implementation.name} is not CPython"
    try:
        import mypyc.build  # noqa: F401
    except ImportError:
        return "mypy (mypyc) is not installed in the build environment"
    include = sysconfig.get_paths()["include"]
    if not Path(include, "Python.h").exists():
        return f"no Python headers ({include}/Python.h; Debian: apt install python3-dev)"
    cc = (os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(cc) is None:
        return f"no C compiler ({cc}; Debian: apt install gcc)"
    return None


class BuildNative(build_ext):
    """build_ext that falls back to pure Python instead of failing the install, and writes
    the manifest of the sources it compiled."""

    def run(self) -> None:
        if not self.extensions:
            return
        try:
            super().run()
        except Exception as exc:  # a compiler error: the install goes on in pure Python
            say(f"compiling stack/ and rules/ failed ({type(exc).__name__}; `pip install -v` "
                "shows the compiler's output); installing pure Python")
            self._remove_outputs()
            return
        root = HERE if self.inplace else Path(self.build_lib)
        tunproxy_native.write_manifest(HERE, root)
        say("stack/ and rules/ compiled with mypyc")

    def _remove_outputs(self) -> None:
        for ext in self.extensions:
            for base in (Path(self.build_lib), HERE):
                path = base / self.get_ext_filename(ext.name)
                path.unlink(missing_ok=True)

    def get_outputs(self) -> list[str]:
        outputs: list[str] = super().get_outputs()
        if self.extensions and not self.inplace:
            outputs += [
                str(Path(self.build_lib, m)) for m in tunproxy_native.manifest_paths()
            ]
        return outputs


def remove_in_tree_build() -> None:
    """An editable install asked for pure Python: remove what an earlier editable build
    compiled into the source tree, which would run while its sources match (a wheel's build,
    `pip install .`, leaves the tree alone)."""
    built = [*HERE.glob("*__mypyc*.so")]
    for pkg in tunproxy_native.PACKAGES:
        built += [*(HERE / pkg).rglob("*.so"), HERE / pkg / tunproxy_native.MANIFEST]
    for path in built:
        path.unlink(missing_ok=True)


def ext_modules() -> list[Any]:
    reason = why_not_compile()
    if reason is not None:
        say(f"not compiling stack/ and rules/: {reason}; installing pure Python")
        if reason.startswith(tunproxy_native.PURE_ENV) and "editable_wheel" in sys.argv:
            remove_in_tree_build()
        return []
    from mypyc.build import mypycify

    sources = [str(p.relative_to(HERE)) for p in tunproxy_native.compiled_sources(HERE)]
    try:
        return list(mypycify(sources, opt_level=os.environ.get(OPT_ENV, "3")))
    except BaseException as exc:  # mypy's type check fails with SystemExit
        say(f"mypyc could not compile stack/ and rules/ ({exc!r}); installing pure Python")
        return []


setup(ext_modules=ext_modules(), cmdclass={"build_ext": BuildNative})
