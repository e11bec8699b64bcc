//! What one member says, and what it is told: the probe the health monitor sends every round
//! (one session per member, kept across rounds; silence told apart from errors, [`ProbeError`]),
//! and the administrative statements the monitor, the healer and a switchover send to a server
//! (fence, unfence, synchronous standby names, promote).

use super::tls::Endpoint;
use std::time::Duration;

/// One probe's findings.
#[derive(Debug, Clone, PartialEq)]
pub struct Probe {
    pub(crate) in_recovery: bool,
    pub timeline: i64,
    pub fenced: bool,
    /// On a master: the replay lag of the shadow (by `application_name`) in bytes, when it streams.
    pub(crate) standby_lag: Option<i64>,
    pub(crate) sync_names: String,
    /// On a standby whose WAL receiver streams: ms since its last message from the master.
    pub(crate) receipt_age_ms: Option<i64>,
    /// On a standby: a WAL receiver exists but its details are hidden from this role (neither
    /// superuser nor pg_read_all_stats), so whether it hears the master cannot be judged.
    pub(crate) receiver_hidden: bool,
    pub(crate) wal_receiver_timeout_ms: i64,
    pub(crate) wal_sender_timeout_ms: i64,
    /// On a master: whether a standby streams with `sync_state` sync or quorum (None: the
    /// walsenders' details are hidden from this role).
    pub(crate) sync_streaming: Option<bool>,
    /// `synchronous_commit` of the server.
    pub(crate) synchronous_commit: String,
}

/// A probe that failed. `answered` tells a server that replied with an error (alive, e.g. out of
/// connection slots) from one that gave no answer; only the latter counts towards a failover.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub(crate) struct ProbeError {
    pub message: String,
    pub answered: bool,
}

impl ProbeError {
    fn from_pg(e: &tokio_postgres::Error) -> Self {
        // A server starting up or shutting down (57P0x) answers but does not serve.
        let answered = e
            .as_db_error()
            .is_some_and(|db| !db.code().code().starts_with("57P"));
        Self {
            message: describe(e),
            answered,
        }
    }
}

/// `$1`: the shadow's application_name.
///
/// The two timeouts are read with `current_setting` (shown in the unit that fits, `1500ms`,
/// `1min`: valid interval input), not from `pg_settings`, which builds every setting of the
/// server for each read: 0.85 ms a probe against 0.16 ms (pgbench of the two forms on a dev
/// master), and the monitor probes every member four times a second.
const PROBE_SQL: &str = "SELECT pg_is_in_recovery(),
    CASE WHEN pg_is_in_recovery()
         THEN coalesce((SELECT received_tli FROM pg_stat_wal_receiver), 0)::bigint
         ELSE ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::bigint END,
    current_setting('default_transaction_read_only') = 'on',
    CASE WHEN pg_is_in_recovery() THEN NULL
         ELSE (SELECT max(pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn))::bigint
               FROM pg_stat_replication WHERE state = 'streaming' AND application_name = $1) END,
    current_setting('synchronous_standby_names'),
    (SELECT (extract(epoch FROM clock_timestamp() - last_msg_receipt_time) * 1000)::bigint
       FROM pg_stat_wal_receiver WHERE status = 'streaming'),
    coalesce((SELECT status IS NULL FROM pg_stat_wal_receiver), false),
    (extract(epoch FROM current_setting('wal_receiver_timeout')::interval) * 1000)::bigint,
    (extract(epoch FROM current_setting('wal_sender_timeout')::interval) * 1000)::bigint,
    CASE WHEN pg_is_in_recovery() THEN false
         ELSE (SELECT CASE WHEN count(*) = 0 THEN false
                           WHEN bool_and(state IS NULL) THEN NULL
                           ELSE coalesce(bool_or(state = 'streaming'
                                                 AND sync_state IN ('sync', 'quorum')), false) END
               FROM pg_stat_replication) END,
    current_setting('synchronous_commit')";

/// Probe one member over a fresh connection, bounded by `timeout` (a session used once).
pub(crate) async fn probe(
    config: &Endpoint,
    shadow_name: &str,
    timeout: Duration,
) -> Result<Probe, ProbeError> {
    ProbeSession::default()
        .probe(config, shadow_name, timeout)
        .await
}

async fn connect_probe(config: &Endpoint) -> Result<Session, ProbeError> {
    config.connect().await.map_err(|e| ProbeError::from_pg(&e))
}

fn silence(timeout: Duration) -> ProbeError {
    ProbeError {
        message: format!("no answer within {} ms", timeout.as_millis()),
        answered: false,
    }
}

use super::tls::Session;

/// The monitor's own session with one member, kept between probes.
///
/// Not the pool: a pool would hide a dead server behind its idle connections and queue probes
/// behind the sale's queries. One dedicated session per member and node instead of a fresh
/// connection per probe: a fresh connection forks a backend on the server four times a second per
/// node, which under a storm costs the servers measurable CPU. A broken session (a dead or
/// restarted server) is replaced by a fresh connection within the same probe; a probe that merely
/// timed out keeps the session, so a slow answer never sets off a burst of new connections.
#[derive(Default)]
pub(crate) struct ProbeSession {
    session: tokio::sync::Mutex<Option<Session>>,
}

impl ProbeSession {
    pub async fn probe(
        &self,
        config: &Endpoint,
        shadow_name: &str,
        timeout: Duration,
    ) -> Result<Probe, ProbeError> {
        let Ok(mut slot) = tokio::time::timeout(timeout, self.session.lock()).await else {
            return Err(silence(timeout));
        };
        let work = async {
            if let Some((client, _)) = slot.as_ref().filter(|(c, _)| !c.is_closed()) {
                match client.query_one(PROBE_SQL, &[&shadow_name]).await {
                    Ok(row) => return Ok(Probe::from_row(&row)),
                    // The server answered with an error: it is alive; start afresh next time.
                    Err(e) if e.as_db_error().is_some() => {
                        Self::close(&mut slot);
                        return Err(ProbeError::from_pg(&e));
                    }
                    // The session broke (a restart, a dead server): try a fresh one now.
                    Err(_) => {}
                }
            }
            Self::close(&mut slot);
            let (client, task) = connect_probe(config).await?;
            let row = client
                .query_one(PROBE_SQL, &[&shadow_name])
                .await
                .map_err(|e| ProbeError::from_pg(&e));
            *slot = Some((client, task));
            row.map(|row| Probe::from_row(&row))
        };
        match tokio::time::timeout(timeout, work).await {
            Ok(r) => r,
            Err(_) => Err(silence(timeout)),
        }
    }

    fn close(slot: &mut Option<Session>) {
        if let Some((_, task)) = slot.take() {
            task.abort();
        }
    }
}

impl Drop for ProbeSession {
    fn drop(&mut self) {
        Self::close(self.session.get_mut());
    }
}

impl Probe {
    pub(super) fn from_row(row: &tokio_postgres::Row) -> Self {
        Probe {
            in_recovery: row.get(0),
            timeline: row.get(1),
            fenced: row.get(2),
            standby_lag: row.get(3),
            sync_names: row.get(4),
            receipt_age_ms: row.get(5),
            receiver_hidden: row.get(6),
            wal_receiver_timeout_ms: row.get::<_, Option<i64>>(7).unwrap_or(0),
            wal_sender_timeout_ms: row.get::<_, Option<i64>>(8).unwrap_or(0),
            sync_streaming: row.get(9),
            synchronous_commit: row.get(10),
        }
    }

    /// A test's member that answered: in recovery or not, on `timeline`, nothing else set (no
    /// standby named, none streaming, commits that wait).
    #[cfg(test)]
    pub(crate) fn answering(in_recovery: bool, timeline: i64) -> Self {
        Probe {
            in_recovery,
            timeline,
            fenced: false,
            standby_lag: None,
            sync_names: String::new(),
            receipt_age_ms: None,
            receiver_hidden: false,
            wal_receiver_timeout_ms: 0,
            wal_sender_timeout_ms: 0,
            sync_streaming: Some(false),
            synchronous_commit: "on".into(),
        }
    }

    pub(super) fn writable(&self) -> bool {
        !self.in_recovery && !self.fenced
    }

    /// Whether a commit waits for the standbys `synchronous_standby_names` names.
    pub(super) fn commits_wait(&self) -> bool {
        matches!(
            self.synchronous_commit.as_str(),
            "on" | "remote_write" | "remote_apply"
        )
    }
}

/// Whether a master that answered `p` acknowledges a commit only once a standby has it: a
/// standby named in `synchronous_standby_names`, commits that wait for it, and (where this role
/// may see it) one streaming in sync.
pub(crate) fn durable(p: &Probe) -> bool {
    !p.in_recovery
        && p.commits_wait()
        && !p.sync_names.trim().is_empty()
        && p.sync_streaming != Some(false)
}

/// The server's own words for an error, not just "db error".
pub(crate) fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => match std::error::Error::source(e) {
            Some(cause) => format!("{e}: {cause}"),
            None => e.to_string(),
        },
    }
}

/// Run administrative statements on one member over a fresh connection, one at a time (several
/// in one simple query would form a transaction block, which ALTER SYSTEM refuses).
pub async fn admin(config: &Endpoint, sql: &str, timeout: Duration) -> Result<(), String> {
    let work = async {
        let (client, conn_task) = config.connect().await.map_err(|e| describe(&e))?;
        let mut r = Ok(());
        for statement in sql.split(';').map(str::trim).filter(|s| !s.is_empty()) {
            if let Err(e) = client.batch_execute(statement).await {
                r = Err(describe(&e));
                break;
            }
        }
        drop(client);
        conn_task.abort();
        r
    };
    match tokio::time::timeout(timeout, work).await {
        Ok(r) => r,
        Err(_) => Err(format!("no answer within {} ms", timeout.as_millis())),
    }
}

pub(crate) const FENCE_SQL: &str =
    "ALTER SYSTEM SET default_transaction_read_only = on; SELECT pg_reload_conf();";
pub(crate) const UNFENCE_SQL: &str =
    "ALTER SYSTEM RESET default_transaction_read_only; SELECT pg_reload_conf();";

/// `synchronous_standby_names` that names exactly the shadow (quoted: the name is the
/// application_name verbatim), or "" for asynchronous commits.
pub(crate) fn sync_names_for(shadow_name: &str) -> String {
    format!("\"{}\"", shadow_name.replace('"', ""))
}

pub(super) fn sync_sql(names: &str) -> String {
    format!(
        "ALTER SYSTEM SET synchronous_standby_names = '{}'; SELECT pg_reload_conf();",
        names.replace('\'', "''")
    )
}

/// Promote a shadow and make it a usable master: not fenced (a fence may have come along from an
/// old master through pg_rewind), committing synchronously to `sync_names` (empty: asynchronous).
/// Idempotent: promoting a server that is no longer in recovery only reports that.
pub async fn promote(config: &Endpoint, timeout: Duration, sync_names: &str) -> Result<(), String> {
    if let Err(e) = admin(
        config,
        "SELECT pg_promote(true, 30)",
        Duration::from_secs(35),
    )
    .await
    {
        if !e.contains("not in progress") {
            return Err(e);
        }
        tracing::info!("shadow was already promoted (by another engine node)");
    }
    let setup = format!(
        "ALTER SYSTEM RESET default_transaction_read_only; {}",
        sync_sql(sync_names)
    );
    admin(config, &setup, timeout).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durable_needs_a_synchronous_streaming_standby_and_waiting_commits() {
        let master = |names: &str, streaming: Option<bool>, commit: &str| Probe {
            sync_names: names.into(),
            sync_streaming: streaming,
            synchronous_commit: commit.into(),
            ..Probe::answering(false, 1)
        };
        assert!(durable(&master("\"shadow\"", Some(true), "on")));
        assert!(
            durable(&master("pb", None, "on")),
            "walsenders hidden from this role: the setting decides (commits wait)"
        );
        assert!(!durable(&master("", Some(true), "on")), "asynchronous");
        assert!(
            !durable(&master("\"shadow\"", Some(false), "on")),
            "no standby streams"
        );
        assert!(!durable(&master("\"shadow\"", Some(true), "local")));
    }
}
