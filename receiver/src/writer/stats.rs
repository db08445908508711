//! The writer's counters: `stats.json` (rewritten every stats interval and before every
//! control answer) and the periodic log line.

use std::sync::atomic::Ordering::Relaxed;

use ipevent_core::stats::ReceiverStats;
use ipevent_core::Reject;

use super::Writer;
use crate::run_state::unix_now;

impl Writer {
    /// Counts `events` refused by a store limit under `reason`.
    pub(super) fn count_refused(&mut self, reason: &str, events: u64) {
        self.stats.events_refused += events;
        *self.stats.refused.entry(reason.to_string()).or_default() += events;
    }

    fn snapshot(&mut self) -> ReceiverStats {
        let store = self.store.store_counters();
        let c = &self.counters;
        let s = &mut self.stats;
        s.store_appended_bytes = store.appended_bytes;
        s.store_rewritten_bytes = store.rewritten_bytes;
        s.compactions = store.rewrites;
        s.updated_unix = unix_now();
        s.datagrams_received = c.datagrams_received.load(Relaxed);
        s.kernel_drops = c.kernel_drops.load(Relaxed);
        s.control_conns_full = c.control_conns_full.load(Relaxed);
        s.batch_pool_waits = c.batch_pool_waits.load(Relaxed);
        s.apps_expired = c.apps_expired.load(Relaxed);
        s.tracked_logs_forgotten = self.store.tracked_logs_forgotten();
        s.rejected = Reject::ALL
            .iter()
            .map(|r| (r.name().to_string(), c.rejected[r.index()].load(Relaxed)))
            .collect();
        s.rejected_total = s.rejected.values().sum();
        s.events_pending = self.pending.events();
        s.epoch = self.epoch;
        s.journal_used_bytes = self.journal.used_bytes();
        s.journal_capacity_bytes = self.journal.capacity_bytes();
        if let Some(counters) = &self.ship_counters {
            counters.fill(s);
        }
        s.clone()
    }

    pub(super) fn write_stats(&mut self) {
        let stats = self.snapshot();
        if let Err(e) = stats.write(&self.settings.data) {
            self.complain(&format!("writing stats: {e}"));
        }
    }

    pub(super) fn log_counters(&mut self, last: &mut ReceiverStats) {
        let now = self.snapshot();
        log::info!(
            "received {} accepted {} rejected {} kernel_drops {} flushed {} pending {} flushes {} (last {:.1} ms)",
            now.datagrams_received.saturating_sub(last.datagrams_received),
            now.events_accepted.saturating_sub(last.events_accepted),
            now.rejected_total.saturating_sub(last.rejected_total),
            now.kernel_drops.saturating_sub(last.kernel_drops),
            now.events_flushed.saturating_sub(last.events_flushed),
            now.events_pending,
            now.flushes.saturating_sub(last.flushes),
            now.flush_last_ms,
        );
        *last = now;
    }
}
