#!/usr/bin/env bash
# Runs once, when a master's data volume is created: the role the engine's health monitor works
# with (`master_admin`/`shadow_admin` in deploy/shards.compose.toml). Not a superuser: it may see
# replication, promote a shadow, reload the configuration and change the few settings failover
# needs, and read the tables; 07-failover-grants.sql gives it exactly that. The password is read
# from the environment inside psql (\getenv), never put on a command line.
set -euo pipefail
psql -v ON_ERROR_STOP=1 -U "$POSTGRES_USER" -d "$POSTGRES_DB" <<'SQL'
\getenv pw SECKILL_FAILOVER_PASSWORD
CREATE ROLE seckill_failover LOGIN PASSWORD :'pw';
SQL
