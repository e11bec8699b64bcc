//! `seckill group ...`: the groups' state, a planned switchover, and the rejoin of an old master
//! (the dev cluster's business: [`crate::local::rejoin`]). A command for people at a terminal: it
//! prints what it does, and its errors are words.
//!
//! Switchover is lossless by construction: the master is fenced first (no new commits), the
//! shadow replays everything the master wrote, and only then is it promoted. Engine nodes follow
//! by themselves (their monitors see the new master and the fenced old one).

use super::GroupAction;
use crate::config::Config;
use crate::shard::monitor::sync_names_after_promotion;
use crate::shard::probe::{admin, probe, promote, sync_names_for, FENCE_SQL, UNFENCE_SQL};
use crate::shard::{groups_report, tls::Endpoint, Cluster};
use std::path::Path;
use std::time::{Duration, Instant};

pub type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

/// `seckill group ...`: the cluster from the config, then the action.
pub(crate) async fn run(config_path: &Path, action: GroupAction) -> Result<()> {
    let config = Config::load(config_path)?;
    let cluster = Cluster::new(&config)?;
    cluster.discover().await;
    match action {
        GroupAction::Status => {
            println!(
                "{}",
                serde_json::to_string_pretty(&groups_report(&cluster))?
            );
            Ok(())
        }
        GroupAction::Switchover { group } => switchover(&cluster, &group).await,
        GroupAction::Rejoin {
            group,
            data_dir,
            port,
        } => crate::local::rejoin::rejoin(&cluster, &group, &data_dir, port).await,
    }
}

async fn lsn(config: &Endpoint, sql: &str) -> Result<i64> {
    let (client, task) = config.connect().await?;
    let v: i64 = client.query_one(sql, &[]).await?.get(0);
    drop(client);
    task.abort();
    Ok(v)
}

/// Client sessions in a transaction other than this one: any of them may still write.
const OPEN_TRANSACTIONS: &str = "SELECT count(*) FROM pg_stat_activity
     WHERE backend_type = 'client backend' AND xact_start IS NOT NULL
       AND pid <> pg_backend_pid()";

/// Planned role swap for one group.
// Long on purpose: the steps of a lossless switchover in the order they must happen, each
// explained where it happens (fence, catch up, promote, re-point).
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
    let names = sync_names_for(&cluster.failover().shadow_name);
    admin(
        &m.admin,
        &format!("ALTER SYSTEM SET synchronous_standby_names = '{names}'; SELECT pg_reload_conf()"),
        timeout,
    )
    .await?;
    println!("fencing {} (no new commits) ...", m.endpoint);
    admin(&m.admin, FENCE_SQL, timeout).await?;
    // Transactions that were already open when the fence went up stay read-write (the fence
    // applies at a transaction's start) and may still write and commit, whether or not they hold
    // a transaction id yet: wait for every open one, so the catch-up target below includes them.
    // Those that begin within a second of the fence may not have read it yet (the reload reaches
    // each session as a signal); later ones are read-only.
    let fenced_ms = lsn(
        &m.admin,
        "SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint",
    )
    .await?;
    let open = format!(
        "{OPEN_TRANSACTIONS} AND xact_start < to_timestamp({fenced_ms} / 1000.0) + interval '1 second'"
    );
    let start = Instant::now();
    while lsn(&m.admin, &open).await? > 0 {
        if start.elapsed() > Duration::from_secs(10) {
            admin(&m.admin, UNFENCE_SQL, timeout).await?;
            return Err(
                "open transactions did not finish within 10 s; switchover aborted, master unfenced"
                    .into(),
            );
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
    let names = sync_names_after_promotion(cluster.failover());
    promote(&s.admin, timeout, &names).await?;
    println!(
        "done: {} is the master of {name}; {} stays fenced until `seckill group rejoin {name} --data-dir ...`",
        s.endpoint, m.endpoint
    );
    Ok(())
}
