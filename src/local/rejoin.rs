//! `seckill group rejoin`: turn a group's old master, on this machine, into the shadow of the
//! current master (`pg_rewind`, else a fresh base backup), after checking that its data directory
//! belongs to the group and is not the master's own.

use super::{LocalServer, PgBin};
use crate::shard::Cluster;
use std::path::Path;

pub type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

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
    let (mhost, mport) = group.members[master].conn.host_port();
    let (_, oport) = group.members[old].conn.host_port();
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
    if server.rejoin_cut_short() {
        // An earlier rejoin of it passed the checks below, then stopped halfway: what is left
        // may not even have a control file. It is rebuilt from a base backup, kept aside.
        println!(
            "an earlier rejoin of {} was cut short: it is rebuilt from a fresh base backup (the old directory is kept aside)",
            data_dir.display()
        );
        return rejoin_as_shadow(cluster, &group.members[old].endpoint, server, mhost, mport).await;
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
    rejoin_as_shadow(cluster, &group.members[old].endpoint, server, mhost, mport).await
}

/// The rewind (or base backup) and restart, off the async threads.
async fn rejoin_as_shadow(
    cluster: &Cluster,
    endpoint: &str,
    server: LocalServer,
    mhost: String,
    mport: u16,
) -> Result<()> {
    println!("rejoining {endpoint} as the shadow of {mhost}:{mport} ...");
    let app_name = cluster.failover().shadow_name.clone();
    tokio::task::spawn_blocking(move || server.rejoin(&mhost, mport, &app_name, false)).await??;
    println!("done: it streams from the master; the engine turns synchronous replication back on");
    Ok(())
}

/// A server's system identifier, data directory and current timeline (as it reports them).
async fn identity(endpoint: &crate::shard::tls::Endpoint) -> Result<(String, Option<String>, i64)> {
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
