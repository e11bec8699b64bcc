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

pub(crate) const HTTP_DURATION: &str = "http_server_request_duration_seconds";
pub(crate) const HTTP_ACTIVE: &str = "http_server_active_requests";
pub(crate) const ORDERS: &str = "seckill_orders_total";
pub(crate) const PHASE: &str = "seckill_order_phase_duration_seconds";
pub(crate) const BATCH: &str = "seckill_coalesce_batch_size";
pub(crate) const SOLDOUT_FASTPATH: &str = "seckill_soldout_fastpath_total";
pub(crate) const POOL: &str = "seckill_db_pool_connections";
pub(crate) const GROUP_UP: &str = "seckill_group_up";
pub(crate) const LAG: &str = "seckill_replication_lag_bytes";
pub(crate) const FAILOVERS: &str = "seckill_failovers_total";
pub(crate) const SHADOW_STREAMING: &str = "seckill_group_shadow_streaming";
pub(crate) const SYNCHRONOUS: &str = "seckill_group_synchronous";
pub(crate) const WRITES_HELD: &str = "seckill_group_writes_held";
pub(crate) const HEALS: &str = "seckill_heals_total";
pub(crate) const REPAIRS: &str = "seckill_reconcile_repairs_total";
pub(crate) const VIOLATIONS: &str = "seckill_conservation_violations";
pub(crate) const DB_WORK: &str = "seckill_db_work_total";
pub(crate) const PROCESS_RSS: &str = "process_resident_memory_bytes";
pub(crate) const PROCESS_CPU: &str = "process_cpu_seconds_total";
pub(crate) const PROCESS_FDS: &str = "process_open_fds";

/// Every metric the engine exports (histograms also as `_bucket`, `_sum` and `_count`), for the
/// tests that hold the dashboard and the code to each other.
#[cfg(test)]
pub(crate) const ALL: &[&str] = &[
    HTTP_DURATION,
    HTTP_ACTIVE,
    ORDERS,
    PHASE,
    BATCH,
    SOLDOUT_FASTPATH,
    POOL,
    GROUP_UP,
    LAG,
    FAILOVERS,
    SHADOW_STREAMING,
    SYNCHRONOUS,
    WRITES_HELD,
    HEALS,
    REPAIRS,
    VIOLATIONS,
    DB_WORK,
    PROCESS_RSS,
    PROCESS_CPU,
    PROCESS_FDS,
];
#[cfg(test)]
const HISTOGRAMS: &[&str] = &[HTTP_DURATION, PHASE, BATCH];

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
    describe_gauge!(
        SHADOW_STREAMING,
        "1 while a shadow streams from the group's master"
    );
    describe_gauge!(
        SYNCHRONOUS,
        "1 while the group's master commits synchronously to its shadow"
    );
    describe_gauge!(
        WRITES_HELD,
        "1 while the group's writes wait for a shadow (shadow_loss = block): 503 shadow_unavailable"
    );
    describe_counter!(
        HEALS,
        "members this node healed back into the group's shadow, per group and outcome (ok, failed)"
    );
    describe_counter!(REPAIRS, "reconciler repairs by kind");
    describe_gauge!(
        VIOLATIONS,
        "items breaking conservation at the last reconciler pass"
    );
    describe_gauge!(PROCESS_RSS, Unit::Bytes, "resident memory of the engine");
    describe_gauge!(PROCESS_CPU, Unit::Seconds, "CPU time of the engine");
    describe_gauge!(PROCESS_FDS, "open file descriptors of the engine");
}

/// The metric a series name belongs to: `x_bucket`, `x_sum` and `x_count` of a histogram `x` are
/// `x`; anything else is itself.
#[cfg(test)]
pub(crate) fn metric_of(series: &str) -> &str {
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = series.strip_suffix(suffix) {
            if HISTOGRAMS.contains(&base) {
                return base;
            }
        }
    }
    series
}

/// Resident memory, CPU time and open files of this process, from /proc (Linux).
pub(crate) fn record_process() {
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(1) as f64;
    if let Ok(statm) = std::fs::read_to_string("/proc/self/statm") {
        if let Some(rss) = statm
            .split_whitespace()
            .nth(1)
            .and_then(|v| v.parse::<f64>().ok())
        {
            metrics::gauge!(PROCESS_RSS).set(rss * page);
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
        // A gauge holding a monotonic total: the facade's counters are integers, and whole
        // seconds would make rate() jump. Prometheus's rate() reads it all the same.
        metrics::gauge!(PROCESS_CPU).set((ticks(11) + ticks(12)) as f64 / hz as f64);
    }
    if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
        metrics::gauge!(PROCESS_FDS).set(fds.count() as f64);
    }
}

/// Which log lines are written: `RUST_LOG`'s directives.
///
/// Directives of targets and levels only (`info`, `seckill=debug,tower_http=warn`), the usual
/// kind, are kept as a [`Targets`](tracing_subscriber::filter::Targets) filter: it decides once
/// per call site and does nothing per span. An `EnvFilter`, needed only for span and field
/// directives (`[request{route=/v1/time}]=debug`), takes a shared lock on every span's creation,
/// entry, exit and close: every HTTP request enters its span at least twice.
pub enum LogFilter {
    Targets(Box<tracing_subscriber::filter::Targets>),
    Env(Box<tracing_subscriber::EnvFilter>),
}

impl LogFilter {
    /// The filter of `directives`: a [`LogFilter::Targets`] where they allow it.
    pub fn new(directives: &str) -> Result<Self, String> {
        if let Ok(targets) = directives.parse() {
            return Ok(Self::Targets(Box::new(targets)));
        }
        tracing_subscriber::EnvFilter::try_new(directives)
            .map(|e| Self::Env(Box::new(e)))
            .map_err(|e| format!("RUST_LOG {directives:?}: {e}"))
    }

    fn layer<S>(self) -> Box<dyn tracing_subscriber::Layer<S> + Send + Sync>
    where
        S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    {
        match self {
            Self::Targets(t) => t,
            Self::Env(e) => e,
        }
    }
}

/// Set up logging to stderr: text, or one JSON object per line. `RUST_LOG` filters; directives it
/// cannot parse are reported on stderr and the default applies (`info`, refinery at `warn`).
pub fn init_tracing(json: bool) {
    let default = || {
        LogFilter::Targets(Box::new(
            tracing_subscriber::filter::Targets::new()
                .with_default(tracing::Level::INFO)
                .with_target("refinery_core", tracing::Level::WARN),
        ))
    };
    let filter = match std::env::var("RUST_LOG") {
        Ok(directives) if !directives.trim().is_empty() => LogFilter::new(&directives)
            .unwrap_or_else(|e| {
                eprintln!("{e}; logging at info");
                default()
            }),
        _ => default(),
    };
    init_tracing_with(json, filter, std::io::stderr);
}

/// Set up logging to `writer` (tests read their own log through this). A JSON line lists every
/// span it happened in (`spans`), so an order phase's line carries its request's `request_id`.
pub fn init_tracing_with<W>(json: bool, filter: LogFilter, writer: W)
where
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    // Colours only for a person at a terminal: in a log file they are escape codes, and they
    // cost formatting on every line.
    let ansi = !json && std::io::IsTerminal::is_terminal(&std::io::stderr());
    let lines = tracing_subscriber::fmt::layer()
        .with_writer(writer)
        .with_ansi(ansi)
        .with_target(false);
    let logging = tracing_subscriber::registry().with(filter.layer());
    let _ = if json {
        logging
            .with(lines.json().with_current_span(false).with_span_list(true))
            .try_init()
    } else if ansi {
        logging.with(lines).try_init()
    } else {
        logging.with(lines.fmt_fields(PlainFields)).try_init()
    };
}

/// Text log fields as tracing-subscriber's default writes them without colours (`name=value`,
/// spaced; the message and errors by the default itself), minus its cost: the default paints every
/// field's name and `=` through a colour style even when colours are off. Every request's span has
/// three fields, so that painting was 8% of the engine's instructions per `GET /v1/time`
/// (callgrind).
struct PlainFields;

impl<'w> tracing_subscriber::fmt::FormatFields<'w> for PlainFields {
    fn format_fields<R: tracing_subscriber::field::RecordFields>(
        &self,
        mut writer: tracing_subscriber::fmt::format::Writer<'w>,
        fields: R,
    ) -> std::fmt::Result {
        // Written into a buffer of this thread, then handed over in one piece: a span's field
        // string starts empty, and grown field by field it was reallocated four times per request
        // (1,000 of a `GET /v1/time`'s instructions). Should the buffer be taken (tracing does
        // not re-enter a subscriber from a field's formatting, but if it did), fields are written
        // directly.
        let mut fields = Some(fields);
        let buffered = FIELD_BUFFER
            .try_with(|cell| {
                let mut buf = cell.try_borrow_mut().ok()?;
                buf.clear();
                let mut visitor =
                    PlainVisitor::new(tracing_subscriber::fmt::format::Writer::new(&mut *buf));
                fields.take()?.record(&mut visitor);
                let result = visitor.result.and_then(|()| writer.write_str(&buf));
                if buf.capacity() > FIELD_BUFFER_KEPT {
                    *buf = String::new();
                }
                Some(result)
            })
            .ok()
            .flatten();
        match (buffered, fields) {
            (Some(result), _) => result,
            (None, Some(fields)) => {
                let mut visitor = PlainVisitor::new(writer);
                fields.record(&mut visitor);
                visitor.result
            }
            (None, None) => Ok(()),
        }
    }
}

thread_local! {
    /// [`PlainFields`]' buffer: one per thread, reused.
    static FIELD_BUFFER: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
}

/// A buffer grown past this by one long field is let go rather than kept by its thread.
const FIELD_BUFFER_KEPT: usize = 4096;

struct PlainVisitor<'w> {
    writer: tracing_subscriber::fmt::format::Writer<'w>,
    empty: bool,
    result: std::fmt::Result,
}

impl<'w> PlainVisitor<'w> {
    fn new(writer: tracing_subscriber::fmt::format::Writer<'w>) -> Self {
        Self {
            writer,
            empty: true,
            result: Ok(()),
        }
    }

    /// Hand one field to the default's visitor, continuing this line.
    fn by_default(
        &mut self,
        record: impl FnOnce(&mut tracing_subscriber::fmt::format::DefaultVisitor<'_>),
    ) {
        if self.result.is_ok() {
            let mut v = tracing_subscriber::fmt::format::DefaultVisitor::new(
                self.writer.by_ref(),
                self.empty,
            );
            record(&mut v);
            self.result = tracing_subscriber::field::VisitOutput::finish(v);
            self.empty = false;
        }
    }
}

impl tracing::field::Visit for PlainVisitor<'_> {
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        if field.name() == "message" {
            self.by_default(|v| v.record_str(field, value));
        } else {
            self.record_debug(field, &value);
        }
    }

    fn record_error(
        &mut self,
        field: &tracing::field::Field,
        value: &(dyn std::error::Error + 'static),
    ) {
        self.by_default(|v| v.record_error(field, value));
    }

    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        let name = field.name();
        // The `log` crate's metadata, written elsewhere (the default skips it too).
        if name.starts_with("log.") {
            return;
        }
        if name == "message" {
            // The default escapes terminal control sequences in messages.
            return self.by_default(|v| v.record_debug(field, value));
        }
        if self.result.is_err() {
            return;
        }
        let name = name.strip_prefix("r#").unwrap_or(name);
        let (w, pad) = (&mut self.writer, !self.empty);
        self.result = (|| {
            if pad {
                w.write_char(' ')?;
            }
            w.write_str(name)?;
            w.write_char('=')?;
            write!(w, "{value:?}")
        })();
        self.empty = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every metric deploy/grafana's dashboard queries is one the engine exports, so renaming a
    /// metric cannot silently blank a panel.
    #[test]
    fn the_dashboard_queries_only_exported_metrics() {
        let text = include_str!("../deploy/grafana/dashboards/seckill.json");
        let dashboard: serde_json::Value = serde_json::from_str(text).expect("dashboard JSON");
        let mut exprs = Vec::new();
        for panel in dashboard["panels"].as_array().expect("panels") {
            for target in panel["targets"].as_array().into_iter().flatten() {
                exprs.push(target["expr"].as_str().expect("expr").to_string());
            }
        }
        assert!(exprs.len() > 10, "the dashboard has its queries");
        let mut used = std::collections::BTreeSet::new();
        for expr in &exprs {
            // Strip label matchers and legends: metric names are the identifiers outside `{...}`.
            let mut depth = 0;
            let outside: String = expr
                .chars()
                .map(|c| {
                    match c {
                        '{' => depth += 1,
                        '}' => depth -= 1,
                        _ => {}
                    }
                    if depth == 0 && (c.is_ascii_alphanumeric() || c == '_') {
                        c
                    } else {
                        ' '
                    }
                })
                .collect();
            for word in outside.split_whitespace() {
                if ["seckill_", "http_server_", "process_"]
                    .iter()
                    .any(|p| word.starts_with(p))
                {
                    used.insert(word.to_string());
                }
            }
        }
        for series in &used {
            assert!(
                ALL.contains(&metric_of(series)),
                "the dashboard queries {series}, which the engine does not export"
            );
        }
        for metric in ALL {
            assert!(
                used.iter().any(|s| metric_of(s) == *metric),
                "no dashboard panel shows {metric}"
            );
        }
    }

    #[test]
    fn histogram_series_belong_to_their_metric() {
        assert_eq!(metric_of("seckill_coalesce_batch_size_bucket"), BATCH);
        assert_eq!(metric_of("seckill_orders_total"), ORDERS);
        assert_eq!(
            metric_of("seckill_failovers_count"),
            "seckill_failovers_count"
        );
    }

    #[test]
    fn targets_and_levels_are_kept_without_span_bookkeeping() {
        for plain in [
            "info",
            "info,refinery_core=warn",
            "warn,seckill=debug",
            "seckill::api=trace",
        ] {
            assert!(
                matches!(LogFilter::new(plain), Ok(LogFilter::Targets(_))),
                "{plain}"
            );
        }
        assert!(matches!(
            LogFilter::new("[request{route=/v1/time}]=debug"),
            Ok(LogFilter::Env(_))
        ));
        let bad = LogFilter::new("seckill=loudest")
            .err()
            .expect("a bad level is refused");
        assert!(bad.contains("seckill=loudest"), "{bad}");
    }

    /// A writer into a shared buffer, for the text log tests.
    #[derive(Clone, Default)]
    struct Buffer(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("buffer").extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// Lines of every kind of field, in a request-like span.
    fn some_lines() {
        let span =
            tracing::info_span!("request", method = %"POST", route = %"/v1/x", request_id = %"r-1");
        let _in = span.enter();
        let child = tracing::info_span!("reserve", group = "g0", outcome = tracing::field::Empty);
        child.record("outcome", "sold out");
        let _in_child = child.enter();
        let err = std::io::Error::other("disk on fire");
        tracing::warn!(
            group = "g0",
            n = 3,
            ok = true,
            reason = %"a b",
            quoted = "say \"hi\"",
            list = ?vec![1, 2],
            error = &err as &(dyn std::error::Error + 'static),
            "it \x1b[31mbroke"
        );
        tracing::info!(r#type = "x", "plain");
        tracing::info!(message = "as a field", done = 1u64);
        // Fields whose formatting logs: the span's while its fields are written, the event's
        // while its line is.
        let chatty = tracing::info_span!("chatty", value = ?Chatty);
        let _in_chatty = chatty.enter();
        tracing::info!(value = ?Chatty, "outer");
    }

    /// A value whose formatting logs, as a Debug impl calling into code that logs may.
    struct Chatty;

    impl std::fmt::Debug for Chatty {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            tracing::info!(inner = 1, "logged while formatting");
            f.write_str("chatty")
        }
    }

    #[test]
    fn plain_fields_write_what_the_default_writes_without_colours() {
        use tracing_subscriber::layer::SubscriberExt;
        let (plain, default) = (Buffer::default(), Buffer::default());
        let lines = |b: &Buffer| {
            let b = b.clone();
            tracing_subscriber::fmt::layer()
                .with_writer(move || b.clone())
                .with_ansi(false)
                .without_time()
        };
        tracing::subscriber::with_default(
            tracing_subscriber::registry().with(lines(&plain).fmt_fields(PlainFields)),
            some_lines,
        );
        tracing::subscriber::with_default(
            tracing_subscriber::registry().with(lines(&default)),
            some_lines,
        );
        let text =
            |b: &Buffer| String::from_utf8(b.0.lock().expect("buffer").clone()).expect("utf-8");
        let (plain, default) = (text(&plain), text(&default));
        assert_eq!(plain, default);
        // What a field's formatting logs is dropped: tracing does not re-enter a subscriber.
        assert_eq!(plain.lines().count(), 4, "{plain}");
        assert!(plain.contains("chatty{value=chatty}"), "{plain}");
        assert!(plain.contains("request_id=r-1"), "{plain}");
        assert!(plain.contains("outcome=\"sold out\""), "{plain}");
        assert!(
            !plain.contains('\x1b'),
            "terminal escapes are escaped: {plain}"
        );
    }
}
