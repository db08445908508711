//! Counters the ingest threads add to once per `recvmmsg` call and the writer reads.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use ipevent_core::Reject;

/// Shared ingest counters. Accepted events are counted by the writer as it aggregates them, so
/// that count and the stored data always agree, even across a reset. Ingest threads count locally and add here once per syscall, so the
/// hot path touches no shared cache line per datagram.
#[derive(Debug, Default)]
pub struct Counters {
    pub datagrams_received: AtomicU64,
    pub rejected: [AtomicU64; Reject::COUNT],
    pub kernel_drops: AtomicU64,
    /// Control connections that found every slot taken (`control::MAX_CONTROL_CONNS`).
    pub control_conns_full: AtomicU64,
    /// Times an ingest thread found every batch of the pool in use (the
    /// [`MAX_POOL_BATCHES`](crate::writer::MAX_POOL_BATCHES) cap) and waited for the writer.
    pub batch_pool_waits: AtomicU64,
    /// Apps the retention sweep removed (`--retain-days`).
    pub apps_expired: AtomicU64,
}

/// One thread's counts since it last added them to [`Counters`].
#[derive(Debug, Default, Clone, Copy)]
pub struct LocalCounts {
    pub datagrams_received: u64,
    pub rejected: [u64; Reject::COUNT],
    pub kernel_drops: u64,
}

impl LocalCounts {
    /// Adds these counts to `shared` and zeroes them.
    pub fn publish(&mut self, shared: &Counters) {
        if self.datagrams_received == 0 && self.kernel_drops == 0 {
            return;
        }
        shared
            .datagrams_received
            .fetch_add(self.datagrams_received, Relaxed);
        for (total, local) in shared.rejected.iter().zip(self.rejected) {
            if local > 0 {
                total.fetch_add(local, Relaxed);
            }
        }
        shared.kernel_drops.fetch_add(self.kernel_drops, Relaxed);
        *self = LocalCounts::default();
    }
}

impl Counters {
    /// Zeroes every counter (after a reset).
    pub fn zero(&self) {
        self.datagrams_received.store(0, Relaxed);
        for r in &self.rejected {
            r.store(0, Relaxed);
        }
        self.kernel_drops.store(0, Relaxed);
        self.control_conns_full.store(0, Relaxed);
        self.batch_pool_waits.store(0, Relaxed);
        self.apps_expired.store(0, Relaxed);
    }
}
