//! The store writer: folds accepted records into a per-app, per-address map and appends one
//! checksummed block per dirty app to the store every flush interval, on request, and at exit.
//!
//! The rooms: this file (the thread's loop, taking in batches), [`pool`] (the batches that
//! travel between ingest and the writer), [`flush`] (a flush in named steps), [`replay`] (a
//! start: the journal put back, the start epoch settled), [`requests`] (control requests:
//! sync, reset holds), [`forget`] (the hold of `forget <sha>`) and [`stats`] (`stats.json` and the log line).

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use ipevent_core::aggregate::Pending;
pub use ipevent_core::aggregate::Record;
use ipevent_core::journal::Journal;
use ipevent_core::stats::ReceiverStats;
use ipevent_core::store::{self, AppendBlocks, Runs, StoreWriter};
use ipevent_core::{AddrStats, DataDir};

use crate::control::Request;
use crate::counters::Counters;
use crate::run_state::write_state;

mod flush;
mod forget;
mod pool;
mod replay;
mod requests;
mod stats;

pub use pool::{BatchPool, BATCH_RECORDS, MAX_POOL_BATCHES};

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
    /// Resets and forgets in progress: while any is, nothing is flushed.
    holds: BTreeSet<u64>,
    /// The holds among them that are forgets of one app (the others are resets).
    forgets: BTreeSet<u64>,
    /// Syncs that arrived while flushes were held; answered when the last hold ends.
    held_syncs: Vec<UnixStream>,
    /// Reusable buffer for one app's sorted records.
    sorted: Vec<(u32, AddrStats)>,
    /// Reusable buffer for the chunk of apps handed to the store at once.
    chunk: Runs,
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
            forgets: BTreeSet::new(),
            held_syncs: Vec::new(),
            sorted: Vec::new(),
            chunk: Runs::default(),
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

    fn recycle(&self, mut records: Vec<Record>) {
        records.clear();
        // The pool only shrinks if ingest has gone, and then nobody needs it.
        let _ = self.free.send(records);
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

    fn write_state(&self, clean: bool) -> Result<(), store::StoreError> {
        write_state(
            &self.settings.data,
            &self.settings.writer_id,
            self.epoch,
            clean,
        )
    }
}
