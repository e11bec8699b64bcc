//! `seckill group ...`: status, planned switchover, and rejoining an old master as the shadow.
//!
//! Switchover is lossless by construction: the master is fenced first (no new commits), the
//! shadow replays everything the master wrote, and only then is it promoted. Engine nodes follow
//! by themselves (their monitors see the new master and the fenced old one).

use super::monitor::{admin, probe, FENCE_SQL, UNFENCE_SQL};
use super::Cluster;
use crate::cli::GroupAction;
use crate::config::Config;
use crate::local::{LocalServer, PgBin};
use std::path::Path;
use std::time::{Duration, Instant};
use tokio_postgres::NoTls;

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

pub async fn run(config_path: &Path, action: GroupAction) -> Result<()> {
    let config = Config::load(config_path)?;
    let cluster = Cluster::new(&config)?;
    cluster.discover().await;
    match action {
        GroupAction::Status => {
            println!(
                "{}",
                serde_json::to_string_pretty(&super::groups_report(&cluster))?
            );
            Ok(())
        }
        GroupAction::Switchover { group } => switchover(&cluster, &group).await,
        GroupAction::Rejoin {
            group,
            data_dir,
            port,
        } => rejoin(&cluster, &group, &data_dir, port).await,
    }
}

async fn lsn(config: &tokio_postgres::Config, sql: &str) -> Result<i64> {
    let (client, conn) = config.connect(NoTls).await?;
    let task = tokio::spawn(conn);
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
    let sp = probe(&s.pg_config, &cluster.failover().shadow_name, timeout).await?;
    if !sp.in_recovery || sp.receipt_age_ms.is_none() {
        return Err(format!("{} is not a streaming shadow", s.endpoint).into());
    }
    // Commit synchronously from here on (the shadow streams), so every commit that slips in
    // before the fence takes hold is on the shadow before it is acknowledged.
    let names = super::monitor::sync_names_for(&cluster.failover().shadow_name);
    admin(
        &m.pg_config,
        &format!("ALTER SYSTEM SET synchronous_standby_names = '{names}'; SELECT pg_reload_conf()"),
        timeout,
    )
    .await?;
    println!("fencing {} (no new commits) ...", m.endpoint);
    admin(&m.pg_config, FENCE_SQL, timeout).await?;
    // Transactions that were already writing when the fence went up may still commit; wait for
    // them so the catch-up target below includes them.
    let start = Instant::now();
    while lsn(
        &m.pg_config,
        "SELECT count(*) FROM pg_stat_activity WHERE backend_xid IS NOT NULL AND pid <> pg_backend_pid()",
    )
    .await?
        > 0
    {
        if start.elapsed() > Duration::from_secs(10) {
            admin(&m.pg_config, UNFENCE_SQL, timeout).await?;
            return Err("writing transactions did not finish within 10 s; switchover aborted, master unfenced".into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let target = lsn(
        &m.pg_config,
        "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::bigint",
    )
    .await?;
    let start = Instant::now();
    loop {
        let replayed = lsn(
            &s.pg_config,
            "SELECT pg_wal_lsn_diff(pg_last_wal_replay_lsn(), '0/0')::bigint",
        )
        .await?;
        if replayed >= target {
            break;
        }
        if start.elapsed() > Duration::from_secs(30) {
            admin(&m.pg_config, UNFENCE_SQL, timeout).await?;
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
    super::monitor::promote(&s.pg_config, timeout).await?;
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
    let (mhost, mport) = host_port(&group.members[master].pg_config);
    let (_, oport) = host_port(&group.members[old].pg_config);
    let server = LocalServer::at(&PgBin::locate()?, data_dir, port.unwrap_or(oport));
    println!(
        "rejoining {} as the shadow of {mhost}:{mport} ...",
        group.members[old].endpoint
    );
    tokio::task::spawn_blocking(move || server.rejoin(&mhost, mport)).await??;
    println!("done: it streams from the master; the engine turns synchronous replication back on");
    Ok(())
}
