//! After a run: is the outcome right? Through the API always, directly in the shards when DSNs are
//! given.

use crate::sale::{Acked, Setup};
use crate::{Args, Scenario};
use serde::Serialize;
use std::collections::HashMap;

#[derive(Debug, Clone, Serialize, Default)]
pub struct Verification {
    pub ok: bool,
    pub checks: Vec<(String, bool)>,
    pub stock: i64,
    pub sold: i64,
    pub acknowledged_units: i64,
    /// What was not checked, and why.
    pub notes: Vec<String>,
}

impl Verification {
    fn check(&mut self, name: impl Into<String>, ok: bool) {
        self.checks.push((name.into(), ok));
    }

    pub fn print(&self) {
        println!(
            "verification: stock {}, sold {}, acknowledged {}",
            self.stock, self.sold, self.acknowledged_units
        );
        for (name, ok) in &self.checks {
            println!("  [{}] {name}", if *ok { "ok" } else { "FAIL" });
        }
        for note in &self.notes {
            println!("  note: {note}");
        }
    }
}

// Long on purpose: the checks after a run, each an exact assertion with its own message.
pub async fn verify(
    args: &Args,
    url: &str,
    keys: &crate::Keys,
    http: &reqwest::Client,
    setup: &Setup,
    acked: &[Acked],
    reached_sellout: bool,
) -> Verification {
    let mut v = Verification::default();
    // The audit, not the public view: that one is served from a cache a few hundred ms old.
    let audit: serde_json::Value = match http
        .get(format!("{url}/v1/admin/sales/{}/audit", setup.sale_id))
        .bearer_auth(&keys.admin)
        .send()
        .await
    {
        Ok(r) => r.json().await.unwrap_or_default(),
        Err(e) => {
            v.check(format!("read the sale back (audit): {e}"), false);
            return v;
        }
    };
    let remaining: HashMap<u64, i64> = audit["items"]
        .as_array()
        .map(|items| {
            items
                .iter()
                .filter_map(|i| Some((i["item_id"].as_u64()?, i["remaining"].as_i64()?)))
                .collect()
        })
        .unwrap_or_default();
    let mut acked_by_item: HashMap<u64, i64> = HashMap::new();
    let mut per_user: HashMap<(u64, u64), i64> = HashMap::new();
    for a in acked {
        *acked_by_item.entry(a.item).or_default() += a.quantity;
        *per_user.entry((a.item, a.user)).or_default() += a.quantity;
    }
    let mut no_oversell = true;
    let mut acked_kept = true;
    for (item, stock) in &setup.items {
        let rem = remaining.get(item).copied().unwrap_or(-1);
        let sold = stock - rem;
        v.stock += stock;
        v.sold += sold;
        no_oversell &= (0..=*stock).contains(&rem);
        // Every acknowledged unit must still be sold (an order may exist whose 201 got lost on
        // the way, so sold may exceed acknowledged, never the reverse).
        acked_kept &= acked_by_item.get(item).copied().unwrap_or(0) <= sold;
    }
    v.acknowledged_units = acked_by_item.values().sum();
    v.check(
        "no oversell: 0 <= remaining <= stock for every item",
        no_oversell,
    );
    v.check(
        "every acknowledged unit is sold (acknowledged <= stock - remaining)",
        acked_kept,
    );
    if matches!(args.scenario, Scenario::Hot | Scenario::Soldout) && reached_sellout {
        let ran_out = remaining.get(&setup.items[0].0) == Some(&0);
        v.check("demand exceeded stock: sold == stock", ran_out);
    } else if args.scenario == Scenario::Hot {
        v.notes.push(
            "the run ended (duration) before the stock sold out; sold == stock not checked".into(),
        );
    }
    v.check(
        format!("nobody above the per-user limit of {}", args.limit),
        per_user.values().all(|&n| n <= args.limit),
    );
    v.check(
        "audit: stock = remaining + reserved + ordered + paid for every item",
        audit["conserved"] == true,
    );
    if args.verify_orders
        || args.kill_master.is_some()
        || args.freeze_master.is_some()
        || args.kill_shadow.is_some()
    {
        let missing = missing_orders(url, http, &keys.users, acked).await;
        v.check(
            format!(
                "every acknowledged order is present ({} checked, {missing} missing)",
                acked.len()
            ),
            missing == 0,
        );
    }
    for dsn in &args.dsn {
        match shard_checks(dsn, setup).await {
            Ok((over_limit, negative, broken)) => {
                v.check(
                    format!("shard {dsn}: no user over the limit ({over_limit} found)"),
                    over_limit == 0,
                );
                v.check(
                    format!("shard {dsn}: no negative remaining ({negative} found)"),
                    negative == 0,
                );
                v.check(
                    format!("shard {dsn}: conservation per item ({broken} broken)"),
                    broken == 0,
                );
            }
            Err(e) => v.check(format!("shard {dsn}: {e}"), false),
        }
    }
    v.ok = v.checks.iter().all(|(_, ok)| *ok);
    v
}

async fn missing_orders(
    url: &str,
    http: &reqwest::Client,
    minter: &crate::Minter,
    acked: &[Acked],
) -> usize {
    use futures::stream::{self, StreamExt};
    stream::iter(acked)
        .map(|a| async move {
            let r = http
                .get(format!("{url}/v1/users/{}/orders/{}", a.user, a.order_id))
                .bearer_auth(minter.token(a.user))
                .send()
                .await;
            !matches!(r, Ok(r) if r.status() == reqwest::StatusCode::OK)
        })
        .buffer_unordered(64)
        .filter(|missing| futures::future::ready(*missing))
        .count()
        .await
}

async fn shard_checks(dsn: &str, setup: &Setup) -> Result<(i64, i64, i64), String> {
    let mut config: tokio_postgres::Config = dsn.parse().map_err(|e| format!("{e}"))?;
    // The password from PGPASSWORD rather than the command line, where `ps` shows it.
    if config.get_password().is_none() {
        if let Ok(pw) = std::env::var("PGPASSWORD") {
            config.password(pw);
        }
    }
    let (client, conn) = config
        .connect(tokio_postgres::NoTls)
        .await
        .map_err(|e| e.to_string())?;
    let task = tokio::spawn(conn);
    let sale = setup.sale_id as i64;
    let q = |sql: &'static str| {
        let client = &client;
        async move {
            client
                .query_one(sql, &[&sale])
                .await
                .map(|r| r.get::<_, i64>(0))
                .map_err(|e| e.to_string())
        }
    };
    let over = q("SELECT count(*) FROM (SELECT user_id FROM reservations WHERE sale_id = $1 AND state <> 'released'
                  GROUP BY item_id, user_id HAVING sum(quantity) > (SELECT max(per_user_limit) FROM sale_items WHERE sale_id = $1)) x")
        .await?;
    let negative =
        q("SELECT count(*) FROM sale_items WHERE sale_id = $1 AND remaining < 0").await?;
    let broken = q("SELECT count(*) FROM sale_items si WHERE si.sale_id = $1 AND si.stock <> si.remaining +
                    coalesce((SELECT sum(quantity) FROM reservations r WHERE r.sale_id = si.sale_id AND r.item_id = si.item_id
                              AND r.state <> 'released'), 0)")
        .await?;
    task.abort();
    Ok((over, negative, broken))
}
