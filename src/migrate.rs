//! Schema migrations: refinery, embedded in the binary, applied to every group's writable master.
//!
//! Safe when several engine nodes start at once: each takes a session advisory lock on the master
//! before running, so one applies the migrations and the others find them applied.

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
}

/// Apply pending migrations to every group's writable member, as found by the last
/// [`Cluster::discover`] (or monitor round). Returns how many each group applied.
pub async fn run(cluster: &Cluster) -> Result<Vec<(String, usize)>, MigrateError> {
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
                Ok(r) if !app.is_empty() && app != owner => grant_dml(client, app)
                    .await
                    .map(|()| r)
                    .map_err(connect_err),
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

/// The newest migration a group's writable member has applied, read with the admin role (the
/// application role may not read the history).
pub async fn applied_version(group: &crate::shard::ShardGroup) -> Result<i64, MigrateError> {
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
pub async fn analyze(
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

#[cfg(test)]
mod tests {
    /// schema/seckill.sql is the same schema for DBAs who bootstrap by hand; it must not drift
    /// from the migrations.
    #[test]
    fn hand_schema_matches_the_migrations() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let schema = std::fs::read_to_string(root.join("schema/seckill.sql")).unwrap();
        let mut names: Vec<_> = std::fs::read_dir(root.join("migrations"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert!(names.len() >= 3);
        for name in names {
            let migration = std::fs::read_to_string(root.join("migrations").join(&name)).unwrap();
            assert!(
                schema.contains(migration.trim()),
                "schema/seckill.sql no longer contains migrations/{name} verbatim"
            );
        }
    }
}
