#!/usr/bin/env bash
# The bare-PostgreSQL baseline for one hot row on this machine, with pgbench against the dev
# cluster's first master (synchronous replication to its shadow, as the engine runs):
#   plain   - one transaction per purchase: conditional decrement + order insert;
#   batch64 - one transaction decrementing 64 and inserting 64 rows (what coalescing does).
# Usage: bench/pgbench-baseline.sh [PORT] [SECONDS]   (run `scripts/dev` first)
set -euo pipefail
port="${1:-25432}"
secs="${2:-10}"
bin=""
for d in "${SECKILL_PG_BIN:-}" /usr/lib/postgresql/*/bin; do
  [ -n "$d" ] && [ -x "$d/pgbench" ] && bin="$d"
done
[ -n "$bin" ] || { echo "pgbench not found (scripts/install-postgres.sh)" >&2; exit 1; }
as_pg=()
[ "$(id -u)" -eq 0 ] && as_pg=(runuser -u postgres --)
# The dev cluster's superuser and its password (from the cluster folder, or the environment).
export PGPASSWORD="${PGPASSWORD:-$(cat "${SECKILL_DEV_DIR:-.seckill-dev}/secrets/db-admin-password")}"
# (runuser keeps the environment, so the password never appears on a command line.)
psql() { "${as_pg[@]}" "$bin/psql" -h 127.0.0.1 -p "$port" -U seckill_admin -X -q "$@"; }
pgbench() { "${as_pg[@]}" "$bin/pgbench" -h 127.0.0.1 -p "$port" -U seckill_admin "$@"; }

psql -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname = 'seckill_pgbench'" | grep -q 1 \
  || psql -d postgres -c "CREATE DATABASE seckill_pgbench"
psql -d seckill_pgbench <<'SQL'
DROP TABLE IF EXISTS hot_item, hot_orders;
CREATE TABLE hot_item (id int PRIMARY KEY, remaining bigint NOT NULL CHECK (remaining >= 0));
INSERT INTO hot_item VALUES (1, 1000000000);
CREATE TABLE hot_orders (id bigserial PRIMARY KEY, item int NOT NULL, quantity int NOT NULL,
                         created_at timestamptz NOT NULL DEFAULT now());
SQL
dir=$(mktemp -d)
chmod 755 "$dir"
cat > "$dir/plain.sql" <<'SQL'
BEGIN;
UPDATE hot_item SET remaining = remaining - 1 WHERE id = 1 AND remaining >= 1;
INSERT INTO hot_orders (item, quantity) VALUES (1, 1);
COMMIT;
SQL
cat > "$dir/batch64.sql" <<'SQL'
BEGIN;
UPDATE hot_item SET remaining = remaining - 64 WHERE id = 1 AND remaining >= 64;
INSERT INTO hot_orders (item, quantity) SELECT 1, 1 FROM generate_series(1, 64);
COMMIT;
SQL
chmod 644 "$dir"/*.sql
for clients in 1 16 64; do
  tps=$(pgbench -n -M prepared -c "$clients" -j 2 -T "$secs" -f "$dir/plain.sql" seckill_pgbench 2>/dev/null \
        | awk '/^tps/ {print int($3)}')
  echo "plain   clients=$clients  ${tps} purchases/s"
done
tps=$(pgbench -n -M prepared -c 16 -j 2 -T "$secs" -f "$dir/batch64.sql" seckill_pgbench 2>/dev/null \
      | awk '/^tps/ {print int($3)}')
echo "batch64 clients=16  ${tps} transactions/s = $((tps * 64)) units/s"
rm -rf "$dir"
