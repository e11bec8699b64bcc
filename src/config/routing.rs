//! One key kind's routing section resolved to plain data: the slot -> group map and the key
//! ranges, with groups as indexes into the configuration's group list. Validation and the router
//! both take it from here, so the rules are checked in one place.

use super::{invalid_field, parse_slot_range, ConfigError, KindRouting, Strategy};

/// A kind's routing, resolved and checked.
#[derive(Debug, Clone, PartialEq)]
pub struct KindRoutes {
    pub strategy: Strategy,
    /// slot -> group index; used by `hash` and as the fallback of `table`.
    pub slot_map: Vec<usize>,
    /// (start, exclusive end or None for "to the top", group index), sorted and contiguous.
    pub ranges: Vec<(u64, Option<u64>, usize)>,
}

/// Resolve and check one kind's routing section. `kind` names the section in errors.
pub fn resolve(
    kind: &str,
    routing: &KindRouting,
    slots: u32,
    groups: &[String],
) -> Result<KindRoutes, ConfigError> {
    let base = format!("routing.{kind}");
    Ok(KindRoutes {
        strategy: routing.strategy,
        slot_map: slot_map(&base, routing, slots, groups)?,
        ranges: ranges(&base, routing, groups)?,
    })
}

/// The group index of a group name, or an error naming `field`.
fn group_idx(groups: &[String], field: String, name: &str) -> Result<usize, ConfigError> {
    groups
        .iter()
        .position(|g| g == name)
        .ok_or_else(|| invalid_field(field, format!("unknown group {name:?}")))
}

/// slot -> group: every slot assigned exactly once (by default split evenly in file order).
fn slot_map(
    base: &str,
    routing: &KindRouting,
    slots: u32,
    groups: &[String],
) -> Result<Vec<usize>, ConfigError> {
    Ok(if routing.slot_map.is_empty() {
        // Default: slots split evenly over the groups in file order.
        (0..slots)
            .map(|s| (s as usize * groups.len()) / slots as usize)
            .collect()
    } else {
        let mut owner: Vec<Option<usize>> = vec![None; slots as usize];
        for (i, a) in routing.slot_map.iter().enumerate() {
            let field = format!("{base}.slot_map[{i}]");
            let (lo, hi) = parse_slot_range(&a.slots).ok_or_else(|| {
                invalid_field(
                    format!("{field}.slots"),
                    format!("{:?} is not \"N\" or \"LO-HI\"", a.slots),
                )
            })?;
            if hi >= slots {
                return Err(invalid_field(
                    format!("{field}.slots"),
                    format!("slot {hi} is beyond the slot count {slots}"),
                ));
            }
            let g = group_idx(groups, format!("{field}.group"), &a.group)?;
            for s in lo..=hi {
                if owner[s as usize].replace(g).is_some() {
                    return Err(invalid_field(
                        format!("{field}.slots"),
                        format!("slot {s} is assigned twice"),
                    ));
                }
            }
        }
        if let Some(missing) = owner.iter().position(Option::is_none) {
            return Err(invalid_field(
                format!("{base}.slot_map"),
                format!("slot {missing} is not assigned to any group"),
            ));
        }
        owner.into_iter().flatten().collect()
    })
}

/// The key ranges of strategy `range`: sorted, contiguous from 0, to the largest key.
fn ranges(
    base: &str,
    routing: &KindRouting,
    groups: &[String],
) -> Result<Vec<(u64, Option<u64>, usize)>, ConfigError> {
    let mut ranges = Vec::new();
    if routing.strategy == Strategy::Range {
        if routing.ranges.is_empty() {
            return Err(invalid_field(
                format!("{base}.ranges"),
                "strategy \"range\" needs at least one range",
            ));
        }
        let mut sorted: Vec<_> = routing.ranges.iter().enumerate().collect();
        sorted.sort_by_key(|(_, r)| r.start);
        let mut next: Option<u64> = Some(0);
        for (i, r) in sorted {
            let field = format!("{base}.ranges[{i}]");
            match next {
                None => {
                    return Err(invalid_field(
                        field,
                        "overlaps an earlier range that runs to the largest key",
                    ))
                }
                Some(n) if r.start != n => {
                    return Err(invalid_field(
                        field,
                        if r.start > n {
                            format!("keys {n}..{} are not covered by any range", r.start)
                        } else {
                            format!("start {} overlaps the previous range", r.start)
                        },
                    ))
                }
                _ => {}
            }
            if let Some(end) = r.end {
                if end <= r.start {
                    return Err(invalid_field(
                        format!("{field}.end"),
                        "must be greater than start",
                    ));
                }
            }
            let g = group_idx(groups, format!("{field}.group"), &r.group)?;
            ranges.push((r.start, r.end, g));
            next = r.end;
        }
        if let Some(n) = next {
            return Err(invalid_field(
                format!("{base}.ranges"),
                format!("keys from {n} up are not covered (omit `end` on the last range)"),
            ));
        }
    } else if !routing.ranges.is_empty() {
        return Err(invalid_field(
            format!("{base}.ranges"),
            "ranges are only used with strategy \"range\"",
        ));
    }
    Ok(ranges)
}
