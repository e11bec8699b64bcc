#!/usr/bin/env bash
# Runs once, when a master's data volume is created: the engine's application role `seckill`
# (not a superuser; 20-grants.sql gives it DML on the tables and nothing more).
set -euo pipefail
psql -v ON_ERROR_STOP=1 -U "$POSTGRES_USER" -d "$POSTGRES_DB" -v pw="$SECKILL_APP_PASSWORD" <<'SQL'
CREATE ROLE seckill LOGIN PASSWORD :'pw';
SQL
