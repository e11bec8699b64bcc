//! What a move is: its phases, its record (a row of the `moves` table), its plan, its unit (a
//! key or a hash slot) and its errors. No I/O here: the statements are in [`super::ledger`].

use crate::db::DbError;
use crate::router::KeyKind;
use crate::shard::GroupError;
use chrono::{DateTime, Utc};
use serde::Serialize;

/// Where a move is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Copying,
    CatchingUp,
    Fenced,
    /// Shown, never stored: routed to the destination, whose copy is not live yet (its writes
    /// are still paused; `write_pause_ms` is set when it goes live and the phase shows
    /// `switched`).
    Switching,
    Switched,
    Completed,
    Failed,
    Cancelled,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Copying => "copying",
            Phase::CatchingUp => "catching_up",
            Phase::Fenced => "fenced",
            Phase::Switching => "switching",
            Phase::Switched => "switched",
            Phase::Completed => "completed",
            Phase::Failed => "failed",
            Phase::Cancelled => "cancelled",
        }
    }

    /// The column's text (its CHECK constraint allows nothing else).
    pub(super) fn from_db(text: &str) -> Self {
        match text {
            "copying" => Phase::Copying,
            "catching_up" => Phase::CatchingUp,
            "fenced" => Phase::Fenced,
            "switched" => Phase::Switched,
            "completed" => Phase::Completed,
            "failed" => Phase::Failed,
            _ => Phase::Cancelled,
        }
    }

    /// Before the switch: the move can still be cancelled (rolled back).
    pub(crate) fn before_switch(self) -> bool {
        matches!(self, Phase::Copying | Phase::CatchingUp | Phase::Fenced)
    }
}

/// One move, as `GET /v1/admin/moves/{id}` shows it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Move {
    pub move_id: u64,
    #[schema(example = "items")]
    pub kind: String,
    /// The key moved, or
    pub key: Option<u64>,
    /// the hash slot moved (all its keys).
    pub slot: Option<u32>,
    #[schema(example = "g0")]
    pub from: String,
    #[schema(example = "g1")]
    pub to: String,
    pub phase: Phase,
    /// Rows written to the destination so far (re-copies of changed rows included).
    pub rows_copied: i64,
    /// How long the unit's writes were fenced (from the source's fence to the destination's copy
    /// going live); set at the switch.
    pub write_pause_ms: Option<i64>,
    /// Why it failed, or the last error of a step that is being retried.
    pub error: Option<String>,
    pub cancel_requested: bool,
    pub complete_requested: bool,
    /// The destination's copy is live (the move switched and unfenced it).
    pub dest_live: bool,
    /// A failed or cancelled move whose clean-up (unfence the source, drop the copy) is not done.
    pub cleanup_pending: bool,
    /// The move this one reverses, and the move that reversed this one.
    pub reverse_of: Option<u64>,
    pub reversed_by: Option<u64>,
    pub(crate) created_at: DateTime<Utc>,
    pub(crate) updated_at: DateTime<Utc>,
    pub(crate) fenced_at: Option<DateTime<Utc>>,
    pub(crate) switched_at: Option<DateTime<Utc>>,
    pub(crate) finished_at: Option<DateTime<Utc>>,
}

impl Move {
    /// What it moves.
    pub fn unit(&self) -> Unit {
        match (self.key, self.slot) {
            (Some(k), _) => Unit::Key(k),
            (None, s) => Unit::Slot(s.unwrap_or_default()),
        }
    }

    /// The key, or `slot N`, for listings.
    pub(crate) fn unit_label(&self) -> String {
        match self.unit() {
            Unit::Key(k) => k.to_string(),
            Unit::Slot(s) => format!("slot {s}"),
        }
    }

    pub(super) fn key_kind(&self) -> Result<KeyKind, MoveError> {
        KeyKind::parse(&self.kind).ok_or_else(|| MoveError::Unsupported(self.kind.clone()))
    }

    /// The move as operators see it: `switching` until the destination's copy is live, so
    /// `switched` always means writes flow again and `write_pause_ms` is known.
    pub fn shown(mut self) -> Self {
        if self.phase == Phase::Switched && !self.dest_live {
            self.phase = Phase::Switching;
        }
        self
    }

    /// Nothing left to do until someone asks for more (complete, reverse).
    pub(crate) fn at_rest(&self) -> bool {
        match self.phase {
            Phase::Switched => self.dest_live && !self.complete_requested,
            Phase::Completed | Phase::Failed | Phase::Cancelled => !self.cleanup_pending,
            _ => false,
        }
    }
}

/// What a move would do, and the checks it passed (`dry_run`).
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Plan {
    #[schema(example = "items")]
    pub kind: String,
    pub key: Option<u64>,
    pub slot: Option<u32>,
    pub from: String,
    pub to: String,
    /// Keys the move carries (for a slot: those with rows on the source now).
    pub keys: usize,
    /// Rows the first pass copies.
    pub rows_to_copy: i64,
    pub(crate) source: Holdings,
    pub(crate) destination: Holdings,
    /// The pre-checks, all passed.
    pub checks: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum MoveError {
    #[error("unknown group {0:?}")]
    UnknownGroup(String),
    #[error("{what} already lives on group {group}")]
    SameGroup { what: String, group: String },
    #[error("cannot move {0}")]
    Unsupported(String),
    #[error("move {0} not found")]
    NotFound(u64),
    /// Another open move of the key, or an action the move's phase does not allow.
    #[error("{0}")]
    Conflict(String),
    /// A pre-check failed: nothing was copied.
    #[error("pre-check failed: {0}")]
    Precheck(String),
    #[error("{what} has live rows on the destination group {group}")]
    HasData { what: String, group: String },
    /// Work on a group failed.
    #[error(transparent)]
    Group(#[from] GroupError),
}

impl From<DbError> for MoveError {
    fn from(e: DbError) -> Self {
        MoveError::Group(e.into())
    }
}

impl From<crate::shard::ShardError> for MoveError {
    fn from(e: crate::shard::ShardError) -> Self {
        MoveError::Group(e.into())
    }
}

/// The unit a move carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    Key(u64),
    Slot(u32),
}

impl Unit {
    pub(super) fn describe(self, kind: KeyKind) -> String {
        match self {
            Unit::Key(k) => format!("{} {k}", kind.as_str()),
            Unit::Slot(s) => format!("{} slot {s}", kind.as_str()),
        }
    }
}

/// What a group holds of a move's keys.
#[derive(Debug, Clone, Copy, Default, Serialize, utoipa::ToSchema)]
pub(crate) struct Holdings {
    /// Rows (items: sale items, reservations, sales; users: orders, payments).
    pub rows: i64,
    /// Keys with rows here.
    pub keys: i64,
    /// Of which live (not fenced: neither a copy being filled nor one left behind).
    pub live: i64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;

    #[test]
    fn a_move_shows_switched_only_once_writes_flow_again() {
        let now = Utc::now();
        let routed = Move {
            move_id: 1,
            kind: "items".into(),
            key: Some(7),
            slot: None,
            from: "g0".into(),
            to: "g1".into(),
            phase: Phase::Switched,
            rows_copied: 3,
            write_pause_ms: None,
            error: None,
            cancel_requested: false,
            complete_requested: false,
            dest_live: false,
            cleanup_pending: false,
            reverse_of: None,
            reversed_by: None,
            created_at: now,
            updated_at: now,
            fenced_at: Some(now),
            switched_at: Some(now),
            finished_at: None,
        };
        assert_eq!(routed.clone().shown().phase, Phase::Switching);
        let live = Move {
            dest_live: true,
            write_pause_ms: Some(12),
            ..routed
        };
        assert_eq!(live.shown().phase, Phase::Switched);
    }
}
