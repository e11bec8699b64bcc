//! What can go wrong with a piece of work on a shard group, and whether it may have committed.
//!
//! [`ShardError`]: no connection could be had for the work (no writable master, the pool's share
//! used up, too many reads queued, no streaming shadow under `shadow_loss = "block"`, a bad DSN),
//! so nothing was sent. [`GroupError`], the error of [`super::ShardGroup::run`]: that, or what the
//! database said about the work ([`DbError`]). Both answer the one question every caller asks
//! of a failure: did the work surely not commit ([`GroupError::surely_not_committed`])? Each
//! layer above wraps `GroupError` in its own error with `#[from]`; the API maps it to HTTP once.

use crate::db::DbError;
use deadpool_postgres::PoolError;

#[derive(Debug, thiserror::Error)]
pub enum ShardError {
    #[error("shard group {group} has no writable master")]
    NoMaster { group: String },
    #[error("shard group {group}: cannot get a connection: {source}")]
    Pool { group: String, source: PoolError },
    #[error("shard group {group}: no connection free within the request's budget")]
    Exhausted { group: String },
    #[error("shard group {group}: too many reads queued")]
    Busy { group: String },
    #[error("shard group {group}: {reason}")]
    Dsn { group: String, reason: String },
    /// The writer has no synchronous shadow streaming and `shadow_loss = "block"`: refused before
    /// anything was sent.
    #[error(
        "shard group {group} has no streaming shadow; no write is acknowledged until one streams"
    )]
    NoShadow { group: String },
}

/// The error of one piece of work on a group (module docs).
#[derive(Debug, thiserror::Error)]
pub enum GroupError {
    /// No connection was had: nothing was sent, so nothing committed.
    #[error(transparent)]
    Shard(#[from] ShardError),
    /// What the database said about the work, or that it did not answer in time.
    #[error(transparent)]
    Db(#[from] DbError),
}

impl GroupError {
    /// True when the work surely did not commit: it never reached the server, or the server
    /// refused it. False when its outcome is unknown ([`DbError::Lost`]).
    pub(crate) fn surely_not_committed(&self) -> bool {
        match self {
            GroupError::Shard(_) => true,
            GroupError::Db(e) => e.surely_not_committed(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_lost_answer_may_have_committed() {
        let group = || "g0".to_string();
        let not_committed = [
            GroupError::from(ShardError::NoMaster { group: group() }),
            ShardError::Exhausted { group: group() }.into(),
            ShardError::Busy { group: group() }.into(),
            ShardError::NoShadow { group: group() }.into(),
            DbError::ReadOnly.into(),
            DbError::Busy("lock".into()).into(),
            DbError::Moving("item 1".into()).into(),
            DbError::Rejected {
                code: "23505".into(),
                message: "duplicate".into(),
            }
            .into(),
        ];
        for e in &not_committed {
            assert!(e.surely_not_committed(), "{e}");
        }
        assert!(!GroupError::from(DbError::Lost("reset".into())).surely_not_committed());
    }

    #[test]
    fn says_what_the_inner_error_says() {
        let e = GroupError::from(ShardError::NoMaster { group: "g1".into() });
        assert_eq!(e.to_string(), "shard group g1 has no writable master");
        let e = GroupError::from(DbError::ReadOnly);
        assert_eq!(e.to_string(), DbError::ReadOnly.to_string());
    }
}
