#!/usr/bin/env bash
# Runs once, when a master's data volume is created (the postgres image's init hook): lets the
# shadow connect for streaming replication with the superuser's password.
set -euo pipefail
echo "host replication all all scram-sha-256" >> "$PGDATA/pg_hba.conf"
