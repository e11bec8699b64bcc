#!/usr/bin/env bash
# Entrypoint prologue of the compose deployment's PostgreSQL containers: installs this server's
# TLS key and certificate (made by scripts/make-certs.sh, mounted at /certs) where PostgreSQL
# accepts them (owned by postgres, mode 0600), then runs the command it is given.
set -euo pipefail
name=${SECKILL_TLS_NAME:?SECKILL_TLS_NAME names this server's certificate}
if [ ! -s "/certs/$name.crt" ] || [ ! -s "/certs/$name.key" ] || [ ! -s /certs/ca.pem ]; then
  echo "postgres-tls: no certificate for $name in deploy/certs: run scripts/make-certs.sh first" >&2
  exit 1
fi
install -d -o postgres -g postgres -m 0700 /var/lib/postgresql/tls
install -o postgres -g postgres -m 0644 "/certs/$name.crt" /var/lib/postgresql/tls/server.crt
install -o postgres -g postgres -m 0600 "/certs/$name.key" /var/lib/postgresql/tls/server.key
install -o postgres -g postgres -m 0644 /certs/ca.pem /var/lib/postgresql/tls/ca.pem
exec "$@"
