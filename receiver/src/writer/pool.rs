//! The pool of batches that travel between the ingest threads and the writer: allocated up
//! front, grown up to a cap when the writer falls behind, every wait at the cap counted.

use std::sync::atomic::AtomicUsize;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender};

use super::Record;
use crate::counters::Counters;

/// Records per batch handed from an ingest thread to the writer.
pub const BATCH_RECORDS: usize = 1024;

/// Batches allocated at start: enough for steady state, where the writer keeps up.
pub const POOL_BATCHES: usize = 64;

/// Most batches in circulation (4M events, 160 MiB). When the writer falls behind (a long
/// flush of many new apps), ingest allocates more batches up to this bound rather than stop
/// reading; beyond it ingest waits and the kernel buffer absorbs the burst, so every loss
/// shows up as a kernel drop.
pub const MAX_POOL_BATCHES: usize = 4096;

/// Where ingest threads get empty batches: the ones the writer returned, or new ones while
/// fewer than [`MAX_POOL_BATCHES`] exist.
#[derive(Clone)]
pub struct BatchPool {
    free: Receiver<Vec<Record>>,
    allocated: Arc<AtomicUsize>,
    counters: Arc<Counters>,
}

impl BatchPool {
    /// A pool with [`POOL_BATCHES`] batches, and the sender the writer returns them through.
    /// Every wait at the [`MAX_POOL_BATCHES`] cap is counted in `counters`.
    pub fn new(counters: Arc<Counters>) -> (BatchPool, Sender<Vec<Record>>) {
        let (tx, rx) = crossbeam_channel::bounded(MAX_POOL_BATCHES);
        for _ in 0..POOL_BATCHES {
            tx.send(Vec::with_capacity(BATCH_RECORDS))
                .expect("the pool channel has room");
        }
        let pool = BatchPool {
            free: rx,
            allocated: Arc::new(AtomicUsize::new(POOL_BATCHES)),
            counters,
        };
        (pool, tx)
    }

    /// An empty batch; waits only when [`MAX_POOL_BATCHES`] are all full and queued. `None`
    /// when the writer has gone.
    pub fn take(&self) -> Option<Vec<Record>> {
        if let Ok(batch) = self.free.try_recv() {
            return Some(batch);
        }
        let grown = self.allocated.fetch_update(Relaxed, Relaxed, |n| {
            (n < MAX_POOL_BATCHES).then_some(n + 1)
        });
        if grown.is_ok() {
            return Some(Vec::with_capacity(BATCH_RECORDS));
        }
        self.counters.batch_pool_waits.fetch_add(1, Relaxed);
        self.free.recv().ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_at_the_batch_pool_cap_are_counted() {
        let counters = Arc::new(Counters::default());
        let (pool, give_back) = BatchPool::new(counters.clone());
        let taken: Vec<Vec<Record>> = (0..MAX_POOL_BATCHES)
            .map(|_| pool.take().unwrap())
            .collect();
        assert_eq!(counters.batch_pool_waits.load(Relaxed), 0);
        let waiter = std::thread::spawn(move || pool.take().is_some());
        // The waiter counts its wait before it blocks; a batch coming back ends it.
        ipevent_testkit::wait_for("the take to wait at the cap", || {
            (counters.batch_pool_waits.load(Relaxed) == 1).then_some(())
        });
        give_back.send(Vec::new()).unwrap();
        assert!(waiter.join().unwrap());
        assert_eq!(counters.batch_pool_waits.load(Relaxed), 1);
        drop(taken);
    }
}
