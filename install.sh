#!/bin/sh
# Install tunproxy from this source tree into a virtual environment of its own and put the
# `tunproxy` command where `sudo` finds it.
#
# Why a virtual environment: Debian 12, Ubuntu 23.04 and later mark their Python "externally
# managed" (PEP 668), so `pip install .` into it is refused, and pipx installs per user, into a
# directory sudo's secure_path does not search. tunproxy runs as root, so it gets one
# environment owned by root (default /opt/tunproxy) and a symlink in /usr/local/sbin.
#
#   sudo sh install.sh                       install, or upgrade in place
#   sudo sh install.sh --uninstall           remove the environment and the symlink
#   options: --prefix DIR (default /opt/tunproxy)   --bin-dir DIR (default /usr/local/sbin)
#            --python PYTHON (default python3, 3.11 or newer)
#            --editable --extras LIST (a development install, e.g. --extras test)
#            --pure (do not compile stack/ and rules/ with mypyc: pure Python, slower)
#
# The sans-I/O stack and the rule engine are compiled with mypyc when a C compiler and the
# Python headers are there (as root on Debian/Ubuntu, install.sh installs gcc and python3-dev);
# without them tunproxy installs as pure Python and says so. `tunproxy --version` names which.
set -eu

prefix=/opt/tunproxy
bin_dir=/usr/local/sbin
python=python3
editable=""
extras=""
uninstall=""
pure=""
while [ $# -gt 0 ]; do
    case "$1" in
        --prefix) prefix=$2; shift 2 ;;
        --bin-dir) bin_dir=$2; shift 2 ;;
        --python) python=$2; shift 2 ;;
        --editable) editable=1; shift ;;
        --extras) extras=$2; shift 2 ;;
        --uninstall) uninstall=1; shift ;;
        --pure) pure=1; shift ;;
        -h|--help) sed -n '2,/^set -eu$/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "install.sh: unknown option $1 (try --help)" >&2; exit 2 ;;
    esac
done

src=$(cd "$(dirname "$0")" && pwd)

if [ -n "$uninstall" ]; then
    if [ -L "$bin_dir/tunproxy" ] && [ "$(readlink "$bin_dir/tunproxy")" = "$prefix/bin/tunproxy" ]; then
        rm -f "$bin_dir/tunproxy"
    fi
    rm -rf "$prefix"
    echo "tunproxy removed from $prefix"
    exit 0
fi

if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "install.sh: tunproxy needs Python 3.11 or newer; $python is $("$python" --version 2>&1 || echo missing)" >&2
    exit 1
fi

# Debian and Ubuntu ship venv's pip bootstrap (ensurepip) in a package of its own.
if ! "$python" -c 'import ensurepip, venv' 2>/dev/null; then
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
        echo "installing python3-venv (the venv module's pip bootstrap)"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null \
            || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null; }
    else
        echo "install.sh: $python has no venv module; install python3-venv (Debian/Ubuntu) first" >&2
        exit 1
    fi
fi

# mypyc's build needs a C compiler and Python.h for this interpreter (mypy itself comes from
# PyPI as a build requirement). Missing ones are installed as root with apt, like python3-venv.
native_missing() {
    "$python" - <<'PY'
import os, shutil, sys, sysconfig
from pathlib import Path
cc = (os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc").split()[0]
missing = [] if shutil.which(cc) else [f"a C compiler ({cc})"]
if not Path(sysconfig.get_paths()["include"], "Python.h").exists():
    missing.append(f"the Python {sys.version_info[0]}.{sys.version_info[1]} headers (Python.h)")
print(" and ".join(missing))
PY
}
if [ -z "$pure" ] && [ -n "$(native_missing)" ] && command -v apt-get >/dev/null 2>&1 \
        && [ "$(id -u)" = 0 ]; then
    dev=$("$python" -c 'import sys; print("python%d.%d-dev" % sys.version_info[:2])')
    echo "installing gcc and $dev (to compile the stack with mypyc; --pure skips this)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gcc "$dev" >/dev/null 2>&1 \
        || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gcc "$dev" >/dev/null 2>&1; } \
        || true
fi
if [ -n "$pure" ]; then
    TUNPROXY_PURE_PYTHON=1
elif [ -n "$(native_missing)" ]; then
    echo "install.sh: no $(native_missing): installing pure Python (slower per packet and per connection; install them and run install.sh again to compile)"
    TUNPROXY_PURE_PYTHON=1
else
    echo "compiling stack/ and rules/ with mypyc (1-2 CPU minutes; --pure skips this)"
    TUNPROXY_PURE_PYTHON=
fi
export TUNPROXY_PURE_PYTHON

if [ ! -x "$prefix/bin/python" ]; then
    "$python" -m venv "$prefix"
fi
"$prefix/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip
target="$src"
[ -n "$extras" ] && target="$src[$extras]"
if [ -n "$editable" ]; then
    "$prefix/bin/python" -m pip install -q --disable-pip-version-check -e "$target"
else
    "$prefix/bin/python" -m pip install -q --disable-pip-version-check "$target"
fi

mkdir -p "$bin_dir"
ln -sf "$prefix/bin/tunproxy" "$bin_dir/tunproxy"
# The version line names the build that runs, e.g. "(stack: compiled (mypyc), rules: ...)".
echo "$(env -u TUNPROXY_PURE_PYTHON "$prefix/bin/tunproxy" --version) installed in $prefix; command: $bin_dir/tunproxy"
