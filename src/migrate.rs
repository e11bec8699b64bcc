//! Schema migrations: refinery, embedded in the binary, applied to every group's writable master.
//!
//! Safe when several engine nodes start at once: each takes a session advisory lock on the master
//! before running, so one applies the migrations and the others find them applied.
//!
//! This is the one way a schema comes to a group, in `seckill dev`, the compose deployment (its
//! one-shot `migrate` service) and any other: refinery's history is what live moves compare
//! between groups and what upgrades build on. A group whose schema was applied by hand from the
//! retired `schema/seckill.sql` is adopted once with [`baseline`] (`seckill migrate --baseline N`),
//! then migrated as usual.

use crate::shard::Cluster;

mod embedded {
    refinery::embed_migrations!("migrations");
}

/// Advisory lock key: "seckill" in ASCII.
const LOCK_KEY: i64 = 0x0073_6563_6b69_6c6c;

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("group {group}: no writable master to migrate")]
    NoMaster { group: String },
    #[error("group {group}: {source}")]
    Connect {
        group: String,
        source: tokio_postgres::Error,
    },
    #[error("group {group}: {source}")]
    Refinery {
        group: String,
        source: refinery::Error,
    },
    #[error("group {group}: {reason}")]
    Baseline { group: String, reason: String },
}

/// Apply pending migrations to every group's writable member, as found by the last
/// [`Cluster::discover`] (or monitor round). Returns how many each group applied.
pub(crate) async fn run(cluster: &Cluster) -> Result<Vec<(String, usize)>, MigrateError> {
    let mut applied = Vec::new();
    for group in &cluster.groups {
        let connect_err = |source| MigrateError::Connect {
            group: group.name.clone(),
            source,
        };
        let n = as_admin(group, async |client, member| {
            client
                .execute("SELECT pg_advisory_lock($1)", &[&LOCK_KEY])
                .await
                .map_err(connect_err)?;
            let report = embedded::migrations::runner()
                .run_async(client)
                .await
                .map_err(|source| MigrateError::Refinery {
                    group: group.name.clone(),
                    source,
                });
            // The engine's application role gets DML on the tables (and nothing more) when it is
            // not the role that ran the migrations.
            let app = member.conn.pg.get_user().unwrap_or("");
            let owner = member.admin.pg.get_user().unwrap_or("");
            let report = match report {
                Ok(r) if !app.is_empty() && app != owner => {
                    let in_place = r.applied_migrations().is_empty()
                        && dml_granted(client, app).await.unwrap_or(false);
                    if in_place {
                        Ok(r)
                    } else {
                        grant_dml(client, app)
                            .await
                            .map(|()| r)
                            .map_err(connect_err)
                    }
                }
                other => other,
            };
            // Closing the session releases the advisory lock even if unlocking fails.
            let _ = client
                .execute("SELECT pg_advisory_unlock($1)", &[&LOCK_KEY])
                .await;
            Ok(report?.applied_migrations().len())
        })
        .await?;
        if n > 0 {
            tracing::info!(group = %group.name, applied = n, "migrations applied");
        }
        applied.push((group.name.clone(), n));
    }
    Ok(applied)
}

/// Record migrations 1..=`upto` as applied, without running them, on every group whose schema
/// was applied by hand (its tables exist, refinery's history does not or is empty): what
/// `seckill migrate --baseline N` does once before the first `seckill migrate` of such a cluster.
/// Groups that already have a history are refused, never touched.
pub(crate) async fn baseline(
    cluster: &Cluster,
    upto: u32,
) -> Result<Vec<(String, usize)>, MigrateError> {
    let runner = embedded::migrations::runner();
    let migrations: Vec<_> = runner
        .get_migrations()
        .iter()
        .filter(|m| m.version() <= upto)
        .collect();
    let mut recorded = Vec::new();
    for group in &cluster.groups {
        let refused = |reason: String| MigrateError::Baseline {
            group: group.name.clone(),
            reason,
        };
        let failed = |e: tokio_postgres::Error| refused(e.to_string());
        let n = as_admin(group, async |client, _| {
            let tx = client.transaction().await.map_err(failed)?;
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&LOCK_KEY])
                .await
                .map_err(failed)?;
            let row = tx
                .query_one(
                    "SELECT to_regclass('sales') IS NOT NULL,
                            to_regclass('refinery_schema_history') IS NOT NULL",
                    &[],
                )
                .await
                .map_err(failed)?;
            let (has_schema, has_history): (bool, bool) = (row.get(0), row.get(1));
            if !has_schema {
                return Err(refused(
                    "no seckill tables here: nothing to adopt; run `seckill migrate`".into(),
                ));
            }
            tx.batch_execute(
                "CREATE TABLE IF NOT EXISTS refinery_schema_history(
                     version INT4 PRIMARY KEY, name VARCHAR(255), applied_on VARCHAR(255),
                     checksum VARCHAR(255))",
            )
            .await
            .map_err(failed)?;
            let rows: i64 = tx
                .query_one("SELECT count(*) FROM refinery_schema_history", &[])
                .await
                .map_err(failed)?
                .get(0);
            if has_history && rows > 0 {
                return Err(refused(format!(
                    "refinery already records {rows} migration(s) here: no baseline needed"
                )));
            }
            let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
            for m in &migrations {
                tx.execute(
                    "INSERT INTO refinery_schema_history (version, name, applied_on, checksum)
                     VALUES ($1, $2, $3, $4)",
                    &[
                        &(m.version() as i32),
                        &m.name(),
                        &now,
                        &m.checksum().to_string(),
                    ],
                )
                .await
                .map_err(failed)?;
            }
            tx.commit().await.map_err(failed)?;
            Ok(migrations.len())
        })
        .await?;
        recorded.push((group.name.clone(), n));
    }
    Ok(recorded)
}

/// The newest migration a group's writable member has applied, read with the admin role (the
/// application role may not read the history).
pub(crate) async fn applied_version(group: &crate::shard::ShardGroup) -> Result<i64, MigrateError> {
    as_admin(group, async |c, _| {
        c.query_one(
            "SELECT coalesce(max(version), 0)::bigint FROM refinery_schema_history",
            &[],
        )
        .await
        .map(|r| r.get(0))
        .map_err(|source| MigrateError::Connect {
            group: group.name.clone(),
            source,
        })
    })
    .await
}

/// Refresh the planner's statistics of `tables` on a group's writable member (admin role: only
/// a table's owner may), e.g. after a move copied many rows into them.
pub(crate) async fn analyze(
    group: &crate::shard::ShardGroup,
    tables: &[&str],
) -> Result<(), MigrateError> {
    let sql = format!("ANALYZE {}", tables.join(", "));
    as_admin(group, async |c, _| {
        c.batch_execute(&sql)
            .await
            .map_err(|source| MigrateError::Connect {
                group: group.name.clone(),
                source,
            })
    })
    .await
}

/// Run `work` in a session of the admin role on the group's writable member (as found by the
/// last [`Cluster::discover`] or monitor round), which it is given too.
async fn as_admin<T>(
    group: &crate::shard::ShardGroup,
    work: impl AsyncFnOnce(
        &mut tokio_postgres::Client,
        &crate::shard::Member,
    ) -> Result<T, MigrateError>,
) -> Result<T, MigrateError> {
    let idx = group.writer_index().ok_or_else(|| MigrateError::NoMaster {
        group: group.name.clone(),
    })?;
    let (mut client, conn_task) =
        group.members[idx]
            .admin
            .connect()
            .await
            .map_err(|source| MigrateError::Connect {
                group: group.name.clone(),
                source,
            })?;
    let out = work(&mut client, &group.members[idx]).await;
    drop(client);
    conn_task.abort();
    out
}

/// Whether the application role already has what [`grant_dml`] gives on the tables there are: a
/// start that applied nothing then writes nothing. A grant is a catalog write, and its commit
/// waits for the synchronous shadow: on a group between a failover and the heal of its old master
/// (no shadow yet, `shadow_loss = "block"`) an engine granting at every start could not start,
/// nor could the healer it carries. The default privileges for later tables are set by the grant
/// that follows every applied migration.
async fn dml_granted(
    client: &tokio_postgres::Client,
    role: &str,
) -> Result<bool, tokio_postgres::Error> {
    let row = client
        .query_one(
            "SELECT has_schema_privilege($1::name, 'public', 'USAGE')
                AND NOT EXISTS (
                    SELECT 1 FROM pg_tables t, LATERAL format('public.%I', t.tablename) AS r(n)
                    WHERE t.schemaname = 'public' AND t.tablename <> 'refinery_schema_history'
                      AND NOT (has_table_privilege($1::name, r.n, 'SELECT')
                               AND has_table_privilege($1::name, r.n, 'INSERT')
                               AND has_table_privilege($1::name, r.n, 'UPDATE')
                               AND has_table_privilege($1::name, r.n, 'DELETE')))
                AND NOT has_table_privilege($1::name, 'public.refinery_schema_history',
                    'SELECT, INSERT, UPDATE, DELETE, TRUNCATE, REFERENCES, TRIGGER')",
            &[&role],
        )
        .await?;
    Ok(row.get(0))
}

/// DML on every table of the schema for the application role, and for tables made later; but not
/// on the migration history (it could make a later migration be skipped).
async fn grant_dml(
    client: &tokio_postgres::Client,
    role: &str,
) -> Result<(), tokio_postgres::Error> {
    let role = format!("\"{}\"", role.replace('"', "\"\""));
    client
        .batch_execute(&format!(
            "GRANT USAGE ON SCHEMA public TO {role};
             GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {role};
             ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO {role};
             REVOKE ALL ON refinery_schema_history FROM {role};"
        ))
        .await
}
