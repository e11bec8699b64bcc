//! seckill: a database-centric flash-sale order engine on sharded PostgreSQL.
//!
//! Data flows one way, down this table: no module imports one above it.
//!
//! | module | concept |
//! |---|---|
//! | [`cli`] | the `seckill` command's subcommands |
//! | [`app`] | startup: `Application::build`, background tasks, shutdown |
//! | [`api`] | HTTP: routes, validation, identity and admin checks, problem+json errors, the sale page |
//! | [`state`] | what handlers and background tasks share (`AppState`) and how it is made |
//! | [`reconcile`] | reservations vs orders by txn_id, repairs, conservation audit, expiry sweep |
//! | [`settlement`] | the payment provider's settlement file vs the recorded payments |
//! | [`frontdoor`] | against bots: order tokens, challenges, rate limits, the blocklist (cheapest check first) |
//! | [`sale`] | sales and their items across groups |
//! | [`shardmap`] | the shard map for DBAs: route introspection, safe re-routing |
//! | [`moves`] | live moves of item keys between groups: copy, catch up, fence, switch, reverse |
//! | [`fair`] | a fair start: the first seconds of a sale as a seeded draw anyone can verify |
//! | [`order`] | the order service: sold-out fast path and admission, coalescing per shard group, the two short transactions, compensation, idempotency, pay/cancel/expiry |
//! | [`router`] | item/user keys -> shard group (hash slots, ranges, the router-config table and its refresh from the config group), and the layout guard: no start with a routing layout that moves existing keys |
//! | [`migrate`] | refinery migrations on every group |
//! | [`local`] | local PostgreSQL groups for `seckill dev` and the tests; rejoining an old master |
//! | [`shard`] | shard groups: master + shadow pools, health monitor, failover, fencing; `GroupError`, the error of work on a group that every layer above wraps |
//! | [`auth`] | the trust boundary: user tokens (JWT) and signed payment callbacks |
//! | [`telemetry`] | logs (text or JSON) and Prometheus metrics |
//! | [`batcher`] | a generic per-key batching queue (no crate imports): the mechanism of coalescing |
//! | [`flight`] | a generic per-key cache whose misses fly once (no crate imports): a crowd's reads |
//! | [`db`] | what a database error means (surely not committed vs outcome unknown) |
//! | [`domain`] | validated newtypes: ids, quantity, request id, txn id |
//! | [`config`] | shards.toml, as plain data (imports nothing else of the crate) |

pub mod api;
pub mod app;
pub mod auth;
pub mod batcher;
pub mod cli;
pub mod config;
pub mod db;
pub mod domain;
pub mod fair;
pub mod flight;
pub mod frontdoor;
pub mod local;
pub mod migrate;
pub mod moves;
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
