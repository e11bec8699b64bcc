//! Integration tests against real PostgreSQL shard groups (see helpers.rs).

mod helpers;

mod coalescing;
mod faults;
mod frontdoor;
mod group_batch;
mod lifecycle;
mod moves;
mod orders;
mod page;
mod routing;
mod sale_day;
mod shardmap;
mod trust;
mod validation;
