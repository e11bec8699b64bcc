//! `seckill group ...`: status, planned switchover, and rejoining an old master as the shadow.
//!
//! Switchover is lossless by construction: the master is fenced first (no new commits), the
//! shadow replays everything the master wrote, and only then is it promoted. Engine nodes follow
//! by themselves (their monitors see the new master and the fenced old one).

use super::monitor::{admin, probe, FENCE_SQL, UNFENCE_SQL};
use super::Cluster;
use crate::local::{LocalServer, PgBin};
use std::path::Path;
use std::time::{Duration, Instant};

pub type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

async fn lsn(config: &super::tls::Endpoint, sql: &str) -> Result<i64> {
    let (client, task) = config.connect().await?;
    let v: i64 = client.query_one(sql, &[]).await?.get(0);
    drop(client);
    task.abort();
    Ok(v)
}

/// Planned role swap for one group.
pub async fn switchover(cluster: &Cluster, name: &str) -> Result<()> {
    let (_, group) = cluster
        .by_name(name)
        .ok_or_else(|| format!("no group named {name:?}"))?;
    let timeout = Duration::from_secs(5);
    let master = group
        .writer_index()
        .ok_or("the group has no writable master")?;
    let shadow = (0..group.members.len())
        .find(|&i| i != master)
        .ok_or("the group has no shadow")?;
    let (m, s) = (&group.members[master], &group.members[shadow]);
    let sp = probe(&s.admin, &cluster.failover().shadow_name, timeout).await?;
    if !sp.in_recovery || sp.receipt_age_ms.is_none() {
        return Err(format!("{} is not a streaming shadow", s.endpoint).into());
    }
    // Commit synchronously from here on (the shadow streams), so every commit that slips in
    // before the fence takes hold is on the shadow before it is acknowledged.
    let names = super::monitor::sync_names_for(&cluster.failover().shadow_name);
    admin(
        &m.admin,
        &format!("ALTER SYSTEM SET synchronous_standby_names = '{names}'; SELECT pg_reload_conf()"),
        timeout,
    )
    .await?;
    println!("fencing {} (no new commits) ...", m.endpoint);
    admin(&m.admin, FENCE_SQL, timeout).await?;
    // Transactions that were already writing when the fence went up may still commit; wait for
    // them so the catch-up target below includes them.
    let start = Instant::now();
    while lsn(
        &m.admin,
        "SELECT count(*) FROM pg_stat_activity WHERE backend_xid IS NOT NULL AND pid <> pg_backend_pid()",
    )
    .await?
        > 0
    {
        if start.elapsed() > Duration::from_secs(10) {
            admin(&m.admin, UNFENCE_SQL, timeout).await?;
            return Err("writing transactions did not finish within 10 s; switchover aborted, master unfenced".into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let target = lsn(
        &m.admin,
        "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::bigint",
    )
    .await?;
    let start = Instant::now();
    loop {
        let replayed = lsn(
            &s.admin,
            "SELECT pg_wal_lsn_diff(pg_last_wal_replay_lsn(), '0/0')::bigint",
        )
        .await?;
        if replayed >= target {
            break;
        }
        if start.elapsed() > Duration::from_secs(30) {
            admin(&m.admin, UNFENCE_SQL, timeout).await?;
            return Err(
                "the shadow did not catch up within 30 s; switchover aborted, master unfenced"
                    .into(),
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "shadow {} has replayed everything; promoting ...",
        s.endpoint
    );
    super::monitor::promote(&s.admin, timeout).await?;
    println!(
        "done: {} is the master of {name}; {} stays fenced until `seckill group rejoin {name} --data-dir ...`",
        s.endpoint, m.endpoint
    );
    Ok(())
}

/// Turn the group's non-writable member into a standby of the current master.
pub async fn rejoin(
    cluster: &Cluster,
    name: &str,
    data_dir: &Path,
    port: Option<u16>,
) -> Result<()> {
    let (_, group) = cluster
        .by_name(name)
        .ok_or_else(|| format!("no group named {name:?}"))?;
    let master = group
        .writer_index()
        .ok_or("the group has no writable master to follow")?;
    let old = (0..group.members.len())
        .find(|&i| i != master)
        .ok_or("the group has only one member")?;
    let host_port = |c: &tokio_postgres::Config| -> (String, u16) {
        let host = match c.get_hosts().first() {
            Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
            _ => "127.0.0.1".to_string(),
        };
        (host, c.get_ports().first().copied().unwrap_or(5432))
    };
    let (mhost, mport) = host_port(&group.members[master].conn.pg);
    let (_, oport) = host_port(&group.members[old].conn.pg);
    let admin = &group.members[master].admin.pg;
    let user = admin.get_user().unwrap_or("postgres").to_string();
    let password = admin
        .get_password()
        .map(|p| crate::config::Secret::new(String::from_utf8_lossy(p)))
        .unwrap_or_else(|| crate::config::Secret::new(""));
    let server = LocalServer::at(
        &PgBin::locate()?,
        data_dir,
        port.unwrap_or(oport),
        &user,
        password,
    );
    // Before anything destructive: this data directory must belong to the group (the same
    // system identifier as its master), must not be the master's own (by path, and by timeline:
    // an old master's last checkpoint is on an older timeline than the promoted one's).
    let (id_master, master_dir, master_timeline) = identity(&group.members[master].admin).await?;
    let canonical = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    if master_dir.as_deref().map(|d| canonical(Path::new(d))) == Some(canonical(data_dir)) {
        return Err(format!(
            "{} is the current master's data directory",
            data_dir.display()
        )
        .into());
    }
    let probe = server.clone();
    let (id_dir, timeline_dir) =
        tokio::task::spawn_blocking(move || probe.control_data()).await??;
    if id_dir != id_master {
        return Err(format!(
            "{} belongs to another cluster (system identifier {id_dir}, the group's is {id_master}); refusing to rewind it",
            data_dir.display()
        )
        .into());
    }
    if timeline_dir >= master_timeline {
        return Err(format!(
            "{} is on timeline {timeline_dir}, not older than the master's ({master_timeline}): it may be the master itself; refusing to rewind it",
            data_dir.display()
        )
        .into());
    }
    println!(
        "rejoining {} as the shadow of {mhost}:{mport} ...",
        group.members[old].endpoint
    );
    let app_name = cluster.failover().shadow_name.clone();
    tokio::task::spawn_blocking(move || server.rejoin(&mhost, mport, &app_name)).await??;
    println!("done: it streams from the master; the engine turns synchronous replication back on");
    Ok(())
}

/// A server's system identifier, data directory and current timeline (as it reports them).
async fn identity(endpoint: &super::tls::Endpoint) -> Result<(String, Option<String>, i64)> {
    let (client, task) = endpoint.connect().await?;
    let row = client
        .query_one(
            "SELECT system_identifier::text, current_setting('data_directory'),
                    ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::bigint
             FROM pg_control_system()",
            &[],
        )
        .await;
    drop(client);
    task.abort();
    let row = row?;
    Ok((row.get(0), row.get(1), row.get(2)))
}
