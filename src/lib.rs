//! seckill: a database-centric flash-sale order engine on sharded PostgreSQL.
//!
//! Data flows top to bottom (DESIGN.md):
//!
//! | module | concept |
//! |---|---|
//! | [`api`] | HTTP: routes, validation, identity and admin checks, problem+json errors |
//! | [`auth`] | the trust boundary: user tokens (JWT) and signed payment callbacks |
//! | [`frontdoor`] | against bots: order tokens, challenges, rate limits, the blocklist (cheapest check first) |
//! | [`order`] | the order service: sold-out fast path and admission, coalescing, the two short transactions, compensation, idempotency, pay/cancel/expiry |
//! | [`sale`] | sales and their items across groups |
//! | [`reconcile`] | reservations vs orders by txn_id, repairs, conservation audit, expiry sweep |
//! | [`settlement`] | the payment provider's settlement file vs the recorded payments |
//! | [`router`] | item/user keys -> shard group (hash slots, ranges, router-config table) |
//! | [`shard`] | shard groups: master + shadow pools, health monitor, failover, fencing |
//! | [`migrate`] | refinery migrations on every group |
//! | [`batcher`] | a generic per-key batching queue (no crate imports): the mechanism of coalescing |
//! | [`db`] | what a database error means (surely not committed vs outcome unknown) |
//! | [`domain`] | validated newtypes: ids, quantity, request id, txn id |
//! | [`config`] | shards.toml |
//! | [`app`] | startup: `Application::build`, background tasks, shutdown |
//! | [`local`] | local PostgreSQL groups for `seckill dev` and the tests |
//! | [`telemetry`] | logs (text or JSON) and Prometheus metrics |
//! | [`cli`] | the `seckill` command's subcommands |

pub mod api;
pub mod app;
pub mod auth;
pub mod batcher;
pub mod cli;
pub mod config;
pub mod db;
pub mod domain;
pub mod frontdoor;
pub mod local;
pub mod migrate;
pub mod order;
pub mod reconcile;
pub mod router;
pub mod sale;
pub mod settlement;
pub mod shard;
pub mod shardmap;
pub mod state;
pub mod telemetry;

pub use app::Application;
pub use config::Config;
pub use state::AppState;
