//! Checking a draw from what the engine publishes, as any buyer could: the sale's revealed seed
//! against its commitment, then every entry's rank key, its place in the order of service and its
//! outcome recomputed ([`super::rank`]). Used by `seckill verify-draw`, the bench and the tests.

use super::rank::{self, Entry, Seed};
use serde_json::Value;

/// Check one item's draw: `sale` is `GET /v1/sales/{id}`, `draw` is
/// `GET /v1/admin/sales/{id}/items/{item}/draw`. What was checked, or the first disagreement.
pub fn check(sale: &Value, draw: &Value) -> Result<Vec<String>, String> {
    let fair = &sale["fair_draw"];
    let seed_hex = fair["seed"]
        .as_str()
        .ok_or("the sale shows no seed yet: its draw is not done")?;
    let seed: Seed = hex::decode(seed_hex)
        .ok()
        .and_then(|b| Seed::try_from(b.as_slice()).ok())
        .ok_or("the seed is not 32 bytes of hex")?;
    let commitment = fair["commitment"].as_str().unwrap_or("");
    if hex::encode(rank::commitment(&seed)) != commitment {
        return Err(format!(
            "SHA-256 of the seed is {}, the sale committed to {commitment}",
            hex::encode(rank::commitment(&seed))
        ));
    }
    let mut lines = vec![format!("the seed matches the commitment {commitment}")];
    let sale_id = draw["sale_id"].as_u64().ok_or("the draw names no sale")?;
    let item_id = draw["item_id"].as_u64().ok_or("the draw names no item")?;
    let stock = draw["stock"].as_i64().ok_or("the draw shows no stock")?;
    let limit = draw["per_user_limit"].as_i64().ok_or("no per_user_limit")?;
    let listed = draw["entries"]
        .as_array()
        .ok_or("the draw lists no entries")?;
    let mut entries = Vec::new();
    for e in listed {
        let user = e["user_id"].as_u64().ok_or("an entry without a user")?;
        let key = hex::encode(rank::rank_key(&seed, sale_id, item_id, user));
        if e["rank_key"].as_str() != Some(key.as_str()) {
            return Err(format!(
                "user {user}'s rank key is {key}, the engine shows {}",
                e["rank_key"]
            ));
        }
        entries.push((
            Entry {
                user_id: user,
                quantity: e["quantity"]
                    .as_i64()
                    .ok_or("an entry without a quantity")?,
            },
            e["outcome"].as_str().unwrap_or("").to_string(),
        ));
    }
    lines.push(format!(
        "{} rank keys are HMAC-SHA256(seed, \"{sale_id}:{item_id}:<user_id>\")",
        entries.len()
    ));
    let shown: Vec<u64> = entries.iter().map(|(e, _)| e.user_id).collect();
    let mut order: Vec<Entry> = entries.iter().map(|(e, _)| *e).collect();
    rank::order(&seed, sale_id, item_id, &mut order);
    if order.iter().map(|e| e.user_id).collect::<Vec<_>>() != shown {
        return Err("the entries are not listed in the order of their rank keys".into());
    }
    let (outcomes, left) = rank::serve(&order, stock, limit);
    for ((e, shown), want) in entries.iter().zip(&outcomes) {
        if shown != want.as_str() {
            return Err(format!(
                "user {} should have {} (served in rank order from {stock} units), the engine says {shown}",
                e.user_id,
                want.as_str()
            ));
        }
    }
    let won = outcomes
        .iter()
        .filter(|o| **o == rank::Outcome::Won)
        .count();
    lines.push(format!(
        "served in that order from {stock} units (limit {limit}): {won} winners, {left} units left, every outcome as shown"
    ));
    Ok(lines)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn published(seed: &Seed, outcomes: &[&str]) -> (Value, Value) {
        let mut entries: Vec<Entry> = (1..=outcomes.len() as u64)
            .map(|u| Entry {
                user_id: u,
                quantity: 1,
            })
            .collect();
        rank::order(seed, 5, 6, &mut entries);
        let listed: Vec<Value> = entries
            .iter()
            .zip(outcomes)
            .enumerate()
            .map(|(i, (e, o))| {
                json!({"rank": i + 1, "user_id": e.user_id, "quantity": 1, "outcome": o,
                       "rank_key": hex::encode(rank::rank_key(seed, 5, 6, e.user_id))})
            })
            .collect();
        (
            json!({"fair_draw": {"window_ms": 1000, "seed": hex::encode(seed),
                                 "commitment": hex::encode(rank::commitment(seed))}}),
            json!({"sale_id": 5, "item_id": 6, "stock": 2, "per_user_limit": 1, "entries": listed}),
        )
    }

    #[test]
    fn an_honest_draw_checks_out() {
        let seed = [7u8; 32];
        let (sale, draw) = published(&seed, &["won", "won", "sold_out"]);
        let lines = check(&sale, &draw).expect("verifies");
        assert_eq!(lines.len(), 3);
    }

    #[test]
    fn a_rigged_draw_is_caught() {
        let seed = [7u8; 32];
        let (sale, draw) = published(&seed, &["won", "sold_out", "won"]);
        assert!(check(&sale, &draw).unwrap_err().contains("should have"));
        let (mut sale, draw) = published(&seed, &["won", "won", "sold_out"]);
        sale["fair_draw"]["seed"] = json!(hex::encode([8u8; 32]));
        assert!(check(&sale, &draw).unwrap_err().contains("committed"));
        let (sale, mut draw) = published(&seed, &["won", "won", "sold_out"]);
        let entries = draw["entries"].as_array_mut().unwrap();
        entries.swap(0, 1);
        assert!(
            check(&sale, &draw).is_err(),
            "an order that is not the seed's"
        );
    }
}
