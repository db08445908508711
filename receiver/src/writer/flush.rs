//! A flush, in named steps: announce it to the store and record its epoch ahead in the
//! journal, write one run per dirty app, keep what failed for the next flush, and count it.

use std::time::Instant;

use ipevent_core::aggregate::Drained;
use ipevent_core::store::{self, Runs, StoreError};
use ipevent_core::{AddrStats, AppSha};

use super::Writer;

/// Most apps handed to the store at once: enough for the store to create new apps' logs on
/// several threads, few enough to keep the copy small.
const CHUNK_APPS: usize = 4096;

/// Most records handed to the store at once.
const CHUNK_RECORDS: usize = 1 << 16;

/// What writing a flush's apps came to.
#[derive(Default)]
struct Written {
    /// Events now in the store (refused ones not counted).
    events: u64,
    /// Apps that could not be written, with their records: pending again.
    failed: Vec<(AppSha, Vec<(u32, AddrStats)>)>,
    /// The first error among them.
    first_error: Option<StoreError>,
}

impl Writer {
    /// Appends one block per dirty app. Apps that fail stay pending for the next flush.
    /// Returns how many apps failed.
    pub(super) fn flush(&mut self) -> usize {
        if !self.holds.is_empty() {
            return 0;
        }
        if self.pending.is_empty() {
            // Everything journaled is in the store (or was discarded by a reset), and in the
            // outbox unless an outbox write failed: then the journal keeps it.
            if let Some(outbox) = &mut self.outbox {
                outbox.retry_carried(self.epoch);
            }
            self.rewind_journal();
            return 0;
        }
        let started = Instant::now();
        let Some(epoch) = self.begin_flush() else {
            return self.pending.apps();
        };
        let drained = self.pending.take();
        let app_count = drained.apps();
        let written = self.write_apps(epoch, drained);
        self.end_flush(epoch);
        let failed_apps = written.failed.len();
        self.keep_failed(written.failed);
        self.count_flush(started, written.events);
        if let Some(e) = written.first_error {
            self.stats.flush_errors += 1;
            self.complain(&format!(
                "flush {epoch}: {failed_apps} of {app_count} apps not written, kept for the next flush: {e}"
            ));
        }
        if let Err(e) = self.write_state(false) {
            self.complain(&format!("{e}"));
        }
        failed_apps
    }

    /// Starts a flush: the store learns which apps it is about to write (its app index) before
    /// any log changes, and the journal records its epoch before any block of it is in the
    /// store (write-ahead). `None` when either fails: nothing is written, everything stays
    /// pending.
    fn begin_flush(&mut self) -> Option<u64> {
        if let Err(e) = self.store.begin_flush(self.pending.app_list()) {
            self.stats.flush_errors += 1;
            self.complain(&format!(
                "flush: {e}; everything is kept for the next flush"
            ));
            return None;
        }
        let epoch = self.epoch + 1;
        if let Err(e) = self.journal.begin_epoch(epoch, self.settings.fsync) {
            self.stats.flush_errors += 1;
            self.complain(&format!("flush {epoch} not started: {e}"));
            return None;
        }
        self.epoch = epoch;
        if let Some(outbox) = &mut self.outbox {
            outbox.begin(epoch);
        }
        Some(epoch)
    }

    /// Writes every app of `drained` to the store as flush `epoch`, in chunks of at most
    /// [`CHUNK_APPS`] apps and [`CHUNK_RECORDS`] records (one app per chunk when a test asks
    /// for a crash after a number of apps).
    fn write_apps(&mut self, epoch: u64, drained: Drained) -> Written {
        let mut written = Written::default();
        let mut apps_done = 0;
        let mut sorted = std::mem::take(&mut self.sorted);
        let mut chunk = std::mem::take(&mut self.chunk);
        let chunk_apps = if self.settings.crash_after_apps.is_some() {
            1
        } else {
            CHUNK_APPS
        };
        drained.for_each_app(&mut sorted, |app, addrs| {
            if self.settings.crash_after_apps == Some(apps_done) {
                log::error!(
                    "crashing in the middle of flush {epoch} as asked (--test-crash-after-apps)"
                );
                std::process::abort();
            }
            apps_done += 1;
            chunk.push(app, addrs);
            if chunk.len() >= chunk_apps || chunk.records() >= CHUNK_RECORDS {
                self.write_chunk(epoch, &chunk, &mut written);
                chunk.clear();
            }
        });
        if !chunk.is_empty() {
            self.write_chunk(epoch, &chunk, &mut written);
            chunk.clear();
        }
        self.sorted = sorted;
        self.chunk = chunk;
        written
    }

    /// Writes one chunk of apps' records: queued for shipping too when written, their events
    /// counted as refused when a store limit refuses the app or some of its addresses, kept
    /// in `written.failed` on any other error.
    fn write_chunk(&mut self, epoch: u64, chunk: &Runs, written: &mut Written) {
        let results = self.store.append_runs(epoch, chunk);
        for ((app, addrs), result) in chunk.iter().zip(results) {
            let events: u64 = addrs.iter().map(|(_, s)| s.count).sum();
            match result {
                Ok(appended) => {
                    if let Some(outbox) = &mut self.outbox {
                        // The bucket gets what the local log got: the address limit's
                        // refusals are not shipped either.
                        let shipped = if appended.refused > 0 {
                            &appended.admitted[..]
                        } else {
                            addrs
                        };
                        if !shipped.is_empty() {
                            outbox.add(app, shipped);
                        }
                    }
                    written.events += events - appended.refused;
                    if appended.refused > 0 {
                        self.count_refused(store::REFUSED_ADDRESS_LIMIT, appended.refused);
                    }
                }
                Err(e) if e.refused_reason().is_some() => {
                    self.count_refused(e.refused_reason().unwrap_or_default(), events);
                    self.complain(&format!(
                        "{e}; dropping its {events} events (counted as events_refused)"
                    ));
                }
                Err(e) => {
                    written.first_error.get_or_insert(e);
                    written.failed.push((*app, addrs.to_vec()));
                }
            }
        }
    }

    /// Ends flush `epoch`: its shipping entry is complete, and the store's app index learns
    /// the counts.
    fn end_flush(&mut self, epoch: u64) {
        if let Some(outbox) = &mut self.outbox {
            outbox.finish();
        }
        if let Err(e) = self.store.end_flush() {
            // The logs are written; only the index lags, and readers read the logs of the
            // apps it left unsettled until the next flush settles it.
            self.complain(&format!("flush {epoch}: {e}"));
        }
    }

    /// Puts the records of the apps that failed back in pending; rewinds the journal when
    /// nothing is pending any more ([`Writer::rewind_journal`]).
    fn keep_failed(&mut self, failed: Vec<(AppSha, Vec<(u32, AddrStats)>)>) {
        for (app, addrs) in failed {
            for (ip, stats) in addrs {
                self.pending.add_stats(&app, ip, &stats);
            }
        }
        if self.pending.is_empty() {
            self.rewind_journal();
        }
    }

    /// Rewinds the journal once nothing it holds is needed any more: everything is in the
    /// store, and in the outbox with `--store` (records an outbox write could not take stay
    /// journaled, so a crash cannot lose them from the bucket, and a full journal bounds them).
    fn rewind_journal(&mut self) {
        if self.outbox.as_ref().is_some_and(|o| o.has_carried()) {
            return;
        }
        self.journal.rewind();
    }

    /// Counts a flush that started at `started` and wrote `events` events.
    fn count_flush(&mut self, started: Instant, events: u64) {
        let elapsed_ms = started.elapsed().as_secs_f64() * 1e3;
        self.stats.flushes += 1;
        self.stats.events_flushed += events;
        self.stats.flush_last_ms = elapsed_ms;
        self.stats.flush_total_ms += elapsed_ms;
        self.stats.flush_max_ms = self.stats.flush_max_ms.max(elapsed_ms);
    }
}
