#!/usr/bin/env python3
"""A real Patroni cluster on this machine for the external-HA tests: one etcd and two Patroni
nodes (`pa`, `pb`), each managing one PostgreSQL server, all under one folder.

    cluster.py up      --dir DIR --base-port P [--strict] [--ttl 20 --loop-wait 1 --retry-timeout 5] [--timeout 90]
    cluster.py status  --dir DIR [--probes]
    cluster.py wait    --dir DIR [--leader NAME] [--sync] [--timeout 60]
    cluster.py switchover --dir DIR [--candidate NAME] [--no-wait-sync] [--timeout 60]
    cluster.py kill-postgres   --dir DIR --member leader|NAME
    cluster.py kill-patroni    --dir DIR --member leader|NAME
    cluster.py restart-patroni --dir DIR --member NAME
    cluster.py freeze  --dir DIR --member leader|NAME
    cluster.py thaw    --dir DIR [--member NAME]        (default: every frozen member)
    cluster.py down    --dir DIR [--rm] [--timeout 20]

`up` returns once pa is the leader and pb streams to it as its synchronous standby (checked in
pg_stat_replication too); `switchover` once the candidate accepts writes and the old leader streams
to it synchronously; `wait` once a leader accepts writes (and, with --sync, has its sync standby).
`--member leader` is resolved through Patroni's GET /cluster (or etcd's leader key when no Patroni
answers).

Ports: etcd client P, etcd peer P+1, PostgreSQL P+2 (pa) and P+3 (pb), Patroni REST P+4 (pa) and
P+5 (pb). Every command prints one JSON object on stdout (logs go to stderr) and exits non-zero
on failure. Python standard library only: run it with any python3 >= 3.9.

When run as root, etcd, Patroni and PostgreSQL run as the `postgres` user (PostgreSQL refuses
root): the subfolders DIR/etcd, DIR/pa, DIR/pb are handed to that user; DIR itself stays root's
(it only gains o+x when it lacks it, so that user can reach its subfolders). DIR/secrets.json
(mode 0600) holds the passwords (generated, or from $SECKILL_PATRONI_ADMIN_PASSWORD,
$SECKILL_PATRONI_APP_PASSWORD, $SECKILL_PATRONI_REPL_PASSWORD), the DSNs and REST URLs. The
processes outlive this tool (own sessions); their logs are DIR/etcd.log, DIR/pa.log, DIR/pb.log
and their pids DIR/*.pid (the postmasters' in DIR/NAME/data/postmaster.pid).

Programs: etcd and patroni from $SECKILL_PATRONI_VENV (default <repo>/target/patroni-venv, made
by scripts/install-patroni.sh), PostgreSQL from $SECKILL_PG_BIN or the newest
/usr/lib/postgresql/*/bin.
"""

import argparse
import base64
import glob
import json
import os
import secrets as pysecrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

MEMBERS = ("pa", "pb")
SCOPE = "seckill-g0"
NAMESPACE = "/seckill/"
ADMIN_ROLE = "seckill_admin"
APP_ROLE = "seckill"
REPL_ROLE = "seckill_repl"
MARKER = ".seckill-patroni"
REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def log(msg):
    print(f"cluster: {msg}", file=sys.stderr, flush=True)


def fail(msg):
    log(msg)
    sys.exit(1)


def is_root():
    return os.geteuid() == 0


# ---------------------------------------------------------------- paths and state


def venv_dir():
    return os.path.abspath(os.environ.get("SECKILL_PATRONI_VENV") or os.path.join(REPO, "target", "patroni-venv"))


def pg_bin():
    env = os.environ.get("SECKILL_PG_BIN")
    if env and os.access(os.path.join(env, "postgres"), os.X_OK):
        return env
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"), key=lambda p: int(p.split("/")[-3]))
    if found:
        return os.path.dirname(found[-1])
    fail("PostgreSQL binaries not found (set SECKILL_PG_BIN)")


def load_state(d):
    try:
        with open(os.path.join(d, "state.json")) as f:
            return json.load(f)
    except FileNotFoundError:
        fail(f"{d} holds no cluster (no state.json): run `up` first")


def save_json(path, obj, mode=0o644):
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def out(obj):
    print(json.dumps(obj, indent=2))


# ---------------------------------------------------------------- processes


def pg_user():
    import pwd

    return pwd.getpwnam("postgres")


def hand_to_postgres(path):
    """chown -R postgres: one of our own subfolders (never DIR itself)."""
    if is_root():
        pw = pg_user()
        for root, dirs, files in os.walk(path):
            for n in [root] + [os.path.join(root, x) for x in dirs + files]:
                os.lchown(n, pw.pw_uid, pw.pw_gid)


def spawn(argv, logfile, pidfile):
    """Start a long-lived process in its own session, as `postgres` when we are root."""
    env = dict(os.environ)
    kw = {}
    if is_root():
        pw = pg_user()
        kw = dict(user=pw.pw_uid, group=pw.pw_gid, extra_groups=[])
        env.update(HOME=pw.pw_dir, USER="postgres", LOGNAME="postgres")
    for k in ("PGPASSWORD", "PGPASSFILE", "PGHOST", "PGPORT", "PGUSER", "PGDATABASE"):
        env.pop(k, None)
    with open(logfile, "ab") as lf:
        p = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=lf, stderr=subprocess.STDOUT, env=env,
            start_new_session=True, close_fds=True, cwd="/", **kw,
        )
    with open(pidfile, "w") as f:
        f.write(f"{p.pid}\n")
    return p.pid


def proc_state(pid):
    """The /proc state letter of a process, or None when it does not exist."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            s = f.read()
        return s[s.rindex(")") + 2]
    except (FileNotFoundError, ProcessLookupError, ValueError):
        return None


def alive(pid):
    return pid is not None and proc_state(pid) not in (None, "Z", "X")


def cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def read_pid(path, must_contain):
    """The pid in a pid file, if that process is alive and its command line names `must_contain`
    (so a stale file whose pid was reused never leads us to signal a stranger)."""
    try:
        with open(path) as f:
            pid = int(f.readline().strip())
    except (OSError, ValueError):
        return None
    if alive(pid) and must_contain in cmdline(pid):
        return pid
    return None


def children(pid):
    kids = []
    for st in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(st) as f:
                s = f.read()
            fields = s[s.rindex(")") + 2:].split()
            if int(fields[1]) == pid:
                kids.append(int(st.split("/")[2]))
        except (OSError, ValueError):
            pass
    return kids


def signal_pid(pid, sig):
    try:
        os.kill(pid, sig)
        return True
    except ProcessLookupError:
        return False


def wait_gone(pids, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(alive(p) for p in pids):
            return True
        time.sleep(0.1)
    return not any(alive(p) for p in pids)


def member_dir(d, name):
    return os.path.join(d, name)


def patroni_pid(d, name):
    return read_pid(os.path.join(d, f"{name}.pid"), os.path.join(member_dir(d, name), "patroni.yml"))


def postmaster_pid(d, name):
    data = os.path.join(member_dir(d, name), "data")
    return read_pid(os.path.join(data, "postmaster.pid"), data)


def etcd_pid(d):
    return read_pid(os.path.join(d, "etcd.pid"), os.path.join(d, "etcd", "data"))


# ---------------------------------------------------------------- HTTP


def http(method, url, body=None, timeout=1.0):
    """(status, parsed JSON or text) or (None, error string) when nothing answered in time."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, raw = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    except Exception as e:  # refused, timeout, reset
        return None, str(e)
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")


def rest_url(st, name):
    return st["members"][name]["rest_url"]


def get_cluster(st, timeout=1.0):
    """GET /cluster from the first member whose REST API answers."""
    for name in MEMBERS:
        code, body = http("GET", rest_url(st, name) + "/cluster", timeout=timeout)
        if code == 200 and isinstance(body, dict):
            return body
    return None


def etcd_leader(st):
    """The leader key straight from etcd (v3 JSON gateway), for when no Patroni answers."""
    key = base64.b64encode(f"{NAMESPACE}{SCOPE}/leader".encode()).decode()
    code, body = http("POST", f"{st['etcd_url']}/v3/kv/range", {"key": key}, timeout=1.0)
    if code == 200 and isinstance(body, dict) and body.get("kvs"):
        return base64.b64decode(body["kvs"][0]["value"]).decode()
    return None


def summarize(cl):
    members = cl.get("members", []) if cl else []
    leader = next((m["name"] for m in members if m.get("role") in ("leader", "standby_leader")), None)
    return {
        "leader": leader,
        "sync_standby": [m["name"] for m in members if m.get("role") == "sync_standby"],
        "members": [
            {k: m.get(k) for k in ("name", "role", "state", "timeline", "lag", "host", "port", "api_url") if k in m}
            for m in members
        ],
    }


def resolve_member(st, member):
    if member in MEMBERS:
        return member
    if member != "leader":
        fail(f"unknown member {member!r} (leader, {', '.join(MEMBERS)})")
    cl = get_cluster(st)
    leader = summarize(cl)["leader"] if cl else None
    leader = leader or etcd_leader(st)
    if not leader:
        fail("no leader right now")
    return leader


def psql(dsn, sql, timeout=5):
    """Run SQL as a client (libpq over TCP); (rc, stdout, stderr). The password travels in the
    environment, never on a command line."""
    parts = dict(kv.split("=", 1) for kv in dsn.split())
    env = dict(os.environ, PGPASSWORD=parts.pop("password"), PGCONNECT_TIMEOUT="2")
    conn = " ".join(f"{k}={v}" for k, v in parts.items())
    try:
        p = subprocess.run(
            [os.path.join(pg_bin(), "psql"), conn, "-XAtqc", sql],
            env=env, capture_output=True, text=True, timeout=timeout,
        )
        return p.returncode, p.stdout.strip(), p.stderr.strip()
    except subprocess.TimeoutExpired:
        return None, "", "timeout"


# ---------------------------------------------------------------- up


def patroni_config(d, st, name, args, pw):
    m = st["members"][name]
    mdir = member_dir(d, name)
    bootstrap_sql = os.path.join(mdir, "bootstrap.sql")
    return {
        "scope": SCOPE,
        "namespace": NAMESPACE,
        "name": name,
        "log": {"level": "INFO", "format": "%(asctime)s " + name + " %(levelname)s: %(message)s"},
        "restapi": {"listen": f"127.0.0.1:{m['rest_port']}", "connect_address": f"127.0.0.1:{m['rest_port']}"},
        "etcd3": {"hosts": [f"127.0.0.1:{st['ports']['etcd_client']}"]},
        "bootstrap": {
            "dcs": {
                "ttl": args.ttl,
                "loop_wait": args.loop_wait,
                "retry_timeout": args.retry_timeout,
                "maximum_lag_on_failover": 1048576,
                "synchronous_mode": True,
                "synchronous_mode_strict": bool(args.strict),
                "synchronous_node_count": 1,
                "postgresql": {
                    "use_pg_rewind": True,
                    "use_slots": True,
                    "parameters": {
                        "max_connections": 200,
                        "shared_buffers": "64MB",
                        "wal_level": "replica",
                        "hot_standby": "on",
                        "wal_log_hints": "on",
                        "wal_keep_size": "256MB",
                        "max_wal_senders": 10,
                        "max_replication_slots": 10,
                    },
                },
            },
            "initdb": [{"encoding": "UTF8"}, {"locale": "C"}, "data-checksums"],
            "post_bootstrap": f"/bin/sh {os.path.join(mdir, 'post_bootstrap.sh')} {bootstrap_sql}",
        },
        "postgresql": {
            "listen": f"127.0.0.1:{m['pg_port']}",
            "connect_address": f"127.0.0.1:{m['pg_port']}",
            "data_dir": os.path.join(mdir, "data"),
            # A spread checkpoint would make pg_basebackup wait minutes for the clone's start.
            "basebackup": [{"checkpoint": "fast"}],
            "bin_dir": st["pg_bin"],
            "pgpass": os.path.join(mdir, "pgpass"),
            "authentication": {
                "superuser": {"username": ADMIN_ROLE, "password": pw["admin"]},
                "replication": {"username": REPL_ROLE, "password": pw["replication"]},
            },
            "parameters": {"unix_socket_directories": os.path.join(mdir, "run")},
            "pg_hba": [
                "host all all 127.0.0.1/32 scram-sha-256",
                f"host replication {REPL_ROLE} 127.0.0.1/32 scram-sha-256",
            ],
        },
        "tags": {"nofailover": False, "noloadbalance": False, "clonefrom": False, "nosync": False},
    }


def sql_literal(s):
    return "'" + s.replace("'", "''") + "'"


def prepare_dir(d):
    if os.path.exists(d):
        if not os.path.isdir(d):
            fail(f"{d} is not a folder")
        if os.listdir(d):
            fail(f"{d} is not empty: `up` wants a missing or empty folder")
    else:
        os.makedirs(d, mode=0o755)
    with open(os.path.join(d, MARKER), "w") as f:
        f.write("a Patroni test cluster made by tests/patroni/cluster.py\n")
    if is_root():
        mode = os.stat(d).st_mode
        if not mode & 0o001:
            os.chmod(d, (mode & 0o7777) | 0o001)  # postgres must reach its own subfolders


def start_etcd(d, st):
    p = st["ports"]
    data = os.path.join(d, "etcd", "data")
    argv = [
        st["etcd"], "--name", "e0", "--data-dir", data,
        "--listen-client-urls", f"http://127.0.0.1:{p['etcd_client']}",
        "--advertise-client-urls", f"http://127.0.0.1:{p['etcd_client']}",
        "--listen-peer-urls", f"http://127.0.0.1:{p['etcd_peer']}",
        "--initial-advertise-peer-urls", f"http://127.0.0.1:{p['etcd_peer']}",
        "--initial-cluster", f"e0=http://127.0.0.1:{p['etcd_peer']}",
        "--initial-cluster-state", "new", "--initial-cluster-token", f"seckill-{p['etcd_client']}",
        "--logger", "zap", "--log-level", "warn",
    ]
    return spawn(argv, os.path.join(d, "etcd.log"), os.path.join(d, "etcd.pid"))


def start_patroni(d, st, name):
    pid = patroni_pid(d, name)
    if pid:
        fail(f"patroni of {name} already runs (pid {pid})")
    return spawn(
        [st["patroni"], os.path.join(member_dir(d, name), "patroni.yml")],
        os.path.join(d, f"{name}.log"), os.path.join(d, f"{name}.pid"),
    )


def wait_for(what, pred, timeout, interval=0.2, on_timeout=None):
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            if on_timeout:
                on_timeout()
            fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def healthy(st, leader=None, need_sync=True):
    """The cluster summary when a leader runs (the given one, if any) and, if asked, the other
    member is its synchronous standby, streaming, and the leader's pg_stat_replication agrees."""
    cl = get_cluster(st)
    if not cl:
        return None
    s = summarize(cl)
    lm = next((m for m in s["members"] if m["name"] == s["leader"]), None)
    if not lm or lm.get("state") != "running" or (leader and s["leader"] != leader):
        return None
    sm = [m for m in s["members"] if m.get("role") == "sync_standby" and m.get("state") == "streaming"]
    if need_sync and not sm:
        return None
    # Patroni's view runs ahead of PostgreSQL's: GET /primary answers 200 (and /cluster names the
    # leader "running") a moment before the promotion ends, so ask the server itself.
    rc, res, _ = psql(st["members"][s["leader"]]["admin_dsn"],
                      "select pg_is_in_recovery()::text union all "
                      "select application_name || ':' || sync_state from pg_stat_replication", timeout=3)
    rows = res.split() if rc == 0 else []
    if not rows or rows[0] != "false":
        return None
    if need_sync and f"{sm[0]['name']}:sync" not in rows[1:]:
        return None
    return s


def port_free(port):
    import socket

    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def cmd_up(a):
    d = os.path.abspath(a.dir)
    # Patroni would silently raise ttl to 20 and shrink loop_wait/retry_timeout: refuse instead.
    if a.ttl < 20 or a.loop_wait < 1 or a.retry_timeout < 3 or a.loop_wait + 2 * a.retry_timeout > a.ttl:
        fail("Patroni needs ttl >= 20, loop_wait >= 1, retry_timeout >= 3 and loop_wait + 2*retry_timeout <= ttl")
    busy = [p for p in range(a.base_port, a.base_port + 6) if not port_free(p)]
    if busy:
        fail(f"ports in use: {busy} (choose another --base-port)")
    venv = venv_dir()
    etcd, patroni = os.path.join(venv, "bin", "etcd"), os.path.join(venv, "bin", "patroni")
    for prog in (etcd, patroni):
        if not os.access(prog, os.X_OK):
            fail(f"{prog} missing: run scripts/install-patroni.sh (or set SECKILL_PATRONI_VENV)")
    prepare_dir(d)
    t0 = time.monotonic()
    P = a.base_port
    pw = {
        "admin": os.environ.get("SECKILL_PATRONI_ADMIN_PASSWORD") or pysecrets.token_hex(16),
        "app": os.environ.get("SECKILL_PATRONI_APP_PASSWORD") or pysecrets.token_hex(16),
        "replication": os.environ.get("SECKILL_PATRONI_REPL_PASSWORD") or pysecrets.token_hex(16),
    }
    for v in pw.values():
        if any(c.isspace() for c in v) or "'" in v or "\\" in v:
            fail("passwords must not hold whitespace, quotes or backslashes (they go into key=value DSNs)")
    st = {
        "dir": d, "scope": SCOPE, "namespace": NAMESPACE, "etcd": etcd, "patroni": patroni, "pg_bin": pg_bin(),
        "ports": {"etcd_client": P, "etcd_peer": P + 1},
        "etcd_url": f"http://127.0.0.1:{P}",
        "synchronous_mode_strict": bool(a.strict),
        "ttl": a.ttl, "loop_wait": a.loop_wait, "retry_timeout": a.retry_timeout,
        "members": {},
    }
    for i, name in enumerate(MEMBERS):
        pg_port, rest_port = P + 2 + i, P + 4 + i
        st["members"][name] = {
            "pg_port": pg_port, "rest_port": rest_port, "rest_url": f"http://127.0.0.1:{rest_port}",
            "data_dir": os.path.join(member_dir(d, name), "data"),
            "app_dsn": f"host=127.0.0.1 port={pg_port} user={APP_ROLE} password={pw['app']} dbname=seckill",
            "admin_dsn": f"host=127.0.0.1 port={pg_port} user={ADMIN_ROLE} password={pw['admin']} dbname=seckill",
        }
    secrets_doc = {
        "scope": SCOPE, "etcd_url": st["etcd_url"],
        "admin_user": ADMIN_ROLE, "admin_password": pw["admin"],
        "app_user": APP_ROLE, "app_password": pw["app"],
        "replication_user": REPL_ROLE, "replication_password": pw["replication"],
        "members": {n: {k: m[k] for k in ("app_dsn", "admin_dsn", "rest_url", "pg_port", "rest_port", "data_dir")}
                    for n, m in st["members"].items()},
    }
    save_json(os.path.join(d, "secrets.json"), secrets_doc, 0o600)
    # state.json: what the other commands need (no passwords: those stay in secrets.json).
    public = json.loads(json.dumps(st))
    for m in public["members"].values():
        m.pop("app_dsn"), m.pop("admin_dsn")
    save_json(os.path.join(d, "state.json"), public)
    st["timeout"] = a.timeout

    os.makedirs(os.path.join(d, "etcd", "data"), mode=0o700)
    hand_to_postgres(os.path.join(d, "etcd"))
    for name in MEMBERS:
        mdir = member_dir(d, name)
        os.makedirs(os.path.join(mdir, "run"), mode=0o700)
        os.chmod(mdir, 0o700)
        save_json(os.path.join(mdir, "patroni.yml"), patroni_config(d, st, name, a, pw), 0o600)  # JSON is YAML
        with open(os.path.join(mdir, "bootstrap.sql"), "w") as f:
            f.write(f"CREATE ROLE {APP_ROLE} LOGIN PASSWORD {sql_literal(pw['app'])};\n"
                    f"CREATE DATABASE seckill OWNER {ADMIN_ROLE};\n")
        os.chmod(os.path.join(mdir, "bootstrap.sql"), 0o600)
        # Patroni calls it with the SQL file and then a connection string (password in PGPASSFILE).
        with open(os.path.join(mdir, "post_bootstrap.sh"), "w") as f:
            f.write('#!/bin/sh\nset -e\nexec "%s" -X -q -v ON_ERROR_STOP=1 -f "$1" "$2"\n'
                    % os.path.join(st["pg_bin"], "psql"))
        hand_to_postgres(mdir)

    def dump_logs():
        for n in ("etcd",) + MEMBERS:
            try:
                with open(os.path.join(d, f"{n}.log"), errors="replace") as f:
                    log(f"--- {n}.log (tail)\n" + "".join(f.readlines()[-30:]))
            except OSError:
                pass

    try:
        s = start_cluster(d, st, dump_logs)
    except BaseException:
        log("up failed: stopping what it started")
        teardown(d, 10)
        raise
    out({"dir": d, "secrets": os.path.join(d, "secrets.json"), "ports": {
        "etcd_client": P, "etcd_peer": P + 1,
        **{f"{n}_pg": st["members"][n]["pg_port"] for n in MEMBERS},
        **{f"{n}_rest": st["members"][n]["rest_port"] for n in MEMBERS}},
        "seconds": {k: round(v - t0, 1) for k, v in s.pop("_times").items()}, **s})


def start_cluster(d, st, dump_logs):
    times = {}
    start_etcd(d, st)
    wait_for("etcd", lambda: http("GET", f"{st['etcd_url']}/health")[0] == 200, 20, on_timeout=dump_logs)
    times["etcd"] = time.monotonic()
    start_patroni(d, st, "pa")
    # pa bootstraps (initdb, post_bootstrap); pb starts once pa holds the leader lock, so that the
    # first leader is always pa, and then clones it (pg_basebackup).
    wait_for("pa to become the leader", lambda: http("GET", rest_url(st, "pa") + "/primary")[0] == 200,
             st["timeout"], on_timeout=dump_logs)
    times["leader"] = time.monotonic()
    start_patroni(d, st, "pb")
    s = wait_for("pb to stream synchronously", lambda: healthy(st, "pa"), st["timeout"], interval=0.3,
                 on_timeout=dump_logs)
    rc, _, err = psql(st["members"]["pa"]["app_dsn"], "select 1")
    if rc != 0:
        fail(f"the application role cannot connect: {err}")
    times["total"] = time.monotonic()
    return {**s, "_times": times}


# ---------------------------------------------------------------- the other commands


def with_secrets(st):
    with open(os.path.join(st["dir"], "secrets.json")) as f:
        sec = json.load(f)
    for n in MEMBERS:
        st["members"][n].update(app_dsn=sec["members"][n]["app_dsn"], admin_dsn=sec["members"][n]["admin_dsn"])
    return st


def cmd_status(a):
    st = load_state(os.path.abspath(a.dir))
    cl = get_cluster(st)
    s = summarize(cl) if cl else {"leader": etcd_leader(st), "sync_standby": None, "members": None,
                                  "note": "no Patroni REST API answered; leader read from etcd"}
    if a.probes:
        s["probes"] = {
            n: {ep: http("GET", rest_url(st, n) + "/" + ep, timeout=a.probe_timeout)[0]
                for ep in ("primary", "replica", "sync", "health")}
            for n in MEMBERS
        }
        s["processes"] = {n: {"patroni": patroni_pid(st["dir"], n), "postmaster": postmaster_pid(st["dir"], n),
                              "frozen": os.path.exists(os.path.join(st["dir"], f"{n}.frozen"))} for n in MEMBERS}
    out(s)


def cmd_wait(a):
    st = with_secrets(load_state(os.path.abspath(a.dir)))
    t0 = time.monotonic()
    s = wait_for("the cluster", lambda: healthy(st, a.leader, a.sync), a.timeout, interval=0.3)
    out({**s, "waited_s": round(time.monotonic() - t0, 2)})


def cmd_switchover(a):
    st = with_secrets(load_state(os.path.abspath(a.dir)))
    cl = get_cluster(st)
    s = summarize(cl) if cl else None
    if not s or not s["leader"]:
        fail("no leader to switch over from")
    leader = s["leader"]
    cand = a.candidate or next(n for n in MEMBERS if n != leader)
    t0 = time.monotonic()
    code, body = http("POST", rest_url(st, leader) + "/switchover", {"leader": leader, "candidate": cand}, timeout=40)
    if code != 200:
        fail(f"switchover refused: {code} {body}")
    t_api = time.monotonic() - t0
    wait_for(f"{cand} to accept writes", lambda: healthy(st, cand, False), a.timeout, interval=0.1)
    t_primary = time.monotonic() - t0
    s = wait_for(f"{leader} to stream to {cand} synchronously", lambda: healthy(st, cand, not a.no_wait_sync),
                 a.timeout, interval=0.3)
    out({"from": leader, "to": cand, "message": body,
         "seconds": {"api": round(t_api, 2), "new_primary": round(t_primary, 2),
                     "healthy": round(time.monotonic() - t0, 2)}, **s})


def cmd_kill_postgres(a):
    st = load_state(os.path.abspath(a.dir))
    name = resolve_member(st, a.member)
    pid = postmaster_pid(st["dir"], name)
    if not pid:
        fail(f"the postmaster of {name} does not run")
    os.kill(pid, signal.SIGKILL)
    wait_gone([pid], 5)
    out({"member": name, "killed": "postmaster", "pid": pid})


def cmd_kill_patroni(a):
    st = load_state(os.path.abspath(a.dir))
    name = resolve_member(st, a.member)
    pid = patroni_pid(st["dir"], name)
    if not pid:
        fail(f"patroni of {name} does not run")
    os.kill(pid, signal.SIGKILL)
    wait_gone([pid], 5)
    out({"member": name, "killed": "patroni", "pid": pid, "postmaster_still_running": postmaster_pid(st["dir"], name)})


def cmd_restart_patroni(a):
    st = load_state(os.path.abspath(a.dir))
    name = resolve_member(st, a.member)
    pid = start_patroni(st["dir"], st, name)
    wait_for(f"patroni of {name} to answer", lambda: http("GET", rest_url(st, name) + "/patroni")[0] is not None, 30)
    out({"member": name, "started": "patroni", "pid": pid})


def node_pids(d, name):
    """Patroni, then the postmaster, then its children: the order in which to stop them."""
    pids = []
    pp = patroni_pid(d, name)
    if pp:
        pids.append(pp)
    pm = postmaster_pid(d, name)
    if pm:
        pids.append(pm)
        pids += children(pm)
    return pids


def cmd_freeze(a):
    st = load_state(os.path.abspath(a.dir))
    name = resolve_member(st, a.member)
    pids = node_pids(st["dir"], name)
    if not pids:
        fail(f"nothing of {name} runs")
    frozen_file = os.path.join(st["dir"], f"{name}.frozen")
    with open(frozen_file, "a") as f:  # written first: a `down` after a crash here still thaws them
        f.write("".join(f"{p}\n" for p in pids))
    for p in pids:
        signal_pid(p, signal.SIGSTOP)
    # a backend forked while we were stopping the postmaster
    late = [p for p in node_pids(st["dir"], name) if p not in pids]
    for p in late:
        signal_pid(p, signal.SIGSTOP)
    if late:
        with open(frozen_file, "a") as f:
            f.write("".join(f"{p}\n" for p in late))
    out({"member": name, "frozen": pids + late})


def thaw_member(d, name):
    frozen_file = os.path.join(d, f"{name}.frozen")
    pids = []
    try:
        with open(frozen_file) as f:
            pids = [int(x) for x in f.read().split()]
    except (OSError, ValueError):
        pass
    # the postmaster before its children, Patroni last (it would otherwise act on a half-frozen node)
    pids = [p for p in pids if alive(p) or proc_state(p) == "T"]
    order = pids[1:] + pids[:1] if pids and pids[0] == patroni_pid(d, name) else pids
    for p in order:
        signal_pid(p, signal.SIGCONT)
    if os.path.exists(frozen_file):
        os.unlink(frozen_file)
    return order


def cmd_thaw(a):
    st = load_state(os.path.abspath(a.dir))
    names = [a.member] if a.member else list(MEMBERS)
    out({"thawed": {n: thaw_member(st["dir"], n) for n in names}})


def cmd_down(a):
    d = os.path.abspath(a.dir)
    if not os.path.exists(os.path.join(d, MARKER)):
        fail(f"{d} is no cluster folder of this tool")
    load_state(d)
    left = teardown(d, a.timeout)
    if a.rm and not left:
        shutil.rmtree(d)
    out({"stopped": True, "left_running": left, "removed": bool(a.rm and not left)})
    if left:
        sys.exit(1)


def teardown(d, timeout):
    """Stops every process of the cluster in DIR; returns the pids still running."""
    for n in MEMBERS:
        thaw_member(d, n)
    # Patroni stops its PostgreSQL on SIGTERM (fast shutdown); a PostgreSQL whose Patroni is gone
    # gets the fast shutdown (SIGINT) directly.
    pat, first = [], []
    for n in MEMBERS:
        pp, pm = patroni_pid(d, n), postmaster_pid(d, n)
        if pp:
            pat.append(pp)
            signal_pid(pp, signal.SIGTERM)
        elif pm:
            signal_pid(pm, signal.SIGINT)
        first += [p for p in (pp, pm) if p]
    wait_gone(first, timeout)
    for p in pat:
        if alive(p):
            signal_pid(p, signal.SIGKILL)
    # PostgreSQL left behind (its Patroni was killed, or did not stop it in time): immediate shutdown.
    pms = [p for p in (postmaster_pid(d, n) for n in MEMBERS) if p]
    for p in pms:
        signal_pid(p, signal.SIGQUIT)
    if not wait_gone(pms, 10):
        for p in pms:
            for c in children(p):
                signal_pid(c, signal.SIGKILL)
            signal_pid(p, signal.SIGKILL)
    e = etcd_pid(d)
    if e:
        signal_pid(e, signal.SIGTERM)
        if not wait_gone([e], 10):
            signal_pid(e, signal.SIGKILL)
    # Backends orphaned by a SIGKILLed postmaster exit by themselves; wait for any still named after our data.
    wait_gone(pat + pms + ([e] if e else []), 5)
    left = [p for n in MEMBERS for p in (patroni_pid(d, n), postmaster_pid(d, n)) if p]
    if e and alive(e):
        left.append(e)
    return left


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)

    def add(name, fn, member=False, member_required=True):
        p = sub.add_parser(name)
        p.add_argument("--dir", required=True)
        if member:
            p.add_argument("--member", required=member_required)
        p.set_defaults(fn=fn)
        return p

    p = add("up", cmd_up)
    p.add_argument("--base-port", type=int, required=True)
    p.add_argument("--strict", action="store_true", help="synchronous_mode_strict: true")
    p.add_argument("--ttl", type=int, default=20, help="leader lock TTL, s (Patroni's minimum: 20)")
    p.add_argument("--loop-wait", type=int, default=1)
    p.add_argument("--retry-timeout", type=int, default=5)
    p.add_argument("--timeout", type=float, default=90)
    p = add("status", cmd_status)
    p.add_argument("--probes", action="store_true", help="also GET /primary /replica /sync /health on each member")
    p.add_argument("--probe-timeout", type=float, default=1.0)
    p = add("wait", cmd_wait)
    p.add_argument("--leader")
    p.add_argument("--sync", action="store_true", help="also wait for a streaming synchronous standby")
    p.add_argument("--timeout", type=float, default=60)
    p = add("switchover", cmd_switchover)
    p.add_argument("--candidate")
    p.add_argument("--no-wait-sync", action="store_true")
    p.add_argument("--timeout", type=float, default=60)
    add("kill-postgres", cmd_kill_postgres, member=True)
    add("kill-patroni", cmd_kill_patroni, member=True)
    add("restart-patroni", cmd_restart_patroni, member=True)
    add("freeze", cmd_freeze, member=True)
    add("thaw", cmd_thaw, member=True, member_required=False)
    p = add("down", cmd_down)
    p.add_argument("--rm", action="store_true", help="then delete DIR")
    p.add_argument("--timeout", type=float, default=20)
    a = ap.parse_args()
    a.fn(a)


if __name__ == "__main__":
    main()
