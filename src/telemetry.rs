//! Logs and metrics.
//!
//! **Logs** go to stderr through `tracing`, as text or (`--log-format json`) one JSON object per
//! line for log shippers; `RUST_LOG` filters (default `info`). Every HTTP request runs in a span
//! `"{method} {route}"` carrying its request id, and the order path opens child spans (reserve,
//! order, compensate) with the group and the outcome, so one buyer's request can be followed.
//!
//! **Metrics** are Prometheus text at `GET /metrics`, recorded through the `metrics` facade. Its
//! recorder is process-wide by the facade's design; [`recorder`] installs it once and every engine
//! in the process (tests run several) renders from it. No label carries a sale, item, user or
//! order id: routes are templates, outcomes are codes. Gauges that mirror state (pools, groups,
//! lag, failovers, the process) are set at scrape time.

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::sync::OnceLock;

pub const HTTP_DURATION: &str = "http_server_request_duration_seconds";
pub const HTTP_ACTIVE: &str = "http_server_active_requests";
pub const ORDERS: &str = "seckill_orders_total";
pub const PHASE: &str = "seckill_order_phase_duration_seconds";
pub const BATCH: &str = "seckill_coalesce_batch_size";
pub const SOLDOUT_FASTPATH: &str = "seckill_soldout_fastpath_total";
pub const POOL: &str = "seckill_db_pool_connections";
pub const GROUP_UP: &str = "seckill_group_up";
pub const LAG: &str = "seckill_replication_lag_bytes";
pub const FAILOVERS: &str = "seckill_failovers_total";
pub const REPAIRS: &str = "seckill_reconcile_repairs_total";
pub const VIOLATIONS: &str = "seckill_conservation_violations";

const SECONDS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
const SIZES: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0];

static RECORDER: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// The process's Prometheus recorder (installed on first use), or None when another recorder was
/// installed first.
pub fn recorder() -> Option<PrometheusHandle> {
    RECORDER
        .get_or_init(|| {
            let built = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Full(HTTP_DURATION.into()), SECONDS)
                .and_then(|b| b.set_buckets_for_metric(Matcher::Full(PHASE.into()), SECONDS))
                .and_then(|b| b.set_buckets_for_metric(Matcher::Full(BATCH.into()), SIZES))
                .and_then(|b| b.install_recorder());
            match built {
                Ok(h) => {
                    describe();
                    Some(h)
                }
                Err(e) => {
                    tracing::warn!(error = %e, "metrics recorder not installed");
                    None
                }
            }
        })
        .clone()
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_histogram!(
        HTTP_DURATION,
        Unit::Seconds,
        "HTTP request durations by method, route template and status"
    );
    describe_gauge!(HTTP_ACTIVE, "HTTP requests being served");
    describe_counter!(
        ORDERS,
        "buy requests by outcome (created, replayed, or the refusal's code)"
    );
    describe_histogram!(
        PHASE,
        Unit::Seconds,
        "time of each phase of the order path: reserve, order, compensate"
    );
    describe_histogram!(BATCH, "buy requests served by one coalesced transaction");
    describe_counter!(
        SOLDOUT_FASTPATH,
        "buy requests answered sold_out from memory"
    );
    describe_gauge!(
        POOL,
        "database connections per group and member: idle, in_use, max"
    );
    describe_gauge!(
        GROUP_UP,
        "1 for each member's current role (master, shadow, fenced, down)"
    );
    describe_gauge!(
        LAG,
        Unit::Bytes,
        "how far the group's shadow replays behind its master"
    );
    describe_counter!(FAILOVERS, "failovers this node followed, per group");
    describe_counter!(REPAIRS, "reconciler repairs by kind");
    describe_gauge!(
        VIOLATIONS,
        "items breaking conservation at the last reconciler pass"
    );
    describe_gauge!(
        "process_resident_memory_bytes",
        Unit::Bytes,
        "resident memory of the engine"
    );
    describe_counter!(
        "process_cpu_seconds_total",
        Unit::Seconds,
        "CPU time of the engine"
    );
    describe_gauge!("process_open_fds", "open file descriptors of the engine");
}

/// Resident memory, CPU time and open files of this process, from /proc (Linux).
pub fn record_process() {
    let page = 4096.0;
    if let Ok(statm) = std::fs::read_to_string("/proc/self/statm") {
        if let Some(rss) = statm
            .split_whitespace()
            .nth(1)
            .and_then(|v| v.parse::<f64>().ok())
        {
            metrics::gauge!("process_resident_memory_bytes").set(rss * page);
        }
    }
    if let Ok(stat) = std::fs::read_to_string("/proc/self/stat") {
        // Fields after the command name: utime and stime are the 12th and 13th.
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.split_whitespace().collect())
            .unwrap_or_default();
        let ticks = |i: usize| {
            fields
                .get(i)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
        metrics::counter!("process_cpu_seconds_total").absolute((ticks(11) + ticks(12)) / hz);
    }
    if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
        metrics::gauge!("process_open_fds").set(fds.count() as f64);
    }
}

/// Set up logging: text, or one JSON object per line.
pub fn init_tracing(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,refinery_core=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false);
    let _ = if json {
        builder
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .try_init()
    } else {
        builder.try_init()
    };
}
