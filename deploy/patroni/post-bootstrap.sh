#!/bin/sh
# Runs once, on the node that bootstraps the cluster: the engine's database, owned by the
# superuser (`seckill migrate` creates the tables as it), and its application role `seckill` with
# the right to see pg_stat_replication (the engine checks that a synchronous standby streams).
# Patroni passes a connection string as $1; the password is read from the environment inside psql
# (\getenv), never put on a command line.
set -eu
psql "$1" -v ON_ERROR_STOP=1 <<'SQL'
\getenv app_password SECKILL_APP_PASSWORD
CREATE ROLE seckill LOGIN PASSWORD :'app_password';
GRANT pg_read_all_stats TO seckill;
CREATE DATABASE seckill OWNER seckill_admin;
SQL
