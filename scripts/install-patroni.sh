#!/usr/bin/env bash
# Installs what the external-HA tests need to run a real Patroni cluster on this machine:
#  - etcd (Debian's etcd-server package, unpacked with `apt-get download` + `dpkg -x`: the package is
#    never installed, so no system etcd service is ever started on 2379/2380);
#  - a virtualenv with Patroni (PyPI `patroni[etcd3,psycopg3]`, pinned).
# Both live in one folder: $SECKILL_PATRONI_VENV, default target/patroni-venv (made once, reused;
# `cargo clean` removes it and the next run makes it again). Does nothing when both are there.
# Prints the paths it provides: `KEY=VALUE` lines on stdout (PATRONI_VENV, PATRONI, ETCD), so
#   eval "$(scripts/install-patroni.sh)"
# works; progress goes to stderr.
#
# The virtualenv is made from the system's python3 (/usr/bin/python3), not from a per-user one
# such as pyenv's under /root: the servers run as the `postgres` user when we are root, and that
# user must be able to execute the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."

PATRONI_VERSION=4.1.5
ETCD_PACKAGE=etcd-server   # Debian 12: 3.4.23 (v3 API on by default)
venv=${SECKILL_PATRONI_VENV:-target/patroni-venv}
mkdir -p "$(dirname "$venv")"
venv=$(cd "$(dirname "$venv")" && pwd)/$(basename "$venv")

sudo=""
if [ "$(id -u)" -ne 0 ]; then
  sudo="sudo"
fi

as_postgres() {
  if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

patroni_ok() {
  [ -x "$venv/bin/patroni" ] && [ -f "$venv/.patroni-$PATRONI_VERSION" ]
}

etcd_ok() {
  # The version is read whole before it is matched: `etcd --version | grep -q` under pipefail
  # fails whenever grep exits before etcd has written its last line (SIGPIPE), which a busy
  # machine makes likely.
  local version
  [ -x "$venv/bin/etcd" ] && version=$("$venv/bin/etcd" --version 2>/dev/null) \
    && grep -q '^etcd Version: 3\.' <<< "$version"
}

if ! patroni_ok; then
  echo "install-patroni: installing patroni $PATRONI_VERSION into $venv ..." >&2
  python=${SECKILL_PATRONI_PYTHON:-}
  if [ -z "$python" ]; then
    if [ -x /usr/bin/python3 ]; then python=/usr/bin/python3; else python=$(command -v python3); fi
  fi
  rm -rf "$venv"
  if ! "$python" -m venv "$venv" 2>/dev/null; then
    # Debian's python3 splits venv into a package of its own.
    $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq python3-venv >/dev/null
    rm -rf "$venv"
    "$python" -m venv "$venv"
  fi
  "$venv/bin/pip" install -q --disable-pip-version-check "patroni[etcd3,psycopg3]==$PATRONI_VERSION"
  touch "$venv/.patroni-$PATRONI_VERSION"
fi

if ! etcd_ok; then
  echo "install-patroni: unpacking etcd ($ETCD_PACKAGE) into $venv/etcd ..." >&2
  if ! command -v apt-get >/dev/null 2>&1 || ! command -v dpkg >/dev/null 2>&1; then
    echo "etcd not found and apt-get/dpkg are unavailable: install etcd 3.4+ and link it as $venv/bin/etcd." >&2
    exit 1
  fi
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  chmod 0755 "$tmp"   # apt's unprivileged _apt user downloads into it
  if ! (cd "$tmp" && apt-get download -qq "$ETCD_PACKAGE" >/dev/null 2>&1); then
    $sudo apt-get update -qq
    (cd "$tmp" && apt-get download -qq "$ETCD_PACKAGE" >/dev/null)
  fi
  rm -rf "$venv/etcd"
  dpkg -x "$tmp"/"$ETCD_PACKAGE"_*.deb "$venv/etcd"
  [ -x "$venv/etcd/usr/bin/etcd" ] || { echo "install-patroni: the $ETCD_PACKAGE package holds no usr/bin/etcd" >&2; exit 1; }
  ln -sfn ../etcd/usr/bin/etcd "$venv/bin/etcd"
  etcd_ok || { echo "install-patroni: $venv/bin/etcd does not run" >&2; exit 1; }
fi

# The servers run as `postgres` when we are root: that user must reach both programs.
if ! as_postgres "$venv/bin/python" -c 'import patroni' 2>/dev/null || ! as_postgres "$venv/bin/etcd" --version >/dev/null 2>&1; then
  echo "install-patroni: the postgres user cannot run $venv/bin/python or $venv/bin/etcd" >&2
  echo "(a folder above $venv is not searchable by it?) set SECKILL_PATRONI_VENV to a path it can reach." >&2
  exit 1
fi

echo "PATRONI_VENV=$venv"
echo "PATRONI=$venv/bin/patroni"
echo "ETCD=$venv/bin/etcd"
