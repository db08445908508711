//! The writer's side of shipping: [`Outbox`] builds each flush's entry and writes it into the
//! outbox ([`crate::outbox`]), and [`ShipCounters`] are what it and the shipper
//! ([`crate::shipper`]) share with the stats file.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::{Relaxed, SeqCst};
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::outbox::{self, EntryBuilder};
use crossbeam_channel::{Receiver, Sender};
use ipevent_core::aggregate::{Pending, Record};
use ipevent_core::stats::ReceiverStats;
use ipevent_core::store::{self, DataDir};
use ipevent_core::{AddrStats, AppSha};

/// Outbox write failures are logged at most this often.
const COMPLAINT_INTERVAL: Duration = Duration::from_secs(10);

/// Counters the outbox and the shipper share with the stats file.
#[derive(Debug, Default)]
pub struct ShipCounters {
    /// Outbox entries not yet shipped.
    pub(crate) entries: AtomicU64,
    /// Their bytes.
    pub(crate) bytes: AtomicU64,
    /// Last epoch written into the outbox.
    pub(crate) written_epoch: AtomicU64,
    /// Last epoch durable in the bucket.
    pub(crate) shipped_epoch: AtomicU64,
    /// Last epoch visible to readers.
    pub(crate) published_epoch: AtomicU64,
    /// Failed shipping attempts.
    pub(crate) errors: AtomicU64,
    /// Flushes that could not be written into the outbox (low disk, I/O error); their
    /// records are carried into the next entry.
    pub(crate) outbox_errors: AtomicU64,
    /// The shipper stopped for good: another process took the database.
    pub(crate) fenced: AtomicBool,
    /// Records wait in memory for an outbox entry (its last write failed): the outbox does
    /// not cover every flush, so the shipper cannot answer a sync request.
    pub(crate) carried: AtomicBool,
}

impl ShipCounters {
    /// Copies the counters into a stats snapshot.
    pub fn fill(&self, s: &mut ReceiverStats) {
        s.ship_lag_epochs = self.entries.load(Relaxed);
        s.outbox_bytes = self.bytes.load(Relaxed);
        s.shipped_epoch = self.shipped_epoch.load(Relaxed);
        s.published_epoch = self.published_epoch.load(Relaxed);
        s.ship_errors = self.errors.load(Relaxed);
        s.outbox_errors = self.outbox_errors.load(Relaxed);
        s.ship_fenced = self.fenced.load(Relaxed);
    }
}

fn marker_path(dir: &Path) -> PathBuf {
    dir.join("written")
}

/// The writer's side: builds each flush's entry and writes it into the outbox.
pub struct Outbox {
    dir: PathBuf,
    fsync: bool,
    min_free_bytes: u64,
    builder: EntryBuilder,
    /// Records written locally but in no entry yet (a failed outbox write, or a journal
    /// replay): they go into the next entry.
    carry: Pending,
    /// Last epoch whose records are all in the outbox (or shipped): the marker file, or a
    /// newer entry left by a crash before the marker was updated.
    covered_epoch: u64,
    counters: Arc<ShipCounters>,
    wake: Sender<()>,
    sorted: Vec<(u32, AddrStats)>,
    last_complaint: Option<Instant>,
}

impl Outbox {
    /// Opens the outbox of `writer_id`, counting what a previous run left in it. Returns the
    /// outbox and the receiving end of its wake-ups for the shipper.
    pub fn open(
        data: &DataDir,
        writer_id: &str,
        fsync: bool,
        min_free_bytes: u64,
        counters: Arc<ShipCounters>,
    ) -> Result<(Outbox, Receiver<()>), store::StoreError> {
        let dir = outbox::dir(data, writer_id);
        store::create_dir_all(&dir)?;
        let entries = outbox::entries(&dir)?;
        let marker = store::read_file(&marker_path(&dir))?
            .and_then(|bytes| String::from_utf8(bytes).ok())
            .and_then(|s| s.trim().parse::<u64>().ok())
            .unwrap_or(0);
        let covered_epoch = entries.iter().map(|e| e.0).fold(marker, u64::max);
        counters.entries.store(entries.len() as u64, Relaxed);
        counters
            .bytes
            .store(entries.iter().map(|e| e.1).sum(), Relaxed);
        counters.written_epoch.store(covered_epoch, Relaxed);
        let (wake, woken) = crossbeam_channel::bounded(1);
        Ok((
            Outbox {
                dir,
                fsync,
                min_free_bytes,
                builder: EntryBuilder::default(),
                carry: Pending::default(),
                covered_epoch,
                counters,
                wake,
                sorted: Vec::new(),
                last_complaint: None,
            },
            woken,
        ))
    }

    /// Journal replay: `record` (accepted in flush `epoch`) is already in the local store. If
    /// the outbox does not cover that epoch, the crash came between the local append and the
    /// outbox entry, and the record still has to be shipped.
    pub fn note_replayed(&mut self, epoch: u64, record: &Record) {
        if epoch > self.covered_epoch {
            self.carry.add(std::slice::from_ref(record));
        }
    }

    /// Queues what [`Outbox::note_replayed`] collected as the entry of `epoch`, the last
    /// epoch of the journal (the flush the crash interrupted; no entry has it).
    pub fn queue_carried(&mut self, epoch: u64) {
        self.write_carried(epoch);
    }

    /// Whether records wait in memory for an entry (an outbox write failed). While they do,
    /// the writer keeps the journal (it holds them, for a crash), so the journal's size bounds
    /// them: once it is full, ingest waits as it does when the store cannot be written.
    pub fn has_carried(&self) -> bool {
        !self.carry.is_empty()
    }

    /// Tries again to queue what a failed outbox write left in memory, as the entry of
    /// `epoch`: the last flush epoch, whose own entry is one of those that failed (no entry of
    /// it exists, so the shipper has not passed it).
    pub fn retry_carried(&mut self, epoch: u64) {
        self.write_carried(epoch);
    }

    /// Writes what waits in memory as the entry of `epoch`, which no entry has yet.
    fn write_carried(&mut self, epoch: u64) {
        if self.carry.is_empty() {
            return;
        }
        assert!(
            epoch > self.covered_epoch,
            "carried records of epoch {epoch} already in the outbox"
        );
        self.builder.begin(epoch);
        self.finish();
    }

    /// A reset: what waits in memory for an entry is dropped with the rest.
    pub fn discard_carried(&mut self) {
        self.carry = Pending::default();
        self.counters.carried.store(false, SeqCst);
    }

    /// The last epoch whose records are all in the outbox (or shipped).
    pub fn covered_epoch(&self) -> u64 {
        self.covered_epoch
    }

    /// Writes one entry of `epoch` holding `addrs` of `app` now (the API's `POST /events`,
    /// before it answers): an error when it cannot, and nothing is carried.
    pub fn queue_now(
        &mut self,
        epoch: u64,
        app: &AppSha,
        addrs: &[(u32, AddrStats)],
    ) -> Result<(), String> {
        assert!(
            epoch > self.covered_epoch,
            "epoch {epoch} not after {}",
            self.covered_epoch
        );
        self.builder.begin(epoch);
        self.builder.add(app, addrs);
        let bytes = self.write_entry()?;
        self.covered_epoch = epoch;
        self.counters.entries.fetch_add(1, Relaxed);
        self.counters.bytes.fetch_add(bytes, Relaxed);
        self.counters.written_epoch.store(epoch, SeqCst);
        let _ = self.wake.try_send(());
        Ok(())
    }

    /// Starts the entry of flush `epoch`.
    pub fn begin(&mut self, epoch: u64) {
        self.builder.begin(epoch);
    }

    /// Adds one app the flush wrote to the local store.
    pub fn add(&mut self, app: &AppSha, addrs: &[(u32, AddrStats)]) {
        self.builder.add(app, addrs);
    }

    /// Writes the entry (with any carried records) into the outbox and wakes the shipper.
    /// When it cannot (free space below `--min-free-bytes`, an I/O error), its records are
    /// carried into the next entry, in memory, and counted (`outbox_errors`); the journal
    /// keeps them meanwhile (see [`Outbox::has_carried`]).
    pub fn finish(&mut self) {
        if !self.carry.is_empty() {
            let carried = self.carry.take();
            let mut sorted = std::mem::take(&mut self.sorted);
            carried.for_each_app(&mut sorted, |app, addrs| self.builder.add(app, addrs));
            self.sorted = sorted;
        }
        if self.builder.apps() == 0 {
            return;
        }
        let epoch = self.builder.epoch();
        match self.write_entry() {
            Ok(bytes) => {
                self.covered_epoch = epoch;
                self.counters.entries.fetch_add(1, Relaxed);
                self.counters.bytes.fetch_add(bytes, Relaxed);
                // Ordered with `carried`: a shipper that reads it false after a sync sees
                // this entry's epoch.
                self.counters.written_epoch.store(epoch, SeqCst);
                self.counters.carried.store(false, SeqCst);
                let _ = self.wake.try_send(());
            }
            Err(e) => {
                self.counters.carried.store(true, SeqCst);
                self.counters.outbox_errors.fetch_add(1, Relaxed);
                for (app, addrs) in self.builder.decode() {
                    for (ip, stats) in addrs {
                        self.carry.add_stats(&app, ip, &stats);
                    }
                }
                let now = Instant::now();
                if self
                    .last_complaint
                    .is_none_or(|at| now.duration_since(at) >= COMPLAINT_INTERVAL)
                {
                    self.last_complaint = Some(now);
                    log::error!(
                        "outbox: flush {epoch} not queued for shipping ({e}); its events are \
                         kept in memory and in the journal until the outbox takes them"
                    );
                }
            }
        }
    }

    fn write_entry(&self) -> Result<u64, String> {
        if self.min_free_bytes > 0 {
            let (free, _) = ipevent_core::sys::free_space(&self.dir).map_err(|e| e.to_string())?;
            if free < self.min_free_bytes {
                return Err(format!(
                    "{} has {free} bytes free, below --min-free-bytes {}",
                    self.dir.display(),
                    self.min_free_bytes
                ));
            }
        }
        let bytes = self
            .builder
            .write(&self.dir, self.fsync)
            .map_err(|e| e.to_string())?;
        store::write_atomic(
            &marker_path(&self.dir),
            format!("{}\n", self.builder.epoch()).as_bytes(),
        )
        .map_err(|e| e.to_string())?;
        Ok(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(count: u64, at: u32) -> AddrStats {
        AddrStats {
            count,
            first_seen: at,
            last_seen: at,
        }
    }

    #[test]
    fn a_refused_outbox_write_is_counted_carried_and_written_whole_later() {
        let tmp = tempfile::tempdir().unwrap();
        let data = DataDir::new(tmp.path());
        data.create().unwrap();
        let counters = Arc::new(ShipCounters::default());
        // No file system has this much free space: every write is refused.
        let (mut outbox, _woken) =
            Outbox::open(&data, "w", false, u64::MAX, Arc::clone(&counters)).unwrap();
        let app = AppSha([7; 32]);
        for (epoch, ip) in [(1u64, 10u32), (2, 10), (3, 11)] {
            outbox.begin(epoch);
            outbox.add(&app, &[(ip, stats(2, epoch as u32))]);
            outbox.finish();
            assert!(outbox.has_carried());
        }
        let mut s = ReceiverStats::default();
        counters.fill(&mut s);
        assert_eq!((s.outbox_errors, s.ship_lag_epochs), (3, 0));
        // What is carried is merged by address, not kept per flush: memory follows the
        // distinct (app, address) pairs, and the journal (kept meanwhile) bounds those.
        assert_eq!(outbox.carry.entries(), 2);
        let dir = outbox::dir(&data, "w");
        assert!(outbox::entries(&dir).unwrap().is_empty());

        // Space returns: the next try writes one entry, under the last epoch, with all of it.
        outbox.min_free_bytes = 0;
        outbox.retry_carried(3);
        assert!(!outbox.has_carried());
        counters.fill(&mut s);
        assert_eq!(s.ship_lag_epochs, 1);
        let listed: Vec<u64> = outbox::entries(&dir).unwrap().iter().map(|e| e.0).collect();
        assert_eq!(listed, [3]);
        let apps = outbox::read_entry(&dir, 3).unwrap();
        let mut addrs: Vec<(u32, AddrStats)> = apps.into_iter().flat_map(|(_, a)| a).collect();
        addrs.sort_by_key(|(ip, _)| *ip);
        let total: u64 = addrs.iter().map(|(_, s)| s.count).sum();
        assert_eq!(total, 6);
        assert_eq!(addrs[0].0, 10);
        assert_eq!(addrs[0].1.count, 4);
    }
}
