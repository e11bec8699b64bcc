#!/usr/bin/env bash
# Runs once, when a master's data volume is created (the postgres image's init hook): connections
# over the network must use TLS (`hostssl`: a plain `host` line would let a client go without it),
# and the shadow may connect for streaming replication with the superuser's password. The
# container's own Unix socket stays as the image made it.
set -euo pipefail
sed -i 's/^host\([[:space:]]\)/hostssl\1/' "$PGDATA/pg_hba.conf"
echo "hostssl replication all all scram-sha-256" >> "$PGDATA/pg_hba.conf"
