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
set -eu

prefix=/opt/tunproxy
bin_dir=/usr/local/sbin
python=python3
editable=""
extras=""
uninstall=""
while [ $# -gt 0 ]; do
    case "$1" in
        --prefix) prefix=$2; shift 2 ;;
        --bin-dir) bin_dir=$2; shift 2 ;;
        --python) python=$2; shift 2 ;;
        --editable) editable=1; shift ;;
        --extras) extras=$2; shift 2 ;;
        --uninstall) uninstall=1; shift ;;
        -h|--help) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
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
echo "tunproxy $("$prefix/bin/tunproxy" --version | cut -d' ' -f2) installed in $prefix; command: $bin_dir/tunproxy"
