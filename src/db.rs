//! What a database error means for the caller, decided in one place.
//!
//! The order path needs to know more than "it failed": whether the statement *surely did not commit*
//! (the server refused it, or we never reached the server), in which case compensation is safe, or
//! whether the outcome is *unknown* (the connection died while a commit was in flight), in which case
//! nothing may be undone and the reconciler settles it later by txn_id.

use tokio_postgres::error::SqlState;

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// The server refused the statement; nothing it did was committed.
    #[error("database refused the statement ({code}): {message}")]
    Rejected { code: String, message: String },
    /// The member is read-only: the master moved (failover) or this one is fenced. Not committed.
    #[error("the member is read-only (the master moved)")]
    ReadOnly,
    /// A hot row's lock queue was longer than `lock_timeout` (or a serialization conflict): the
    /// statement was refused, nothing committed; the client should retry shortly.
    #[error("the item is too busy right now: {0}")]
    Busy(String),
    /// The key is fenced by a move to another shard group ([`crate::moves`]): refused, not
    /// committed; the caller re-reads the route and retries there.
    #[error("moving to another shard group: {0}")]
    Moving(String),
    /// The connection broke or the deadline passed mid-statement: the outcome is unknown.
    #[error("connection lost mid-statement; outcome unknown: {0}")]
    Lost(String),
}

impl DbError {
    /// True when the work surely did not commit.
    pub(crate) fn surely_not_committed(&self) -> bool {
        !matches!(self, DbError::Lost(_))
    }
}

impl From<tokio_postgres::Error> for DbError {
    fn from(e: tokio_postgres::Error) -> Self {
        match e.as_db_error() {
            Some(db) if *db.code() == SqlState::READ_ONLY_SQL_TRANSACTION => DbError::ReadOnly,
            Some(db)
                if [
                    SqlState::LOCK_NOT_AVAILABLE,
                    SqlState::T_R_SERIALIZATION_FAILURE,
                    SqlState::T_R_DEADLOCK_DETECTED,
                ]
                .contains(db.code()) =>
            {
                DbError::Busy(db.message().to_string())
            }
            // The server ends the session (shutdown, terminate): a commit waiting for the shadow
            // may already be committed locally, so the outcome is unknown.
            Some(db) if matches!(db.code().code(), "57P01" | "57P02" | "57P03") => {
                DbError::Lost(db.message().to_string())
            }
            Some(db) => DbError::Rejected {
                code: db.code().code().to_string(),
                message: db.message().to_string(),
            },
            None => DbError::Lost(e.to_string()),
        }
    }
}
