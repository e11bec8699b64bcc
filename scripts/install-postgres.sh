#!/usr/bin/env bash
# Installs the PostgreSQL server binaries when none are found (Debian/Ubuntu: apt-get).
# The engine finds them in $SECKILL_PG_BIN, /usr/lib/postgresql/*/bin, `pg_config --bindir` or PATH.
set -euo pipefail

found() {
  [ -n "${SECKILL_PG_BIN:-}" ] && [ -x "$SECKILL_PG_BIN/initdb" ] && return 0
  compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null && return 0
  command -v pg_config >/dev/null 2>&1 && [ -x "$(pg_config --bindir)/initdb" ] && return 0
  command -v initdb >/dev/null 2>&1 && return 0
  return 1
}

if found; then
  exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
  echo "PostgreSQL server binaries not found and apt-get is unavailable." >&2
  echo "Install PostgreSQL (13 or newer) and set SECKILL_PG_BIN to its bin directory." >&2
  exit 1
fi

sudo=""
if [ "$(id -u)" -ne 0 ]; then
  sudo="sudo"
fi
echo "Installing PostgreSQL server binaries with apt-get ..."
# seckill runs its own servers; do not let the package create and start a default cluster.
$sudo mkdir -p /etc/postgresql-common
if ! grep -qs '^create_main_cluster' /etc/postgresql-common/createcluster.conf; then
  echo "create_main_cluster = false" | $sudo tee -a /etc/postgresql-common/createcluster.conf >/dev/null
fi
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq postgresql postgresql-client >/dev/null
found || { echo "PostgreSQL installation did not provide initdb" >&2; exit 1; }
echo "PostgreSQL installed."
