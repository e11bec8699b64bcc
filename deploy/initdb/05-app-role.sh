#!/usr/bin/env bash
# Runs once, when a master's data volume is created: the engine's application role `seckill`
# (not a superuser; `seckill migrate` gives it DML on the tables and nothing more). The password is
# read from the environment inside psql (\getenv), never put on a command line.
set -euo pipefail
psql -v ON_ERROR_STOP=1 -U "$POSTGRES_USER" -d "$POSTGRES_DB" <<'SQL'
\getenv pw SECKILL_APP_PASSWORD
CREATE ROLE seckill LOGIN PASSWORD :'pw';
SQL
