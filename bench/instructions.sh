#!/usr/bin/env bash
# Instructions per request of an engine (or the bench's bare axum server), counted by callgrind:
# a figure that does not drift with a shared machine's hour, for A/B of changes too small for the
# CPU-time bench to resolve. It counts the engine's own code only (not the kernel's TCP, which is
# most of a GET's CPU time), so it says what a change saved, not what a request costs.
#
# Usage: bench/instructions.sh [--bare] [--script FILE.lua | --hot] [PATH] [SECONDS]
#   Starts `target/release/seckill serve` (or, with --bare, `seckill-bench bare-server`) under
#   callgrind on 127.0.0.1:8090 against the running dev cluster (`scripts/dev`, or
#   SECKILL_DEV_DIR), loads PATH (default /v1/time) with wrk for SECONDS (default 10) over 8
#   connections, and prints the instructions of the connection tasks per request. Background
#   work (probes, pollers, new pool connections) is not in that count, nor is a purchase's
#   database work (a task of the order service): a sold-out answer is counted whole, an order not.
#   --script: the requests of a wrk script instead of GET PATH (bench/wrk/soldout.lua: buys of a
#   sold-out item, answered 409 by the engine and by the bare server alike).
#   --hot: orders instead: the bench's hot scenario (64 connections, 3,000 units) against the
#   engine, counting the whole process (request tasks, batchers, background) per accepted order,
#   less the pools' new connections (their SCRAM handshakes). The database's work is not in it.
# Needs valgrind and wrk (Debian packages of those names).
set -euo pipefail
bare=0
hot=0
script=()
while [ $# -gt 0 ]; do
  case "$1" in
    --bare) bare=1; shift ;;
    --hot) hot=1; shift ;;
    --script) [ -f "${2:-}" ] || { echo "--script wants a wrk script file" >&2; exit 1; }
      script=(-s "$2"); shift 2 ;;
    *) break ;;
  esac
done
path="${1:-/v1/time}"
secs="${2:-10}"
dir="${SECKILL_DEV_DIR:-.seckill-dev}"
listen=127.0.0.1:8090
for tool in valgrind callgrind_control callgrind_annotate wrk; do
  command -v "$tool" >/dev/null || { echo "$tool not found (apt-get install valgrind wrk)" >&2; exit 1; }
done
out="$(mktemp -d)"
if [ "$bare" = 1 ]; then
  server=(target/release/seckill-bench bare-server --listen "$listen")
  task='axum::serve::handle_connection::{{closure}}::{{closure}} '
else
  [ -f "$dir/shards.toml" ] || { echo "no dev cluster in $dir (run scripts/dev)" >&2; exit 1; }
  server=(target/release/seckill serve --config "$dir/shards.toml" --listen "$listen")
  task='seckill::api::server::serve::{{closure}}::{{closure}} '
fi
[ -x "${server[0]}" ] || { echo "${server[0]} not built (cargo build --release)" >&2; exit 1; }
valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$out/cg.%p" "${server[@]}" \
  >"$out/server.log" 2>&1 &
pid=$!
trap 'kill "$pid" 2>/dev/null || true' EXIT
for _ in $(seq 1 300); do
  curl -sf "http://$listen/v1/time" >/dev/null && break
  kill -0 "$pid" 2>/dev/null || { cat "$out/server.log" >&2; exit 1; }
  sleep 1
done
if [ "$hot" = 1 ]; then
  [ "$bare" = 0 ] || { echo "--hot counts the engine's orders; the bare server sells nothing" >&2; exit 1; }
  bench=(target/release/seckill-bench --url "http://$listen" --cluster-dir "$dir" --quiet
    --scenario hot -c 64)
  "${bench[@]}" --stock 1000 -d 5 >/dev/null 2>&1 || true # warm-up, not counted
  callgrind_control -i on "$pid" >/dev/null
  "${bench[@]}" --stock 3000 -d "${2:-15}" >"$out/hot.txt" 2>&1 || true
  callgrind_control -d "$pid" >/dev/null
  kill -TERM "$pid"
  wait "$pid" || true
  orders="$(awk '/^successful orders/ {print $3}' "$out/hot.txt")"
  callgrind_annotate --inclusive=yes "$out/cg.$pid.1" >"$out/inclusive.txt"
  total="$(awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}' "$out/inclusive.txt")"
  connects="$(grep -F 'deadpool::managed::manager::Manager>::create::{{closure}}' "$out/inclusive.txt" \
    | head -1 | awk '{gsub(",", "", $1); print $1}')"
  [ -n "$orders" ] && [ "$orders" -gt 0 ] && [ -n "$total" ] || {
    echo "no count: the bench or callgrind found nothing (files in $out)" >&2; exit 1; }
  echo "hot orders: $orders, $(((total - ${connects:-0}) / orders)) engine instructions each" \
    "(whole process, new pool connections excluded)"
  rm -rf "$out"
  exit 0
fi
# A warm-up, not counted: the pools' connections are made (a SCRAM handshake is millions of
# instructions) and the caches filled.
wrk -t1 -c8 -d3s ${script[@]+"${script[@]}"} "http://$listen$path" >/dev/null
callgrind_control -i on "$pid" >/dev/null
wrk -t1 -c8 -d"${secs}s" ${script[@]+"${script[@]}"} "http://$listen$path" >"$out/wrk.txt"
callgrind_control -d "$pid" >/dev/null
kill -TERM "$pid" # (a child dead of SIGINT would make bash exit too)
wait "$pid" || true
requests="$(awk '/requests in/ {print $1}' "$out/wrk.txt")"
counted="$(callgrind_annotate --inclusive=yes "$out/cg.$pid.1" \
  | grep -F "$task" | head -1 | awk '{gsub(",", "", $1); print $1}')"
[ -n "$requests" ] && [ "$requests" -gt 0 ] && [ -n "$counted" ] || {
  echo "no count: wrk or callgrind found nothing (files in $out)" >&2; exit 1; }
what="$path"
[ ${#script[@]} -eq 0 ] || what="${script[1]##*/}"
echo "$what: $requests requests, $((counted / requests)) instructions each (${server[0]##*/})"
rm -rf "$out"
