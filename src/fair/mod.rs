//! A fair start: the first `fair_window_ms` of a sale as a seeded draw that anyone can verify
//! (DESIGN.md "Fair start").
//!
//! - **Commit and reveal.** At a sale's creation the engine draws a secret 32-byte seed from the
//!   operating system ([`rank::fresh_seed`]); the sale shows SHA-256 of it from then on, and the
//!   seed itself once every item of the sale is drawn. The seed is copied into each item's row: the
//!   draw runs on the item's group.
//! - **Entries.** A buy request an engine node receives at a server time in
//!   `[starts_at, starts_at + fair_window_ms)` is an entry, stored on the item's group, one per
//!   user and item (a repeat gets the first one's outcome). It is answered after the draw with
//!   the ordinary outcome: 201 with the order, 409 `sold_out` or `limit_exceeded`. While it waits
//!   it holds no thread and no database connection: a waiter in [`Waiters`], whose outcomes one
//!   query per item and node fetches every [`POLL`].
//! - **One draw per item, whatever the number of nodes.** Once the window is over, some node
//!   claims the item's draw in its row (a lease, renewed as it goes; another node takes over one
//!   that lapsed), serves the entries in ascending order of their rank key ([`rank`]) from the
//!   stock, in transactions of up to [`CHUNK`] entries under the item's row lock, writing each
//!   winner's reservation with the outcome; then makes the winners' orders on their groups, and
//!   marks the item drawn. Every step is recorded, so a draw a crash interrupts is finished by the
//!   next claimant with the same result: the order of service follows from the seed alone.
//! - **After the window** what is left sells first come, first served, once the draw is done:
//!   until then purchases wait for it (transaction 1 refuses to sell an undrawn item whatever a
//!   node believes).
//!
//! The entry path sits above the order service: an entry never enters its admission or its
//! batches, so thousands of waiting requests cost memory only.

pub mod rank;
mod run;
pub mod stats;
pub mod store;
pub mod verify;

pub(crate) use run::{FairStart, POLL};

/// Entries decided per transaction of a draw.
pub(crate) const CHUNK: usize = 256;
