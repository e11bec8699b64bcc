//! A per-key cache whose misses fly once: of the requests that find a key stale or absent at the
//! same moment, one reads and the others wait for its answer. It stands between a crowd and the
//! database wherever many ask the same question at once (a sale's view, a protected item's rules).
//!
//! Each caller says how old an answer it accepts ([`Flights::get`]'s `fresh`), so one entry serves
//! callers of different needs. A failed read is not kept: the next caller reads again. Memory is
//! bounded: at most once a second, once a tenth of `max` keys are held, the entries the caller
//! would not accept go (a flood of made-up keys leaves about a second's worth behind); past `max`
//! keys, all go. No crate imports.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::OnceCell;

struct Entry<V> {
    born: Instant,
    cell: OnceCell<V>,
}

pub(crate) struct Flights<K, V> {
    max: usize,
    map: Mutex<Map<K, V>>,
}

struct Map<K, V> {
    entries: HashMap<K, Arc<Entry<V>>>,
    swept: Instant,
}

/// How often the entries no caller would accept are dropped, at most.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

impl<K: Hash + Eq + Clone, V: Clone> Flights<K, V> {
    pub fn new(max: usize) -> Self {
        Self {
            max,
            map: Mutex::new(Map {
                entries: HashMap::new(),
                swept: Instant::now(),
            }),
        }
    }

    /// The value of `key`: a kept one that `fresh(value, age)` accepts, the one a read under way
    /// is about to give, or a new one from `read`.
    pub async fn get<E, F, Fut>(
        &self,
        key: K,
        fresh: impl Fn(&V, Duration) -> bool,
        read: F,
    ) -> Result<V, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<V, E>>,
    {
        let entry = self.entry(key, &fresh);
        entry.cell.get_or_try_init(read).await.cloned()
    }

    /// Forget `key`: the next caller reads it again.
    pub(crate) fn forget(&self, key: &K) {
        self.lock().entries.remove(key);
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.lock().entries.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Map<K, V>> {
        // The map holds no invariant a panicking holder could break.
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The entry to wait on: the kept one when its value is acceptable or still being read.
    fn entry(&self, key: K, fresh: &impl Fn(&V, Duration) -> bool) -> Arc<Entry<V>> {
        let usable = |e: &Entry<V>| e.cell.get().is_none_or(|v| fresh(v, e.born.elapsed()));
        let mut map = self.lock();
        if let Some(e) = map.entries.get(&key).filter(|e| usable(e)) {
            return e.clone();
        }
        let full = map.entries.len() >= self.max;
        if full || (map.entries.len() >= self.max / 10 && map.swept.elapsed() >= SWEEP_EVERY) {
            map.entries.retain(|_, e| usable(e));
            map.swept = Instant::now();
            if map.entries.len() >= self.max {
                map.entries.clear();
            }
        }
        let entries = &mut map.entries;
        let e = Arc::new(Entry {
            born: Instant::now(),
            cell: OnceCell::new(),
        });
        entries.insert(key, e.clone());
        e
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test]
    async fn a_crowd_shares_one_read_until_the_answer_is_too_old_for_a_caller() {
        let flights: Flights<u8, usize> = Flights::new(10);
        let reads = AtomicUsize::new(0);
        let read = || async {
            tokio::time::sleep(Duration::from_millis(20)).await;
            Ok::<_, ()>(reads.fetch_add(1, Ordering::SeqCst))
        };
        let any_age = |_: &usize, _: Duration| true;
        let got = futures::future::join_all((0..50).map(|_| flights.get(1, any_age, read))).await;
        assert!(got.iter().all(|g| *g == Ok(0)), "{got:?}");
        assert_eq!(
            reads.load(Ordering::SeqCst),
            1,
            "one read for fifty callers"
        );
        assert_eq!(flights.get(1, any_age, read).await, Ok(0), "kept");
        let only_new = |_: &usize, age: Duration| age.is_zero();
        assert_eq!(
            flights.get(1, only_new, read).await,
            Ok(1),
            "too old: read again"
        );
        flights.forget(&1);
        assert_eq!(
            flights.get(1, any_age, read).await,
            Ok(2),
            "forgotten: read again"
        );
    }

    #[tokio::test]
    async fn failures_are_not_kept_and_memory_is_bounded() {
        let flights: Flights<u32, u32> = Flights::new(100);
        let fresh = |_: &u32, age: Duration| age < Duration::from_secs(60);
        assert_eq!(
            flights.get(7, fresh, || async { Err("down") }).await,
            Err("down")
        );
        assert_eq!(
            flights.get(7, fresh, || async { Ok::<_, ()>(7) }).await,
            Ok(7)
        );
        for k in 0..1000 {
            let _ = flights.get(k, fresh, || async { Ok::<_, ()>(k) }).await;
            assert!(flights.len() <= 100);
        }
    }
}
