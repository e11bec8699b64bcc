#!/usr/bin/env python3
"""Measures one fault on a cluster made by cluster.py, under a tiny write workload; the numbers
in NOTES.md come from it. Needs psycopg: run it with the Patroni virtualenv's python.

    target/patroni-venv/bin/python tests/patroni/measure.py --dir DIR \
        --fault switchover|kill-postgres|kill-patroni|freeze [--hold S] [--observe S]

The workload is one client inserting rows (synchronous_commit on) as the application role into
the member whose Patroni answers `GET /primary` with 200, reconnecting whenever that moves; a
commit that does not return within 2 s is given up (its socket is shut) and counted as blocked, and
a commit that returns with PostgreSQL's "canceling wait for synchronous replication" warning is not
counted as acknowledged. Beside it, every member is probed on its REST API (/primary /replica /sync
/health, 0.3 s timeout) and over SQL (recovery, synchronous_standby_names, pg_stat_replication,
timeline). For kill-patroni and freeze the old leader is also written to directly (not through
Patroni) every 0.5 s. The fault starts at t=0; `--hold` is how long after the first commit on the new
primary the old leader's Patroni is restarted (kill-patroni) or the node thawed (freeze). At the end
every acknowledged row is looked for on the final primary. Prints a JSON report.
"""

import argparse
import json
import os
import signal
import socket
import sys
import threading
import time

import psycopg

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cluster as C  # noqa: E402

T0 = None  # monotonic time of the fault


def now():
    return time.monotonic()


def rel(t):
    return None if t is None or T0 is None else round(t - T0, 3)


def run_sql(conn, sql, params=(), timeout=2.0):
    """('ok', rows, notices) | ('error', message, notices) | ('blocked', None, notices)."""
    res, notices = {}, []
    conn.add_notice_handler(lambda d: notices.append(d.message_primary))

    def work():
        try:
            cur = conn.execute(sql, params)
            res["rows"] = cur.fetchall() if cur.description else []
        except Exception as e:  # noqa: BLE001
            res["err"] = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__

    th = threading.Thread(target=work, daemon=True)
    th.start()
    th.join(timeout)
    if th.is_alive():
        try:  # unblock the worker: a frozen server never answers, a cancel request would hang too
            s = socket.socket(fileno=os.dup(conn.pgconn.socket))
            s.shutdown(socket.SHUT_RDWR)
            s.close()
        except OSError:
            pass
        th.join(3)
        return "blocked", None, notices
    if "err" in res:
        return "error", res["err"], notices
    return "ok", res["rows"], notices


def connect(dsn, timeout=1):
    return psycopg.connect(dsn, connect_timeout=timeout, autocommit=True)


class Recorder:
    def __init__(self):
        self.lock = threading.Lock()
        self.series = {}  # key -> [(t, value)] transitions only

    def put(self, key, value):
        with self.lock:
            s = self.series.setdefault(key, [])
            if not s or s[-1][1] != value:
                s.append((now(), value))


def rest_prober(st, name, ep, rec, stop):
    url = C.rest_url(st, name) + "/" + ep
    while not stop.is_set():
        code, _ = C.http("GET", url, timeout=0.3)
        rec.put(f"{name} GET /{ep}", code if code is not None else "no answer")
        time.sleep(0.1)


def sql_prober(st, name, rec, stop):
    dsn = st["members"][name]["admin_dsn"]
    q = """select case when pg_is_in_recovery() then 'standby' else 'primary' end,
                  current_setting('synchronous_standby_names'),
                  coalesce((select string_agg(application_name || ':' || sync_state, ',') from pg_stat_replication), ''),
                  case when pg_is_in_recovery() then (select received_tli from pg_stat_wal_receiver)
                       else ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int end"""
    conn = None
    while not stop.is_set():
        try:
            if conn is None:
                conn = connect(dsn)
            kind, rows, _ = run_sql(conn, q, timeout=1.0)
            if kind == "ok":
                r = rows[0]
                rec.put(f"{name} sql", f"{r[0]} ssn='{r[1]}' repl='{r[2]}' tli={r[3]}")
            else:
                rec.put(f"{name} sql", f"{kind}: {rows}" if kind == "error" else kind)
                conn.close()
                conn = None
        except Exception as e:  # noqa: BLE001
            rec.put(f"{name} sql", "no connection" if "connect" in str(e).lower() or "refused" in str(e).lower()
                    else str(e).splitlines()[0])
            conn = None
            time.sleep(0.2)
        time.sleep(0.2)


class Workload:
    def __init__(self, st):
        self.st = st
        self.acks = []  # (t_monotonic, member, id)
        self.events = []  # (t, member, outcome, detail) for non-ok outcomes, transitions only
        self.stop = threading.Event()
        self.last_outcome = None

    def primary(self):
        for n in C.MEMBERS:
            if C.http("GET", C.rest_url(self.st, n) + "/primary", timeout=0.3)[0] == 200:
                return n
        return None

    def note(self, member, outcome, detail=None):
        key = (member, outcome, detail)
        if key != self.last_outcome:
            self.events.append((now(), member, outcome, detail))
            self.last_outcome = key

    def run(self):
        conn, member = None, None
        while not self.stop.is_set():
            if conn is None:
                member = self.primary()
                if member is None:
                    self.note(None, "no primary")
                    time.sleep(0.05)
                    continue
                try:
                    conn = connect(self.st["members"][member]["app_dsn"])
                except Exception as e:  # noqa: BLE001
                    self.note(member, "connect error", str(e).splitlines()[0][:80])
                    conn = None
                    time.sleep(0.05)
                    continue
            kind, rows, notices = run_sql(conn, "insert into w(via) values (%s) returning id", (member,), timeout=2.0)
            if kind == "ok" and not any("synchronous replication" in n for n in notices):
                self.acks.append((time.monotonic(), member, rows[0][0]))
                self.note(member, "ack")
            else:
                self.note(member, "warning (not replicated)" if kind == "ok" else kind,
                          (rows if kind == "error" else None) and str(rows)[:100])
                try:
                    conn.close()
                except Exception:  # noqa: BLE001
                    pass
                conn = None
            time.sleep(0.02)


def direct_writer(st, name, out_list, stop):
    """Writes straight to one member's PostgreSQL (as if a client still pointed at it)."""
    dsn = st["members"][name]["app_dsn"]
    last = None
    while not stop.is_set():
        try:
            conn = connect(dsn)
            kind, rows, notices = run_sql(conn, "insert into w(via) values ('direct') returning id", timeout=1.5)
            if kind == "ok" and notices:
                res = "returned with warning: " + notices[0][:60]
            elif kind == "ok":
                res = "ack"
                out_list.append((time.monotonic(), name, rows[0][0]))
            else:
                res = kind + (f": {str(rows)[:70]}" if kind == "error" else "")
            conn.close()
        except Exception as e:  # noqa: BLE001
            res = "connect error: " + str(e).splitlines()[0][:60]
        if res != last:
            out_list.append((now(), res))
            last = res
        time.sleep(0.5)


def main():
    global T0
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True)
    ap.add_argument("--fault", required=True, choices=["switchover", "kill-postgres", "kill-patroni", "freeze"])
    ap.add_argument("--hold", type=float, default=3.0)
    ap.add_argument("--observe", type=float, default=90.0, help="give up waiting for the rejoin after this")
    a = ap.parse_args()
    d = os.path.abspath(a.dir)
    st = C.with_secrets(C.load_state(d))
    start = C.healthy(st)
    if not start:
        C.fail("the cluster is not healthy (leader + streaming sync standby) before the fault")
    old = start["leader"]
    new = next(n for n in C.MEMBERS if n != old)
    rc, _, err = C.psql(st["members"][old]["admin_dsn"],
                        "create table if not exists w(id bigserial primary key, via text, at timestamptz default now());"
                        " grant select, insert on w to seckill; grant usage on sequence w_id_seq to seckill")
    if rc != 0:
        C.fail(err)

    rec, stop = Recorder(), threading.Event()
    threads = [threading.Thread(target=rest_prober, args=(st, n, ep, rec, stop), daemon=True)
               for n in C.MEMBERS for ep in ("primary", "replica", "sync", "health")]
    threads += [threading.Thread(target=sql_prober, args=(st, n, rec, stop), daemon=True) for n in C.MEMBERS]
    wl = Workload(st)
    threads.append(threading.Thread(target=wl.run, daemon=True))
    direct = []
    if a.fault in ("kill-patroni", "freeze"):
        threads.append(threading.Thread(target=direct_writer, args=(st, old, direct, stop), daemon=True))
    for t in threads:
        t.start()
    time.sleep(2.0)

    report = {"fault": a.fault, "old_leader": old, "strict": st.get("synchronous_mode_strict"),
              "ttl": st.get("ttl"), "loop_wait": st.get("loop_wait"), "retry_timeout": st.get("retry_timeout"),
              "timelines_before": {m["name"]: m.get("timeline") for m in start["members"]}}
    pat = C.patroni_pid(d, old)
    pm = C.postmaster_pid(d, old)
    T0 = time.monotonic()
    if a.fault == "switchover":
        code, body = C.http("POST", C.rest_url(st, old) + "/switchover", {"leader": old, "candidate": new}, timeout=40)
        report["switchover_response"] = [code, body, rel(now())]
    elif a.fault == "kill-postgres":
        os.kill(pm, signal.SIGKILL)
    elif a.fault == "kill-patroni":
        os.kill(pat, signal.SIGKILL)
    elif a.fault == "freeze":
        pids = C.node_pids(d, old)
        with open(os.path.join(d, f"{old}.frozen"), "w") as f:
            f.write("".join(f"{p}\n" for p in pids))
        for p in pids:
            os.kill(p, signal.SIGSTOP)

    def first_ack_after(t, member=None):
        return next((x for x in wl.acks if x[0] > t and (member is None or x[1] == member)), None)

    deadline = T0 + a.observe
    # wait for writes to resume: anywhere, or (when the old leader is kept away) on the other member
    away = a.fault in ("kill-patroni", "freeze")
    def new_is_primary():
        samples = rec.series.get(f"{new} sql", [])
        return bool(samples) and samples[-1][1].startswith("primary")

    while time.monotonic() < deadline and not (new_is_primary() if away else first_ack_after(T0)):
        time.sleep(0.05)
    report["other_member_primary_at" if away else "writes_resumed_at"] = rel(now())
    if a.fault in ("kill-patroni", "freeze"):
        time.sleep(a.hold)
        report["old_leader_action_at"] = rel(now())
        if a.fault == "kill-patroni":
            C.start_patroni(d, st, old)
        else:
            C.thaw_member(d, old)
    # wait for the cluster to be whole again: a leader with a streaming sync standby
    deadline = time.monotonic() + a.observe
    healed = None
    while time.monotonic() < deadline:
        healed = C.healthy(st)
        if healed:
            break
        time.sleep(0.3)
    report["healthy_again_at"] = rel(now()) if healed else None
    report["final"] = healed and {"leader": healed["leader"], "sync_standby": healed["sync_standby"],
                                  "timelines": {m["name"]: m.get("timeline") for m in healed["members"]}}
    time.sleep(2.0)
    wl.stop.set()
    stop.set()
    time.sleep(2.5)

    acked_before = [x for x in wl.acks if x[0] <= T0]
    last_before = acked_before[-1][0] if acked_before else None
    report["last_ack_before_fault"] = rel(last_before)
    resumed = first_ack_after(T0)
    report["first_ack_after_fault"] = resumed and {"t": rel(resumed[0]), "member": resumed[1]}
    on_new = first_ack_after(T0, new)
    report["first_ack_on_other_member"] = on_new and {"t": rel(on_new[0]), "member": new}
    times = [T0] + [x[0] for x in wl.acks if x[0] > T0]
    gaps = [(b - a_, a_) for a_, b in zip(times, times[1:])]
    if gaps:
        g, at = max(gaps)
        report["longest_gap_without_ack_after_fault"] = {"seconds": round(g, 3), "from": rel(at)}
    # acks taken while the acking primary's last SQL sample showed synchronous_standby_names = ''
    def ssn_empty(member, t):
        samples = [v for ts, v in rec.series.get(f"{member} sql", []) if ts <= t]
        return bool(samples) and "primary ssn=''" in samples[-1]
    unsynced = [x for x in wl.acks if ssn_empty(x[1], x[0])]
    report["acks_while_ssn_empty"] = {"count": len(unsynced),
                                      "from": rel(unsynced[0][0]) if unsynced else None,
                                      "to": rel(unsynced[-1][0]) if unsynced else None}
    report["acks"] = {"total": len(wl.acks), "by_member": {n: sum(1 for x in wl.acks if x[1] == n) for n in C.MEMBERS}}
    report["workload_events"] = [(rel(t), *rest) for t, *rest in wl.events]
    report["direct_writes_to_old_leader"] = [(rel(x[0]), x[1]) for x in direct if len(x) == 2]
    direct_acked = [x for x in direct if len(x) == 3]
    # durability: every acknowledged row must be on the final primary
    leader = healed["leader"] if healed else (wl.primary() or new)
    conn = connect(st["members"][leader]["admin_dsn"])
    ids = {r[0] for r in conn.execute("select id from w").fetchall()}
    conn.close()
    report["acked_rows_missing_on_final_primary"] = [x[2] for x in wl.acks if x[2] not in ids]
    report["direct_acked_rows"] = len(direct_acked)
    report["direct_acked_rows_missing"] = [x[2] for x in direct_acked if x[2] not in ids]
    report["series"] = {k: [(rel(t), v) for t, v in s] for k, s in sorted(rec.series.items())}
    print(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    main()
