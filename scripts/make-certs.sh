#!/usr/bin/env bash
# Makes the certificates of the compose deployment's TLS between the engine and PostgreSQL (and
# between a shadow and its master): a private certificate authority, and for every server a key
# and a certificate it signs, naming the server's host name (subjectAltName), so that clients can
# check the name (`sslmode=verify-full`).
#
#   scripts/make-certs.sh [DIR] [HOST...]     default: deploy/certs, g0-master g0-shadow g1-master g1-shadow
#
# DIR gets ca.pem (give it to clients), ca.key (keep it private, or delete it once the servers'
# certificates are made), and HOST.crt / HOST.key per server. Keys are mode 0600. An existing CA is
# reused, so new hosts can be added later; an existing host certificate is left alone. Nothing is
# ever put on a command line but file names.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-deploy/certs}
shift || true
hosts=("$@")
[ ${#hosts[@]} -gt 0 ] || hosts=(g0-master g0-shadow g1-master g1-shadow)
command -v openssl >/dev/null || { echo "make-certs: openssl is needed (apt-get install openssl)" >&2; exit 1; }
umask 077
mkdir -p "$dir"
if [ ! -s "$dir/ca.key" ] || [ ! -s "$dir/ca.pem" ]; then
  openssl req -x509 -newkey rsa:3072 -sha256 -days 3650 -nodes \
    -keyout "$dir/ca.key" -out "$dir/ca.pem" -subj "/CN=seckill deployment CA" 2>/dev/null
  chmod 0644 "$dir/ca.pem"
  echo "make-certs: a new certificate authority in $dir/ca.pem" >&2
fi
for host in "${hosts[@]}"; do
  [[ $host =~ ^[A-Za-z0-9.-]+$ ]] || { echo "make-certs: not a host name: $host" >&2; exit 1; }
  [ -s "$dir/$host.crt" ] && [ -s "$dir/$host.key" ] && continue
  ext=$(mktemp)
  printf 'subjectAltName=DNS:%s\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n' "$host" > "$ext"
  openssl req -newkey rsa:2048 -sha256 -nodes -keyout "$dir/$host.key" -out "$dir/$host.csr" \
    -subj "/CN=$host" 2>/dev/null
  openssl x509 -req -in "$dir/$host.csr" -CA "$dir/ca.pem" -CAkey "$dir/ca.key" -CAcreateserial \
    -days 825 -sha256 -extfile "$ext" -out "$dir/$host.crt" 2>/dev/null
  rm -f "$dir/$host.csr" "$ext"
  chmod 0600 "$dir/$host.key"; chmod 0644 "$dir/$host.crt"
  openssl verify -CAfile "$dir/ca.pem" "$dir/$host.crt" >/dev/null
  echo "make-certs: $dir/$host.crt" >&2
done
