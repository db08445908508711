//! The store writer: folds accepted records into a per-app, per-address map and appends one
//! checksummed block per dirty app to the store every flush interval, on request, and at exit.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use ipevent_core::aggregate::Pending;
pub use ipevent_core::aggregate::Record;
use ipevent_core::control::{Reply, ResetBegun, ResetEnded, Synced};
use ipevent_core::journal::Journal;
use ipevent_core::stats::ReceiverStats;
use ipevent_core::store::{self, AppendBlocks, StoreWriter};
use ipevent_core::{AddrStats, AppSha, DataDir, Reject};
use serde_json::json;

use crate::control::{self, Op, Request};
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
    allocated: Arc<std::sync::atomic::AtomicUsize>,
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
            allocated: Arc::new(std::sync::atomic::AtomicUsize::new(POOL_BATCHES)),
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

/// Failures (a full disk, a read-only data dir) are logged at most this often.
pub const COMPLAINT_INTERVAL: Duration = Duration::from_secs(10);

/// What ingest threads send to the writer, in order.
pub enum ToWriter {
    /// Accepted records (the empty vector goes back to the pool).
    Batch(Vec<Record>),
    /// An ingest thread drained its sockets for request `request`.
    Marker { request: u64 },
    /// A control request; it runs once `markers` ingest threads have sent their marker for it.
    Request(Request),
}

/// Fixed settings of the writer.
pub struct WriterSettings {
    pub data: DataDir,
    pub writer_id: String,
    pub flush_interval: Duration,
    pub stats_interval: Duration,
    pub log_interval: Option<Duration>,
    pub max_pending_entries: usize,
    pub fsync: bool,
    /// Test hook: abort the process after this many apps of a flush are written, to simulate
    /// a crash in the middle of a flush.
    pub crash_after_apps: Option<usize>,
    /// Limits on new app directories.
    pub limits: store::StoreLimits,
    /// The stats fields fixed at start (listen addresses, buffers, pid, ...).
    pub stats_base: ReceiverStats,
    /// The flush epoch `state.json` recorded: one lower bound of the start epoch.
    pub state_epoch: u64,
}

/// The writer thread's state.
pub struct Writer {
    settings: WriterSettings,
    /// Where flushes go: the file tree's writer, behind the store's interface.
    store: Box<dyn AppendBlocks + Send>,
    journal: Journal,
    /// A batch the journal could not take (full, and the store not writable): ingest waits
    /// until it is in.
    stalled: Option<Vec<Record>>,
    counters: Arc<Counters>,
    from_ingest: Receiver<ToWriter>,
    free: Sender<Vec<Record>>,
    pending: Pending,
    /// Requests waiting for markers: id -> (markers seen, request once it arrived). They
    /// run in id order.
    waiting: BTreeMap<u64, (usize, Option<Request>)>,
    epoch: u64,
    stats: ReceiverStats,
    /// Resets in progress: while any is, nothing is flushed.
    holds: BTreeSet<u64>,
    /// Syncs that arrived while flushes were held; answered when the last hold ends.
    held_syncs: Vec<UnixStream>,
    /// Reusable buffer for one app's sorted records.
    sorted: Vec<(u32, AddrStats)>,
    last_error_log: Option<Instant>,
    complaints_quiet: u64,
    /// With `--store`: each flush is also queued for shipping to the bucket.
    outbox: Option<crate::ship::Outbox>,
    ship_counters: Option<Arc<crate::ship::ShipCounters>>,
}

impl Writer {
    pub fn new(
        settings: WriterSettings,
        counters: Arc<Counters>,
        from_ingest: Receiver<ToWriter>,
        free: Sender<Vec<Record>>,
        journal: Journal,
    ) -> anyhow::Result<Writer> {
        let mut store =
            StoreWriter::new(settings.data.clone(), &settings.writer_id, settings.fsync)?;
        store.set_limits(settings.limits)?;
        let stats = settings.stats_base.clone();
        Ok(Writer {
            settings,
            store: Box::new(store),
            journal,
            stalled: None,
            counters,
            from_ingest,
            free,
            pending: Pending::default(),
            waiting: BTreeMap::new(),
            epoch: 0,
            stats,
            holds: BTreeSet::new(),
            held_syncs: Vec::new(),
            sorted: Vec::new(),
            last_error_log: None,
            complaints_quiet: 0,
            outbox: None,
            ship_counters: None,
        })
    }

    /// Queues every flush in `outbox` too (`--store`).
    pub fn ship_through(
        &mut self,
        outbox: crate::ship::Outbox,
        counters: Arc<crate::ship::ShipCounters>,
    ) {
        self.outbox = Some(outbox);
        self.ship_counters = Some(counters);
    }

    /// Runs until every ingest thread has hung up, then flushes everything and returns the
    /// last epoch. Only a flush that failed to write leaves events behind (logged).
    pub fn run(mut self) -> (u64, bool) {
        self.replay();
        let mut next_flush = Instant::now() + self.settings.flush_interval;
        let mut next_stats = Instant::now();
        let mut next_log = self.settings.log_interval.map(|i| Instant::now() + i);
        let mut logged = ReceiverStats::default();
        loop {
            let now = Instant::now();
            if now >= next_stats {
                self.write_stats();
                next_stats = now + self.settings.stats_interval;
            }
            if let Some(at) = next_log.filter(|at| now >= *at) {
                self.log_counters(&mut logged);
                next_log = self.settings.log_interval.map(|i| at + i);
            }
            if now >= next_flush {
                self.flush();
                // Measured from the end of the flush: a flush longer than the interval is
                // followed by a whole interval of taking in batches, never by another flush
                // after one batch.
                next_flush = Instant::now() + self.settings.flush_interval;
            }
            let deadline = next_flush.min(next_stats);
            if let Some(records) = self.stalled.take() {
                self.accept(records);
                if self.stalled.is_some() {
                    // Nothing more is taken in until the store can be written again.
                    std::thread::sleep(deadline.saturating_duration_since(Instant::now()));
                    continue;
                }
            }
            match self.from_ingest.recv_deadline(deadline) {
                Ok(ToWriter::Batch(records)) => {
                    self.accept(records);
                    if self.pending.entries() >= self.settings.max_pending_entries {
                        self.flush();
                        next_flush = Instant::now() + self.settings.flush_interval;
                    }
                }
                Ok(ToWriter::Marker { request }) => {
                    self.waiting.entry(request).or_insert((0, None)).0 += 1;
                    self.run_ready_requests();
                }
                Ok(ToWriter::Request(request)) => {
                    let id = request.id;
                    self.waiting.entry(id).or_insert((0, None)).1 = Some(request);
                    self.run_ready_requests();
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        self.holds.clear();
        // A stop writes what is pending and compacts nothing, so it never waits for a
        // large rewrite.
        self.store.set_compaction(false);
        if let Some(records) = self.stalled.take() {
            self.accept(records);
        }
        let failed = self.flush();
        self.write_stats();
        self.answer_held_syncs(failed);
        let clean = self.pending.is_empty() && self.stalled.is_none();
        if !clean {
            log::error!(
                "{} accepted events could not be written to the store before exit",
                self.pending.events()
            );
        }
        (self.epoch, clean)
    }

    /// Journals a batch, then aggregates it: from here on it is accepted and survives a crash.
    /// When the journal is full it flushes to make room; if that cannot free it either (the
    /// store is not writable), the batch waits in `stalled`.
    fn accept(&mut self, records: Vec<Record>) {
        debug_assert!(records.len() <= BATCH_RECORDS);
        if !self.journal.append(self.epoch + 1, &records) {
            self.flush();
            if !self.journal.append(self.epoch + 1, &records) {
                if !self.stats.stalled {
                    log::error!(
                        "journal full ({} bytes) and the store cannot be written: ingest waits; \
                         the kernel drops what its buffer cannot hold",
                        self.journal.capacity_bytes()
                    );
                }
                self.stats.stalled = true;
                self.stalled = Some(records);
                return;
            }
        }
        if self.stats.stalled {
            log::info!("the store is writable again; ingest resumed");
            self.stats.stalled = false;
        }
        self.pending.add(&records);
        self.stats.events_accepted += records.len() as u64;
        self.recycle(records);
    }

    /// Puts back what the previous run had accepted but not flushed: every journaled record
    /// whose app's log does not yet hold its epoch. First it settles the start epoch: never
    /// lower than an epoch the store or the journal holds, whatever `state.json` says, so that
    /// what is accepted from now on is never mistaken for something already stored.
    fn replay(&mut self) {
        let (mut replayed, mut skipped) = (0u64, 0u64);
        let logs = &mut self.store;
        let pending = &mut self.pending;
        let outbox = &mut self.outbox;
        let result = self.journal.replay(|epoch, records| {
            for record in records {
                let in_store = match logs.log_max_epoch(&record.app) {
                    Ok(max_epoch) => max_epoch >= epoch,
                    Err(e) => {
                        log::warn!("journal replay: {e}");
                        false
                    }
                };
                if in_store {
                    skipped += 1;
                    if let Some(outbox) = outbox.as_mut() {
                        outbox.note_replayed(epoch, record);
                    }
                } else {
                    pending.add(std::slice::from_ref(record));
                    replayed += 1;
                }
            }
        });
        let journal_epoch = match result {
            Ok(found) => {
                if found.unverified_bytes > 0 {
                    log::warn!(
                        "journal {}: {} bytes after the last whole batch do not verify and were \
                         not replayed (a write the crash cut short)",
                        self.journal.path().display(),
                        found.unverified_bytes
                    );
                }
                found.max_epoch
            }
            Err(e) => {
                // The journal was readable at open; a read error now is the disk's.
                log::error!("journal replay stopped: {e}");
                0
            }
        };
        let mut start = self
            .settings
            .state_epoch
            .max(self.journal.recorded_epoch())
            .max(journal_epoch);
        if self.journal.recorded_epoch() == 0 {
            // A new journal (or one an earlier build wrote) records no epoch: ask the store.
            match store::max_epoch_of_writer(&self.settings.data, &self.settings.writer_id) {
                Ok(in_store) => start = start.max(in_store),
                Err(e) => log::warn!("finding the highest epoch in the store: {e}"),
            }
        }
        if let Err(e) = self.journal.begin_epoch(start, self.settings.fsync) {
            self.complain(&format!("{e}"));
        }
        self.epoch = start;
        if replayed + skipped > 0 {
            log::info!(
                "journal: recovered {replayed} accepted events the previous run had not flushed \
                 ({skipped} were already in the store)"
            );
        }
        self.stats.events_replayed = replayed;
        if let Some(outbox) = &mut self.outbox {
            outbox.queue_carried(self.epoch);
        }
        self.flush();
    }

    fn recycle(&self, mut records: Vec<Record>) {
        records.clear();
        // The pool only shrinks if ingest has gone, and then nobody needs it.
        let _ = self.free.send(records);
    }

    /// Serves, in id order, every request whose markers are all in.
    fn run_ready_requests(&mut self) {
        while let Some(entry) = self.waiting.first_entry() {
            let (seen, request) = entry.get();
            if request.as_ref().is_none_or(|r| *seen < r.markers) {
                return;
            }
            if let (_, Some(request)) = entry.remove() {
                self.serve(request.op);
            }
        }
    }

    /// Serves one request. The stats file is rewritten before each answer, so a client that
    /// reads it after the answer sees what the request did.
    fn serve(&mut self, op: Op) {
        let mut answers: Vec<(UnixStream, Reply)> = Vec::new();
        match op {
            Op::Sync { reply } if !self.holds.is_empty() => {
                if self.held_syncs.len() < control::MAX_HELD_SYNCS {
                    self.held_syncs.push(reply);
                } else {
                    let busy = "too many syncs are waiting for a reset to end; try again";
                    answers.push((reply, Reply::Refused(busy.into())));
                }
            }
            Op::Sync { reply } => {
                let failed = self.flush();
                answers.push((reply, self.sync_reply(failed)));
            }
            Op::BeginHold { hold, reply } => {
                let dropped_pending = self.begin_hold(hold);
                answers.push((reply, Reply::ResetBegun(ResetBegun { dropped_pending })));
            }
            Op::EndHold { hold, reply } => {
                let ended = if self.end_hold(hold) {
                    Reply::ResetEnded(ResetEnded { epoch: self.epoch })
                } else {
                    Reply::Refused("this reset's hold had already ended (lease)".into())
                };
                answers.extend(reply.map(|stream| (stream, ended)));
                if self.holds.is_empty() && !self.held_syncs.is_empty() {
                    let failed = self.flush();
                    let synced = self.sync_reply(failed);
                    answers.extend(self.held_syncs.drain(..).map(|s| (s, synced.clone())));
                }
            }
        }
        self.write_stats();
        for (stream, reply) in answers {
            control::answer(&stream, &reply);
        }
    }

    /// `reset-begin`: drops what is pending, zeroes the counters and holds flushes. Returns
    /// how many pending events were dropped.
    fn begin_hold(&mut self, hold: u64) -> u64 {
        let dropped = self.pending.events();
        self.pending = Pending::default();
        if let Some(outbox) = &mut self.outbox {
            outbox.discard_carried();
        }
        self.journal.rewind();
        self.counters.zero();
        let resets = self.stats.resets + 1;
        self.stats = self.settings.stats_base.clone();
        self.stats.resets = resets;
        self.holds.insert(hold);
        log::info!("reset: dropped {dropped} pending events; flushes held");
        dropped
    }

    /// Ends hold `hold`; false when it had already ended.
    fn end_hold(&mut self, hold: u64) -> bool {
        let was_held = self.holds.remove(&hold);
        // The tree may have been moved away: what we knew of our logs no longer holds.
        self.store.forget_logs();
        if was_held && self.holds.is_empty() {
            log::info!("reset over; flushes resumed");
        }
        was_held
    }

    /// The answer to a sync whose flush left `failed` apps unwritten.
    fn sync_reply(&self, failed: usize) -> Reply {
        if failed == 0 {
            Reply::Synced(Synced { epoch: self.epoch })
        } else {
            Reply::Refused(format!(
                "{failed} apps could not be written; see the receiver's log"
            ))
        }
    }

    fn answer_held_syncs(&mut self, failed: usize) {
        let reply = self.sync_reply(failed);
        for stream in self.held_syncs.drain(..) {
            control::answer(&stream, &reply);
        }
    }

    /// Appends one block per dirty app. Apps that fail stay pending for the next flush.
    /// Returns how many apps failed.
    fn flush(&mut self) -> usize {
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
        // The store learns which apps this flush is about to write (its app index) before
        // any log changes; if it cannot, nothing is written and everything stays pending.
        if let Err(e) = self.store.begin_flush(self.pending.app_list()) {
            self.stats.flush_errors += 1;
            self.complain(&format!(
                "flush: {e}; everything is kept for the next flush"
            ));
            return self.pending.apps();
        }
        let epoch = self.epoch + 1;
        // Write-ahead: the journal records the epoch before any block of it is in the store.
        if let Err(e) = self.journal.begin_epoch(epoch, self.settings.fsync) {
            self.stats.flush_errors += 1;
            self.complain(&format!("flush {epoch} not started: {e}"));
            return self.pending.apps();
        }
        self.epoch = epoch;
        let mut failed: Vec<(AppSha, Vec<(u32, AddrStats)>)> = Vec::new();
        let mut first_error = None;
        let mut written_events = 0u64;
        let drained = self.pending.take();
        let app_count = drained.apps();
        if let Some(outbox) = &mut self.outbox {
            outbox.begin(epoch);
        }
        let mut apps_done = 0;
        let mut sorted = std::mem::take(&mut self.sorted);
        drained.for_each_app(&mut sorted, |app, addrs| {
            if self.settings.crash_after_apps == Some(apps_done) {
                log::error!(
                    "crashing in the middle of flush {epoch} as asked (--test-crash-after-apps)"
                );
                std::process::abort();
            }
            apps_done += 1;
            let events: u64 = addrs.iter().map(|(_, s)| s.count).sum();
            match self.store.append(app, epoch, addrs) {
                Ok(()) => {
                    let refused = self.store.take_refused_addresses();
                    if let Some(outbox) = &mut self.outbox {
                        // The bucket gets what the local log got: the address limit's
                        // refusals are not shipped either.
                        let shipped = if refused > 0 {
                            self.store.admitted_by_limit()
                        } else {
                            addrs
                        };
                        if !shipped.is_empty() {
                            outbox.add(app, shipped);
                        }
                    }
                    written_events += events - refused;
                    if refused > 0 {
                        self.count_refused(store::REFUSED_ADDRESS_LIMIT, refused);
                    }
                }
                Err(e) if e.refused_reason().is_some() => {
                    self.count_refused(e.refused_reason().unwrap_or_default(), events);
                    self.complain(&format!(
                        "{e}; dropping its {events} events (counted as events_refused)"
                    ));
                }
                Err(e) => {
                    first_error.get_or_insert(e);
                    failed.push((*app, addrs.to_vec()));
                }
            }
        });
        self.sorted = sorted;
        drop(drained);
        if let Some(outbox) = &mut self.outbox {
            outbox.finish();
        }
        if let Err(e) = self.store.end_flush() {
            // The logs are written; only the index lags, and readers read the logs of the
            // apps it left unsettled until the next flush settles it.
            self.complain(&format!("flush {epoch}: {e}"));
        }
        let failed_apps = failed.len();
        for (app, addrs) in failed {
            for (ip, stats) in addrs {
                self.pending.add_stats(&app, ip, &stats);
            }
        }
        if self.pending.is_empty() {
            self.rewind_journal();
        }
        let elapsed_ms = started.elapsed().as_secs_f64() * 1e3;
        self.stats.flushes += 1;
        self.stats.events_flushed += written_events;
        self.stats.flush_last_ms = elapsed_ms;
        self.stats.flush_total_ms += elapsed_ms;
        self.stats.flush_max_ms = self.stats.flush_max_ms.max(elapsed_ms);
        if let Some(e) = first_error {
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

    /// Rewinds the journal once nothing it holds is needed any more: everything is in the
    /// store, and in the outbox with `--store` (records an outbox write could not take stay
    /// journaled, so a crash cannot lose them from the bucket, and a full journal bounds them).
    fn rewind_journal(&mut self) {
        if self.outbox.as_ref().is_some_and(|o| o.has_carried()) {
            return;
        }
        self.journal.rewind();
    }

    /// Counts `events` refused by a store limit under `reason`.
    fn count_refused(&mut self, reason: &str, events: u64) {
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

    fn write_stats(&mut self) {
        let stats = self.snapshot();
        if let Err(e) = stats.write(&self.settings.data) {
            self.complain(&format!("writing stats: {e}"));
        }
    }

    /// Logs a failure at most once per [`COMPLAINT_INTERVAL`], with how many were not logged,
    /// so a full disk cannot flood the log.
    fn complain(&mut self, message: &str) {
        let quiet = self
            .last_error_log
            .is_some_and(|at| at.elapsed() < COMPLAINT_INTERVAL);
        if quiet {
            self.complaints_quiet += 1;
            return;
        }
        if self.complaints_quiet > 0 {
            log::error!(
                "{message} ({} more failures since the last report)",
                self.complaints_quiet
            );
        } else {
            log::error!("{message}");
        }
        self.complaints_quiet = 0;
        self.last_error_log = Some(Instant::now());
    }

    fn log_counters(&mut self, last: &mut ReceiverStats) {
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

    fn write_state(&self, clean: bool) -> Result<(), store::StoreError> {
        write_state(
            &self.settings.data,
            &self.settings.writer_id,
            self.epoch,
            clean,
        )
    }
}

/// Seconds since the unix epoch (0 if the clock is before it). Record timestamps are `u32`;
/// callers convert with `u32::try_from(..).unwrap_or(u32::MAX)`.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// What a receiver leaves behind about its run: the last flush epoch and whether it stopped
/// cleanly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunState {
    pub epoch: u64,
    pub clean: bool,
}

/// Reads the state a previous run of `writer_id` left (none: a first start, counted clean).
pub fn read_state(data: &DataDir, writer_id: &str) -> RunState {
    let fresh = RunState {
        epoch: 0,
        clean: true,
    };
    let bytes = match store::read_file(&data.state_path(writer_id)) {
        Ok(Some(bytes)) => bytes,
        Ok(None) => return fresh,
        Err(e) => {
            log::warn!("{e}");
            return RunState {
                clean: false,
                ..fresh
            };
        }
    };
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(&bytes) else {
        return RunState {
            clean: false,
            ..fresh
        };
    };
    RunState {
        epoch: value["epoch"].as_u64().unwrap_or(0),
        clean: value["clean"].as_bool().unwrap_or(false),
    }
}

/// Records the epoch and whether this run has stopped cleanly.
pub fn write_state(
    data: &DataDir,
    writer_id: &str,
    epoch: u64,
    clean: bool,
) -> Result<(), store::StoreError> {
    let body = json!({"epoch": epoch, "clean": clean, "pid": std::process::id(), "updated_unix": unix_now()});
    store::write_atomic(&data.state_path(writer_id), body.to_string().as_bytes())
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
