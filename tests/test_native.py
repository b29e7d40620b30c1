"""The mypyc-compiled build of stack/ and rules/ and its pure-Python fallback
(``tunproxy_native``): which one runs, and that a stale compiled module never runs.

CI (``.ci/run``) installs the compiled build and sets ``TUNPROXY_EXPECT_COMPILED=1``: there
a silent fall back to pure Python fails ``test_ci_runs_the_compiled_build``, so the suite
tests what users run. It then runs the stack's unit tests once more with
``TUNPROXY_PURE_PYTHON=1``, which this file checks loads every module from its ``.py``.
"""

from __future__ import annotations

import importlib.machinery
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import rules
import stack
import tunproxy_native
from tests.netns import REPO

EXT = importlib.machinery.EXTENSION_SUFFIXES[0]  # e.g. .cpython-311-x86_64-linux-gnu.so
COMPILED_HERE = any((REPO / "stack").rglob(f"*{EXT}"))

PROBE = """
import json, sys
import stack, rules, stack.tcp.endpoint, rules.engine, tunproxy_native
print(json.dumps({"status": tunproxy_native.STATUS,
                  "files": [stack.stack.__file__, stack.tcp.endpoint.__file__,
                            rules.engine.__file__]}))
"""


def probe(cwd: Path, **env: str) -> tuple[dict[str, Any], str]:
    full_env = {k: v for k, v in os.environ.items() if k != tunproxy_native.PURE_ENV}
    full_env.update(env, PYTHONPATH=str(cwd))
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=cwd, env=full_env,
                         capture_output=True, text=True, timeout=120, check=True)
    return json.loads(out.stdout), out.stderr


def test_status_names_what_runs() -> None:
    for pkg, module in (("stack", stack.stack), ("rules", rules.engine)):
        compiled = not (module.__file__ or "").endswith(".py")
        assert (tunproxy_native.STATUS[pkg] == tunproxy_native.COMPILED) == compiled, (
            pkg, tunproxy_native.STATUS[pkg], module.__file__)
    assert tunproxy_native.describe().startswith("stack: ")


def test_version_says_which_build_runs() -> None:
    out = subprocess.run([sys.executable, "-m", "tunproxy", "--version"], cwd=REPO,
                         capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.startswith("tunproxy ")
    assert f"stack: {tunproxy_native.STATUS['stack']}" in out.stdout


@pytest.mark.skipif(not os.environ.get("TUNPROXY_EXPECT_COMPILED"),
                    reason="TUNPROXY_EXPECT_COMPILED is not set (CI sets it)")
def test_ci_runs_the_compiled_build() -> None:
    if os.environ.get(tunproxy_native.PURE_ENV):
        pytest.skip(f"{tunproxy_native.PURE_ENV} is set: this run tests pure Python")
    expected = dict.fromkeys(tunproxy_native.PACKAGES, tunproxy_native.COMPILED)
    assert dict(tunproxy_native.STATUS) == expected
    assert stack.stack.__file__ is not None and stack.stack.__file__.endswith(EXT)


@pytest.mark.skipif(not os.environ.get(tunproxy_native.PURE_ENV),
                    reason=f"{tunproxy_native.PURE_ENV} is not set")
def test_pure_run_loads_every_module_from_source() -> None:
    loaded = [m for name, m in sys.modules.items()
              if name.partition(".")[0] in tunproxy_native.PACKAGES]
    assert len(loaded) > 10
    for module in loaded:
        assert (module.__file__ or "").endswith(".py"), module


def copy_tree(dst: Path) -> None:
    """The compiled packages and their shared library, as an install lays them out."""
    for pkg in tunproxy_native.PACKAGES:
        shutil.copytree(REPO / pkg, dst / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "tunproxy_native.py", dst)
    for lib in REPO.glob(f"*__mypyc{EXT}"):
        shutil.copy(lib, dst)


@pytest.mark.skipif(not COMPILED_HERE, reason="stack/ is not compiled in this tree")
def test_compiled_or_forced_pure(tmp_path: Path) -> None:
    copy_tree(tmp_path)
    result, err = probe(tmp_path)
    assert result["status"] == {"stack": "compiled (mypyc)", "rules": "compiled (mypyc)"}, err
    assert all(f.endswith(EXT) for f in result["files"])
    result, _ = probe(tmp_path, **{tunproxy_native.PURE_ENV: "1"})
    assert all(f.endswith(".py") for f in result["files"])
    assert "TUNPROXY_PURE_PYTHON=1" in str(result["status"])


@pytest.mark.skipif(not COMPILED_HERE, reason="stack/ is not compiled in this tree")
def test_an_edited_source_runs_as_python_not_its_stale_compiled_module(tmp_path: Path) -> None:
    copy_tree(tmp_path)
    udp = tmp_path / "stack" / "udp.py"
    udp.write_text(udp.read_text() + "\n# edited after compiling\n")
    result, err = probe(tmp_path)
    assert "stack/udp.py was changed since it was compiled" in err
    assert "pure Python (compiled build is stale" in result["status"]["stack"]
    assert result["status"]["rules"] == "compiled (mypyc)"
    files = result["files"]
    assert files[0].endswith("stack/stack.py") and files[2].endswith(EXT)


# The manifest and the finder on a package of our own: no compiler needed.


def test_manifest_names_the_changed_added_or_removed_source(tmp_path: Path) -> None:
    for name in tunproxy_native.PACKAGES:
        (tmp_path / name / "sub").mkdir(parents=True)
        (tmp_path / name / "__init__.py").write_text("")
        (tmp_path / name / "a.py").write_text("A = 1\n")
        (tmp_path / name / "sub" / "b.py").write_text("B = 1\n")
    tunproxy_native.write_manifest(tmp_path, tmp_path)
    pkg = tmp_path / "stack"
    assert tunproxy_native._stale(pkg) is None
    (pkg / "__init__.py").write_text("# never compiled: not in the manifest\n")
    assert tunproxy_native._stale(pkg) is None
    (pkg / "sub" / "b.py").write_text("B = 2\n")
    assert tunproxy_native._stale(pkg) == "stack/sub/b.py was changed since it was compiled"
    (pkg / "sub" / "b.py").write_text("B = 1\n")
    (pkg / "c.py").write_text("")
    assert tunproxy_native._stale(pkg) == "stack/c.py was added since it was compiled"
    (pkg / "c.py").unlink()
    (pkg / "a.py").unlink()
    assert tunproxy_native._stale(pkg) == "stack/a.py was removed since it was compiled"
    (pkg / tunproxy_native.MANIFEST).unlink()
    assert "is missing" in (tunproxy_native._stale(pkg) or "")


def test_source_only_finder_skips_the_extension_module(tmp_path: Path) -> None:
    pkg = tmp_path / "nativeprobe"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "mod.py").write_text("WHERE = 'source'\n")
    (pkg / f"mod{EXT}").write_bytes(b"not an ELF file")  # what the usual finder would load
    code = (
        "import sys, tunproxy_native\n"
        "if sys.argv[1] == 'finder':\n"
        "    sys.meta_path.insert(0, tunproxy_native.SourceOnlyFinder(['nativeprobe']))\n"
        "import nativeprobe.mod\n"
        "print(nativeprobe.mod.WHERE)\n"
    )
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}"}
    with_finder = subprocess.run([sys.executable, "-c", code, "finder"], env=env,
                                 capture_output=True, text=True, timeout=60)
    assert with_finder.returncode == 0, with_finder.stderr
    assert with_finder.stdout.strip() == "source"
    without = subprocess.run([sys.executable, "-c", code, "plain"], env=env,
                             capture_output=True, text=True, timeout=60)
    assert without.returncode != 0 and "ImportError" in without.stderr
