//! The per-node cache of `GET /v1/sales/{id}`: at the start of a popular sale every open sale
//! page polls it, and without a cache each poll is two or more reads on the groups' read share,
//! the same share buyers' order tokens need. Each sale is read from the database at most once per
//! `server.sale_view_cache_ms` ([`crate::flight`]: the requests that arrive meanwhile wait for the
//! one read), an unknown sale is remembered as unknown for as long, and the answer carries an
//! `ETag` so a poller that already has it gets 304 with no body.
//!
//! A failed read is never cached (the next request reads again). An operator's change to a sale
//! made on this node forgets its entry at once; other nodes see it within the period.

use super::{SaleError, SaleView};
use crate::domain::SaleId;
use crate::flight::Flights;
use bytes::Bytes;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

/// Most sales remembered (a flood of made-up ids starts the memory over).
const MAX_ENTRIES: usize = 10_000;

/// A sale's view as served: the JSON body and its entity tag; or the sale does not exist.
#[derive(Debug, Clone)]
pub(crate) enum Cached {
    Found { body: Bytes, etag: Arc<str> },
    Missing,
}

pub(crate) struct ViewCache {
    ttl: Duration,
    flights: Flights<u64, Cached>,
}

impl ViewCache {
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            flights: Flights::new(MAX_ENTRIES),
        }
    }

    /// The view of `sale`, read with `read` when no fresh entry holds it.
    pub async fn get<F, Fut>(&self, sale: SaleId, read: F) -> Result<Cached, SaleError>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<SaleView, SaleError>>,
    {
        if self.ttl.is_zero() {
            return settle(read().await);
        }
        let fresh = |_: &Cached, age: Duration| age < self.ttl;
        self.flights
            .get(sale.key(), fresh, || async { settle(read().await) })
            .await
    }

    /// Forget `sale`: the next request reads it again.
    pub(crate) fn forget(&self, sale: u64) {
        self.flights.forget(&sale);
    }
}

/// A read's outcome as cached: a view serialised once, "not found" remembered, anything else
/// passed on uncached.
fn settle(read: Result<SaleView, SaleError>) -> Result<Cached, SaleError> {
    match read {
        Ok(view) => {
            let body = serde_json::to_vec(&view)
                .map_err(|e| SaleError::Invalid(format!("cannot serialise the sale: {e}")))?;
            let mut h = std::collections::hash_map::DefaultHasher::new();
            body.hash(&mut h);
            Ok(Cached::Found {
                etag: format!("\"{:016x}\"", h.finish()).into(),
                body: Bytes::from(body),
            })
        }
        Err(SaleError::NotFound(_)) => Ok(Cached::Missing),
        Err(e) => Err(e),
    }
}
