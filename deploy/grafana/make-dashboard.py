#!/usr/bin/env python3
"""Writes deploy/grafana/dashboards/seckill.json, the Grafana dashboard of a sale.

The dashboard is generated so that its panels stay regular (same datasource, units, layout);
edit this file and run it, then commit both. A test (tests/observability.rs) checks that every
metric the dashboard queries is one the engine exports.
"""

import json
import pathlib

DS = {"type": "prometheus", "uid": "seckill-prometheus"}
panels = []
_next = {"x": 0, "y": 0, "id": 1}


def row(title):
    if _next["x"]:
        _next["x"], _next["y"] = 0, _next["y"] + 8
    panels.append({"type": "row", "title": title, "id": _next["id"], "collapsed": False,
                   "gridPos": {"h": 1, "w": 24, "x": 0, "y": _next["y"]}, "panels": []})
    _next["id"] += 1
    _next["y"] += 1


def panel(title, targets, unit="short", kind="timeseries", width=12, description="", stack=False,
          bad_below=None):
    if _next["x"] + width > 24:
        _next["x"], _next["y"] = 0, _next["y"] + 8
    p = {
        "type": kind,
        "title": title,
        "description": description,
        "id": _next["id"],
        "datasource": DS,
        "gridPos": {"h": 8, "w": width, "x": _next["x"], "y": _next["y"]},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {"legend": {"displayMode": "table", "placement": "right", "calcs": ["lastNotNull", "max"]}},
        "targets": [
            {"refId": chr(ord("A") + i), "datasource": DS, "expr": expr, "legendFormat": legend}
            for i, (expr, legend) in enumerate(targets)
        ],
    }
    if stack:
        p["fieldConfig"]["defaults"]["custom"] = {"stacking": {"mode": "normal"}, "fillOpacity": 40}
    if kind == "stat":
        # bad_below=1: red under 1, green from 1; bad_below=None: green at 0, red from 1.
        steps = ([{"color": "red", "value": None}, {"color": "green", "value": bad_below}]
                 if bad_below is not None else
                 [{"color": "green", "value": None}, {"color": "red", "value": 1}])
        p["options"] = {"reduceOptions": {"calcs": ["lastNotNull"]}, "colorMode": "background"}
        p["fieldConfig"]["defaults"]["thresholds"] = {"mode": "absolute", "steps": steps}
    panels.append(p)
    _next["id"] += 1
    _next["x"] += width


R = "$__rate_interval"

row("Orders")
panel("Buy requests per second by outcome",
      [(f"sum by (outcome) (rate(seckill_orders_total[{R}]))", "{{outcome}}")],
      unit="reqps", stack=True,
      description="created and replayed are successes; every other outcome is the refusal's code.")
panel("Stock sold per second (created orders)",
      [(f'sum(rate(seckill_orders_total{{outcome="created"}}[{R}]))', "created"),
       (f"sum(rate(seckill_soldout_fastpath_total[{R}]))", "refused sold out without a database round trip")],
      unit="reqps")
panel("Order path phases, p99",
      [(f"histogram_quantile(0.99, sum by (le, phase) (rate(seckill_order_phase_duration_seconds_bucket[{R}])))",
        "{{phase}}")],
      unit="s", description="reserve: the stock decrement (coalesced batch); order: the order insert; compensate: returning stock.")
panel("Coalesced batch size",
      [(f"histogram_quantile(0.5, sum by (le) (rate(seckill_coalesce_batch_size_bucket[{R}])))", "p50"),
       (f"histogram_quantile(0.99, sum by (le) (rate(seckill_coalesce_batch_size_bucket[{R}])))", "p99"),
       (f"sum(rate(seckill_coalesce_batch_size_sum[{R}])) / sum(rate(seckill_coalesce_batch_size_count[{R}]))", "mean")],
      description="Buy requests served by one reserve transaction on a hot item.")

row("HTTP")
panel("Latency by route, p50",
      [(f"histogram_quantile(0.5, sum by (le, http_route) (rate(http_server_request_duration_seconds_bucket[{R}])))",
        "{{http_route}}")], unit="s")
panel("Latency by route, p99",
      [(f"histogram_quantile(0.99, sum by (le, http_route) (rate(http_server_request_duration_seconds_bucket[{R}])))",
        "{{http_route}}")], unit="s")
panel("Requests per second by status",
      [(f"sum by (http_response_status_code) (rate(http_server_request_duration_seconds_count[{R}]))",
        "{{http_response_status_code}}")], unit="reqps", stack=True)
panel("Requests in flight",
      [("sum by (http_route) (http_server_active_requests)", "{{http_route}}")])

row("Shard groups")
panel("Masters serving", [('sum by (group) (seckill_group_up{role="master"})', "{{group}}")],
      kind="stat", width=6, bad_below=1,
      description="Members each group's engine sees as its writable master: 1, or the group is down.")
panel("Members down or fenced", [('sum by (group) (seckill_group_up{role=~"down|fenced"})', "{{group}}")],
      kind="stat", width=6,
      description="0 in a healthy group. After a failover the old master is down or fenced until it is healed back as the shadow.")
panel("Replication lag", [("seckill_replication_lag_bytes", "{{group}}")], unit="bytes", width=6,
      description="Bytes of WAL the shadow has not yet confirmed.")
panel("Failovers (last hour)", [("increase(seckill_failovers_total[1h])", "{{group}}")], width=6)
panel("Shadow streaming", [("min by (group) (seckill_group_shadow_streaming)", "{{group}}")],
      kind="stat", width=6, bad_below=1,
      description="1 while a shadow streams from the group's master; 0 after a failover until the old master is healed back.")
panel("Synchronous", [("min by (group) (seckill_group_synchronous)", "{{group}}")],
      kind="stat", width=6, bad_below=1,
      description="1 while the master commits synchronously to its shadow (a 201 means two servers hold the order).")
panel("Writes held (no shadow)", [("max by (group) (seckill_group_writes_held)", "{{group}}")],
      kind="stat", width=6,
      description="1 while purchases on the group wait, then get 503 shadow_unavailable: shadow_loss = block and no shadow streams.")
panel("Heals (last hour)", [('sum by (group, outcome) (increase(seckill_heals_total[1h]))', "{{group}} {{outcome}}")],
      width=6,
      description="Members healed back into their group's shadow (old masters rewound, dead or frozen shadows restarted) by seckill dev's healer.")
panel("Member roles", [("seckill_group_up == 1", "{{group}} {{member}}: {{role}}")], width=24,
      description="The role the engine last saw for each member (master, shadow, fenced, down).")
panel("Database work per second",
      [(f"sum by (group, work) (rate(seckill_db_work_total[{R}]))", "{{group}} {{work}}")], unit="ops",
      description="Transactions and reads asked of each group: read, reserve (transaction 1), settle (the rest). A bot flood refused at the front door adds none.")
panel("Pool connections",
      [("seckill_db_pool_connections", "{{group}} {{member}} {{state}}")], stack=True)
panel("Reconciler",
      [(f"sum by (kind) (increase(seckill_reconcile_repairs_total[5m]))", "repairs: {{kind}}"),
       ("seckill_conservation_violations", "conservation violations")],
      description="Conservation violations must stay at 0: a sold count that does not match the orders.")

row("Process")
panel("Resident memory", [("process_resident_memory_bytes", "rss")], unit="bytes", width=8)
panel("CPU", [(f"rate(process_cpu_seconds_total[{R}])", "cores")], unit="short", width=8)
panel("Open file descriptors", [("process_open_fds", "fds")], width=8)

dashboard = {
    "uid": "seckill-sale",
    "title": "seckill: flash sale",
    "tags": ["seckill"],
    "timezone": "utc",
    "schemaVersion": 39,
    "version": 1,
    "editable": True,
    "refresh": "5s",
    "time": {"from": "now-15m", "to": "now"},
    "panels": panels,
    "templating": {"list": []},
    "annotations": {"list": []},
}

out = pathlib.Path(__file__).parent / "dashboards" / "seckill.json"
out.write_text(json.dumps(dashboard, indent=2) + "\n")
print(f"wrote {out}")
