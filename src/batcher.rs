//! A per-key batching queue: the mechanism behind request coalescing.
//!
//! Requests for one key queue up in arrival order. While a batch for that key is in flight, new
//! requests wait; when it finishes, everything that queued meanwhile (up to `max_batch`) goes out
//! as the next batch. So under light load a request runs alone at once (after one yield to the
//! scheduler, see `drain`), and under a storm each
//! round trip to PostgreSQL serves as many requests as arrived during the previous one.
//! One drain task per busy key; it ends when the key's queue is empty.

use futures::future::BoxFuture;
use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::oneshot;

type Runner<K, T, R> = Arc<dyn Fn(K, Vec<T>) -> BoxFuture<'static, Vec<R>> + Send + Sync>;

struct Lane<T, R> {
    queue: VecDeque<(T, oneshot::Sender<R>)>,
    draining: bool,
}

pub(crate) struct Batcher<K, T, R> {
    lanes: Mutex<HashMap<K, Lane<T, R>>>,
    max_batch: usize,
    max_wait: Duration,
    run: Runner<K, T, R>,
    tasks: tokio_util::task::TaskTracker,
}

/// The request was accepted but its batch never answered (the task died): outcome unknown.
#[derive(Debug, thiserror::Error)]
#[error("the batch serving this request was lost")]
pub(crate) struct Lost;

impl<K, T, R> Batcher<K, T, R>
where
    K: Hash + Eq + Clone + Send + 'static,
    T: Send + 'static,
    R: Send + 'static,
{
    pub fn new(
        max_batch: usize,
        max_wait: Duration,
        tasks: tokio_util::task::TaskTracker,
        run: impl Fn(K, Vec<T>) -> BoxFuture<'static, Vec<R>> + Send + Sync + 'static,
    ) -> Arc<Self> {
        Arc::new(Self {
            lanes: Mutex::new(HashMap::new()),
            max_batch: max_batch.max(1),
            max_wait,
            run: Arc::new(run),
            tasks,
        })
    }

    fn lanes(&self) -> std::sync::MutexGuard<'_, HashMap<K, Lane<T, R>>> {
        match self.lanes.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// How many requests wait for `key` (not counting a batch in flight).
    pub(crate) fn queued(&self, key: &K) -> usize {
        self.lanes().get(key).map_or(0, |l| l.queue.len())
    }

    /// Queue `item` under `key` and wait for its result.
    pub(crate) async fn submit(self: &Arc<Self>, key: K, item: T) -> Result<R, Lost> {
        let (tx, rx) = oneshot::channel();
        let start_drain = {
            let mut lanes = self.lanes();
            let lane = lanes.entry(key.clone()).or_insert_with(|| Lane {
                queue: VecDeque::new(),
                draining: false,
            });
            lane.queue.push_back((item, tx));
            !std::mem::replace(&mut lane.draining, true)
        };
        if start_drain {
            let this = self.clone();
            self.tasks.spawn(async move { this.drain(key).await });
        }
        rx.await.map_err(|_| Lost)
    }

    async fn drain(self: Arc<Self>, key: K) {
        // If the runner panics, this task unwinds: the guard removes the lane, so its waiting
        // requests get `Lost` (their senders drop) and the next request starts a fresh drain
        // instead of queueing forever behind a lane marked draining.
        struct LaneGuard<'a, K: Hash + Eq, T, R> {
            batcher: &'a Batcher<K, T, R>,
            key: Option<K>,
        }
        impl<K: Hash + Eq, T, R> Drop for LaneGuard<'_, K, T, R> {
            fn drop(&mut self) {
                if let Some(key) = self.key.take() {
                    if std::thread::panicking() {
                        let mut lanes = match self.batcher.lanes.lock() {
                            Ok(g) => g,
                            Err(p) => p.into_inner(),
                        };
                        lanes.remove(&key);
                    }
                }
            }
        }
        let _guard = LaneGuard {
            batcher: &self,
            key: Some(key.clone()),
        };
        if self.max_wait.is_zero() {
            // Let the requests already woken alongside the first one queue up before the first
            // batch leaves. They come in bursts: a coalesced transaction 1 answers all its buyers
            // at once, and each of them then asks for its order. The task that starts this drain
            // hands it the scheduler at once, so without the yield the first batch held one order
            // and the rest of the burst waited a whole round trip for the second.
            tokio::task::yield_now().await;
        } else {
            tokio::time::sleep(self.max_wait).await;
        }
        loop {
            let batch: Vec<(T, oneshot::Sender<R>)> = {
                let mut lanes = self.lanes();
                let Some(lane) = lanes.get_mut(&key) else {
                    return;
                };
                if lane.queue.is_empty() {
                    lanes.remove(&key);
                    return;
                }
                let n = lane.queue.len().min(self.max_batch);
                lane.queue.drain(..n).collect()
            };
            let (items, senders): (Vec<T>, Vec<_>) = batch.into_iter().unzip();
            let results = (self.run)(key.clone(), items).await;
            for (sender, result) in senders.into_iter().zip(results) {
                // The requester may have given up (client gone); its result is settled anyway.
                let _ = sender.send(result);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::FutureExt;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test(start_paused = true)]
    async fn requests_arriving_during_a_batch_form_the_next_one() {
        let batches = Arc::new(Mutex::new(Vec::<Vec<u32>>::new()));
        let seen = batches.clone();
        let b: Arc<Batcher<u8, u32, u32>> = Batcher::new(
            100,
            Duration::ZERO,
            tokio_util::task::TaskTracker::new(),
            move |_k, items: Vec<u32>| {
                let seen = seen.clone();
                async move {
                    seen.lock().unwrap().push(items.clone());
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    items.iter().map(|i| i * 2).collect()
                }
                .boxed()
            },
        );
        let first = tokio::spawn({
            let b = b.clone();
            async move { b.submit(1, 1).await.unwrap() }
        });
        tokio::task::yield_now().await;
        let rest: Vec<_> = (2..=5)
            .map(|i| {
                let b = b.clone();
                tokio::spawn(async move { b.submit(1, i).await.unwrap() })
            })
            .collect();
        assert_eq!(first.await.unwrap(), 2);
        for (i, h) in rest.into_iter().enumerate() {
            assert_eq!(h.await.unwrap(), (i as u32 + 2) * 2);
        }
        let batches = batches.lock().unwrap().clone();
        assert_eq!(batches, vec![vec![1], vec![2, 3, 4, 5]]);
    }

    #[tokio::test(start_paused = true)]
    async fn batches_never_exceed_max_batch() {
        let calls = Arc::new(AtomicUsize::new(0));
        let c = calls.clone();
        let b: Arc<Batcher<u8, u32, u32>> = Batcher::new(
            3,
            Duration::from_millis(1),
            tokio_util::task::TaskTracker::new(),
            move |_k, items: Vec<u32>| {
                assert!(items.len() <= 3);
                c.fetch_add(1, Ordering::SeqCst);
                async move { items }.boxed()
            },
        );
        let handles: Vec<_> = (0..10)
            .map(|i| {
                let b = b.clone();
                tokio::spawn(async move { b.submit(0, i).await.unwrap() })
            })
            .collect();
        for (i, h) in handles.into_iter().enumerate() {
            assert_eq!(h.await.unwrap(), i as u32);
        }
        assert_eq!(calls.load(Ordering::SeqCst), 4);
    }
}
