//! `seckill shard-map ...`: the router-config table and the key moves, one function per action.
//! A command for a DBA at a terminal: tables and JSON on stdout, progress on stderr, and every
//! failure an error in words (exit 1).

use super::CliResult;
use crate::config::Config;
use crate::moves::{Move, Mover, Phase, Unit};
use crate::router::{KeyKind, Router};
use crate::shard::Cluster;
use crate::shardmap::{Maps, Route};
use clap::Subcommand;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

type Failure = Box<dyn std::error::Error>;

#[derive(Debug, Subcommand)]
pub enum ShardMapAction {
    /// Print every entry and the table's version.
    List,
    /// Where one key of a kind (`items` or `users`) routes, and why (hash, range or table).
    Route { kind: String, key: u64 },
    /// Route one key to a group. Refused (exit 1, `has_data`) when the key has rows on its
    /// current or its new group: a key with rows must be moved, not re-routed.
    Set {
        kind: String,
        key: u64,
        group: String,
    },
    /// Remove an entry: the key routes by its rule again (refused like `set` when it has rows).
    Delete { kind: String, key: u64 },
    /// Move a key (or with --slot, a hash slot) of items or users to another group while it
    /// sells, and wait until it has switched (docs/dba.md "Moving keys"). Exit 1 when it fails.
    Move {
        kind: String,
        /// The key; omit it with --slot.
        #[arg(required_unless_present = "slot", conflicts_with = "slot")]
        key: Option<u64>,
        /// Move every key of this hash slot.
        #[arg(long)]
        slot: Option<u32>,
        /// The destination group.
        #[arg(long)]
        to: String,
        /// Only run the pre-checks and print what would be copied.
        #[arg(long)]
        dry_run: bool,
        /// Drop the source's copy right after the switch (no way back but a new move).
        #[arg(long)]
        complete: bool,
    },
    /// Even out how many hash slots of a kind each group holds (e.g. after adding a group with no
    /// slots): plans the slot moves and runs them one at a time, each completed before the next,
    /// printing progress. Stops at the first move that fails (exit 1).
    Rebalance {
        kind: String,
        /// Print the plan only.
        #[arg(long)]
        dry_run: bool,
        /// Run at most this many moves now (the rest on a later run).
        #[arg(long)]
        max_moves: Option<usize>,
    },
    /// List the moves (newest first), or show one.
    Moves { move_id: Option<u64> },
    /// Roll back a move that has not switched yet.
    MoveCancel { move_id: u64 },
    /// Move the key of a switched or completed move back (a new move); waits like `move`.
    MoveReverse { move_id: u64 },
    /// Drop the source's copy of a switched move.
    MoveComplete { move_id: u64 },
}

/// Everything an action needs: the loaded config, the groups, the routing rules and a mover whose
/// background tasks are waited for before the command exits.
struct Context {
    config: Arc<Config>,
    cluster: Arc<Cluster>,
    router: Arc<Router>,
    mover: Arc<Mover>,
}

impl Context {
    fn maps(&self) -> Maps<'_> {
        Maps {
            config: &self.config,
            cluster: &self.cluster,
            router: &self.router,
        }
    }
}

pub(super) async fn run(path: &Path, action: ShardMapAction) -> CliResult {
    let config = Arc::new(Config::load(path)?);
    let cluster = Arc::new(Cluster::new(&config)?);
    cluster.discover().await;
    let router = Arc::new(Router::from_config(&config)?);
    let tasks = tokio_util::task::TaskTracker::new();
    let mover = Mover::new(
        config.clone(),
        cluster.clone(),
        router.clone(),
        tasks.clone(),
    );
    let cx = Context {
        config,
        cluster,
        router,
        mover,
    };
    let result = match action {
        ShardMapAction::List => list(&cx).await,
        ShardMapAction::Route { kind: k, key: n } => {
            let maps = cx.maps();
            maps.refresh().await?;
            print_route(&maps.route(kind(&k)?, key(n)?))
        }
        ShardMapAction::Set {
            kind: k,
            key: n,
            group,
        } => {
            print_route(&cx.maps().change(kind(&k)?, key(n)?, Some(&group)).await?)?;
            eprintln!("engine nodes pick it up within routing.table_refresh_ms");
            Ok(())
        }
        ShardMapAction::Delete { kind: k, key: n } => {
            print_route(&cx.maps().change(kind(&k)?, key(n)?, None).await?)
        }
        ShardMapAction::Move {
            kind: k,
            key: n,
            slot,
            to,
            dry_run,
            complete,
        } => {
            let unit = match (n, slot) {
                (Some(n), _) => Unit::Key(key(n)?),
                (None, s) => Unit::Slot(s.unwrap_or_default()),
            };
            start_move(&cx.mover, kind(&k)?, unit, &to, dry_run, complete).await
        }
        ShardMapAction::Rebalance {
            kind: k,
            dry_run,
            max_moves,
        } => rebalance(&cx.mover, kind(&k)?, dry_run, max_moves).await,
        ShardMapAction::Moves { move_id } => show_moves(&cx.mover, move_id).await,
        ShardMapAction::MoveCancel { move_id } => {
            cx.mover.cancel(move_id).await?;
            follow_move(&cx.mover, move_id).await
        }
        ShardMapAction::MoveReverse { move_id } => {
            let m = cx.mover.reverse(move_id, false).await?;
            follow_move(&cx.mover, m.move_id).await
        }
        ShardMapAction::MoveComplete { move_id } => {
            cx.mover.complete(move_id).await?;
            follow_move(&cx.mover, move_id).await
        }
    };
    tasks.close();
    tasks.wait().await;
    result
}

fn kind(given: &str) -> Result<KeyKind, Failure> {
    Ok(KeyKind::parse_given(given)?)
}

fn key(k: u64) -> Result<u64, Failure> {
    if (1..=i64::MAX as u64).contains(&k) {
        Ok(k)
    } else {
        Err("key must be between 1 and 2^63-1".into())
    }
}

fn print_route(route: &Route) -> CliResult {
    println!("{}", serde_json::to_string(route)?);
    Ok(())
}

/// The entries, the moved slots and the open moves, with the table's version.
async fn list(cx: &Context) -> CliResult {
    let map = cx.maps().list().await?;
    println!("version {}", map.version);
    println!("{:<6} {:>20} {:<12} updated_at", "kind", "key", "group");
    for e in map.entries {
        println!(
            "{:<6} {:>20} {:<12} {}",
            e.kind,
            e.key,
            e.group,
            e.updated_at.to_rfc3339()
        );
    }
    if !map.slots.is_empty() {
        println!("moved slots:");
        for e in map.slots {
            println!(
                "{:<6} {:>20} {:<12} {}",
                e.kind,
                format!("slot {}", e.slot),
                e.group,
                e.updated_at.to_rfc3339()
            );
        }
    }
    for m in map.moves {
        println!(
            "open move {}: {} {} {} -> {} {}",
            m.move_id,
            m.kind,
            m.unit_label(),
            m.from,
            m.to,
            m.phase.as_str()
        );
    }
    Ok(())
}

/// Start a move and follow it to rest, or with `dry_run` print its plan only.
async fn start_move(
    mover: &Arc<Mover>,
    kind: KeyKind,
    unit: Unit,
    to: &str,
    dry_run: bool,
    complete: bool,
) -> CliResult {
    if dry_run {
        let plan = mover.plan(kind, unit, to).await?;
        println!("{}", serde_json::to_string_pretty(&plan)?);
        eprintln!("dry run: nothing was changed");
        return Ok(());
    }
    let m = mover.start(kind, unit, to, complete).await?;
    follow_move(mover, m.move_id).await
}

/// Plan the slot moves that even out a kind, and run at most `max_moves` of them one at a time,
/// each completed before the next; the first that does not complete stops the run.
async fn rebalance(
    mover: &Arc<Mover>,
    kind: KeyKind,
    dry_run: bool,
    max_moves: Option<usize>,
) -> CliResult {
    let plan = mover.rebalance_plan(kind).await?;
    let n = plan.len().min(max_moves.unwrap_or(usize::MAX));
    let now = if n < plan.len() {
        format!(", running {n} now")
    } else {
        String::new()
    };
    eprintln!(
        "rebalance {}: {} slot move(s) planned{now}",
        kind.as_str(),
        plan.len()
    );
    for (i, (slot, from, to)) in plan.into_iter().take(n).enumerate() {
        println!("slot {slot}: {from} -> {to}");
        if dry_run {
            continue;
        }
        let started = Instant::now();
        let m = mover.start(kind, Unit::Slot(slot), &to, true).await?;
        let done = wait_for_move(mover, m.move_id).await?;
        eprintln!(
            "  [{}/{n}] move {}: {} in {:.1} s, {} rows, write pause {} ms",
            i + 1,
            done.move_id,
            done.phase.as_str(),
            started.elapsed().as_secs_f64(),
            done.rows_copied,
            done.write_pause_ms.unwrap_or_default()
        );
        if done.phase != Phase::Completed {
            return Err(format!(
                "move {} ended {}: {}",
                done.move_id,
                done.phase.as_str(),
                done.error.unwrap_or_default()
            )
            .into());
        }
    }
    Ok(())
}

/// One move as JSON, or the last hundred as a table (newest first).
async fn show_moves(mover: &Arc<Mover>, move_id: Option<u64>) -> CliResult {
    if let Some(id) = move_id {
        println!(
            "{}",
            serde_json::to_string_pretty(&mover.get(id).await?.shown())?
        );
        return Ok(());
    }
    println!(
        "{:>6} {:<6} {:>20} {:<6} {:<6} {:<12} {:>10} {:>9}",
        "move", "kind", "key/slot", "from", "to", "phase", "rows", "pause_ms"
    );
    for m in mover.list(100).await?.into_iter().map(Move::shown) {
        println!(
            "{:>6} {:<6} {:>20} {:<6} {:<6} {:<12} {:>10} {:>9}",
            m.move_id,
            m.kind,
            m.unit_label(),
            m.from,
            m.to,
            m.phase.as_str(),
            m.rows_copied,
            m.write_pause_ms.map(|p| p.to_string()).unwrap_or_default()
        );
    }
    Ok(())
}

/// Wait until a move rests, quietly.
async fn wait_for_move(mover: &Arc<Mover>, id: u64) -> Result<Move, Failure> {
    loop {
        let m = mover.get(id).await?;
        if m.at_rest() {
            return Ok(m);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Print a move's progress until it rests; an error when it failed.
async fn follow_move(mover: &Arc<Mover>, id: u64) -> CliResult {
    let mut shown = None;
    loop {
        let m = mover.get(id).await?;
        let now = (m.phase, m.rows_copied);
        if shown != Some(now) {
            eprintln!(
                "move {id}: {} ({} rows copied)",
                m.phase.as_str(),
                m.rows_copied
            );
            shown = Some(now);
        }
        if m.at_rest() {
            println!("{}", serde_json::to_string_pretty(&m)?);
            if m.phase == Phase::Failed {
                return Err(format!("move {id} failed: {}", m.error.unwrap_or_default()).into());
            }
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
