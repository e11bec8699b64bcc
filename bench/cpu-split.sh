#!/usr/bin/env bash
# Run a bench command and print where the machine's CPU went meanwhile: PostgreSQL (every postgres
# process, and the children they reaped), the engine (seckill) and the command itself.
#
#   bench/cpu-split.sh target/release/seckill-bench --scenario spread -d 10
set -euo pipefail
[ $# -gt 0 ] || { echo "usage: $0 COMMAND [ARGS...]" >&2; exit 2; }
hz=$(getconf CLK_TCK)

# CPU ticks (user + system, own and reaped children) of every process whose name is $1.
ticks() {
  local total=0 pid stat rest
  for pid in $(pgrep -x "$1" || true); do
    stat=$(cat "/proc/$pid/stat" 2>/dev/null) || continue
    rest=${stat##*) }   # the fields after the process name
    # shellcheck disable=SC2086
    set -- $rest        # $1 is field 3 (state): utime is field 14, i.e. $12
    total=$((total + ${12} + ${13} + ${14} + ${15}))
  done
  echo "$total"
}

pg0=$(ticks postgres); en0=$(ticks seckill)
w0=$(date +%s%N)
start=$(awk '/^cpu /{print $2+$3+$4+$5+$6+$7+$8}' /proc/stat)
TIMEFORMAT='%U %S'
exec 3>&1
{ time "$@" >&3 2>&3; } 2>/tmp/cpu-split.$$ || { rc=$?; rm -f /tmp/cpu-split.$$; exit $rc; }
read -r bu bs < <(tail -1 /tmp/cpu-split.$$); rm -f /tmp/cpu-split.$$
end=$(awk '/^cpu /{print $2+$3+$4+$5+$6+$7+$8}' /proc/stat)
w1=$(date +%s%N)
pg=$(( $(ticks postgres) - pg0 )); en=$(( $(ticks seckill) - en0 ))
awk -v pg="$pg" -v en="$en" -v bu="$bu" -v bs="$bs" -v hz="$hz" -v all="$((end - start))" \
    -v wall="$(( (w1 - w0) / 1000000 ))" 'BEGIN {
  b = (bu + bs) * hz; busy = pg + en + b; idle = all - busy; if (idle < 0) idle = 0
  printf "cpu over %.1f s: postgres %.0f%%  engine %.0f%%  bench %.0f%%  other/idle %.0f%%\n",
    wall / 1000, 100 * pg / all, 100 * en / all, 100 * b / all, 100 * idle / all
}'
