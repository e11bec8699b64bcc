//! `seckill sale`: operators' changes to a running sale from the command line, the same
//! operations as the admin API's (`sale::changes`), audited alike: each is recorded with a
//! request id `cli-<uuid>` that names where it came from.

use super::CliResult;
use crate::config::Config;
use crate::domain::{ItemId, SaleId};
use crate::sale::changes::{SaleChange, SaleState};
use chrono::{DateTime, Utc};
use clap::Subcommand;
use std::path::Path;

#[derive(Debug, Subcommand)]
pub enum SaleAction {
    /// Sales with their state, newest start first.
    List {
        /// Only sales in this state: scheduled, live, paused or ended.
        #[arg(long)]
        state: Option<String>,
        /// At most this many (1 to 1000).
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Pause a sale: buys get 409 `paused` on every node until it resumes.
    Pause { sale_id: u64 },
    /// Resume a paused sale.
    Resume { sale_id: u64 },
    /// Move a sale's end: now (the default) ends it at once; a later time extends it.
    End {
        sale_id: u64,
        /// The new end (RFC 3339), after the sale's start.
        #[arg(long)]
        at: Option<DateTime<Utc>>,
    },
    /// Add units to an item's stock (and remaining), live.
    Restock {
        sale_id: u64,
        item_id: u64,
        /// Units to add: 1 to 1000000000.
        add: i64,
    },
}

pub async fn run(path: &Path, action: SaleAction) -> CliResult {
    let mut config = Config::load(path)?;
    config.server.migrate_on_start = false;
    config.server.start_wait_ms = 0;
    let tasks = tokio_util::task::TaskTracker::new();
    let state = crate::state::AppState::connect(config, &tasks).await?;
    let sales = state.sales();
    let request_id = format!("cli-{}", uuid::Uuid::new_v4());
    let id = |v: u64| -> Result<SaleId, String> {
        SaleId::parse(v.into()).map_err(|e| format!("sale_id: {e}"))
    };
    let shown = match action {
        SaleAction::List { state, limit } => {
            let state = match state.as_deref() {
                None => None,
                Some(s) => Some(SaleState::parse(s).ok_or_else(|| {
                    format!("--state must be scheduled, live, paused or ended, got {s:?}")
                })?),
            };
            if !(1..=1000).contains(&limit) {
                return Err("--limit must be between 1 and 1000".into());
            }
            serde_json::to_string_pretty(&sales.list(state, limit).await?)?
        }
        SaleAction::Pause { sale_id } | SaleAction::Resume { sale_id } => {
            let paused = matches!(action, SaleAction::Pause { .. });
            let change = SaleChange {
                ends_at: None,
                paused: Some(paused),
            };
            let view = sales
                .change(id(sale_id)?, &change, Some(&request_id))
                .await?;
            serde_json::to_string_pretty(&view)?
        }
        SaleAction::End { sale_id, at } => {
            let change = SaleChange {
                ends_at: Some(at.unwrap_or_else(Utc::now)),
                paused: None,
            };
            let view = sales
                .change(id(sale_id)?, &change, Some(&request_id))
                .await?;
            serde_json::to_string_pretty(&view)?
        }
        SaleAction::Restock {
            sale_id,
            item_id,
            add,
        } => {
            let item = ItemId::parse(item_id.into()).map_err(|e| format!("item_id: {e}"))?;
            let done = sales
                .restock(id(sale_id)?, item, add, Some(&request_id))
                .await?;
            serde_json::to_string_pretty(&done)?
        }
    };
    println!("{shown}");
    Ok(())
}
