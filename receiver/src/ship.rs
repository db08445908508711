//! Shipping to the bucket (`--store s3://...`): the writer leaves each flush in a local
//! outbox ([`Outbox`], called from the flush), and a shipper thread ([`Shipper`]) applies the
//! outbox entries to this receiver's database in the bucket, off the ingest and flush path.
//!
//! Exactly once across crashes: each entry is applied as one write batch that also records
//! its epoch as the database's shipped epoch, and the entry is removed only once that batch is
//! durable. On start the shipper reads the shipped epoch back from the database and drops the
//! entries it already holds. The outbox's own marker (`outbox/written`) records the last epoch
//! written into the outbox, so a crash between a flush's local append and its outbox entry is
//! repaired from the journal (see [`Outbox::note_replayed`]).

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use ipevent_core::aggregate::{Pending, Record};
use ipevent_core::stats::ReceiverStats;
use ipevent_core::store::{self, DataDir};
use ipevent_core::{AddrStats, AppSha};
use ipevent_store_s3::outbox::{self, EntryBuilder};
use ipevent_store_s3::{Bucket, S3Error, ShipDb};

/// How long the receiver waits at start for the bucket to confirm its writer id before it
/// starts anyway (ingest never waits on the object store; the shipper keeps trying).
pub const START_WAIT: Duration = Duration::from_secs(10);
/// How long a clean stop waits for the shipper to ship the last flush; what is left stays in
/// the outbox for the next start.
pub const STOP_WAIT: Duration = Duration::from_secs(10);
/// Shipping failures are logged at most this often.
const COMPLAINT_INTERVAL: Duration = Duration::from_secs(10);

/// Counters the outbox and the shipper share with the stats file.
#[derive(Debug, Default)]
pub struct ShipCounters {
    /// Outbox entries not yet shipped.
    entries: AtomicU64,
    /// Their bytes.
    bytes: AtomicU64,
    /// Last epoch written into the outbox.
    written_epoch: AtomicU64,
    /// Last epoch durable in the bucket.
    shipped_epoch: AtomicU64,
    /// Last epoch visible to readers.
    published_epoch: AtomicU64,
    /// Failed shipping attempts.
    errors: AtomicU64,
    /// Flushes that could not be written into the outbox (low disk, I/O error); their
    /// records are carried into the next entry.
    outbox_errors: AtomicU64,
    /// The shipper stopped for good: another process took the database.
    fenced: AtomicBool,
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
        if self.carry.is_empty() {
            return;
        }
        assert!(
            epoch > self.covered_epoch,
            "replayed epoch {epoch} already in the outbox"
        );
        self.builder.begin(epoch);
        self.finish();
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
    /// carried into the next entry, in memory.
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
                self.counters.written_epoch.store(epoch, Relaxed);
                let _ = self.wake.try_send(());
            }
            Err(e) => {
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
                         kept in memory for the next flush"
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

/// What the shipper tells the receiver's start.
#[derive(Debug)]
pub enum Started {
    /// The database is open and the writer id is ours.
    Open,
    /// The writer id belongs to another receiver: do not start.
    Refused(S3Error),
}

/// The shipper thread's handle.
pub struct Shipper {
    stop: Sender<()>,
    done: Receiver<()>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// What the shipper thread needs.
pub struct ShipperSettings {
    pub bucket: Arc<Bucket>,
    pub writer_id: String,
    /// Stable token of this data dir (see [`instance_token`]).
    pub instance: String,
    /// Host and data dir, for the error another receiver with our id sees.
    pub holder: String,
    pub outbox_dir: PathBuf,
    pub interval: Duration,
    pub counters: Arc<ShipCounters>,
}

impl Shipper {
    /// Starts the shipper and waits up to [`START_WAIT`] for the bucket to accept our
    /// writer id. `Err` when another receiver holds it; after the wait (the bucket is not
    /// reachable) the receiver starts anyway and the shipper keeps trying.
    pub fn start(settings: ShipperSettings, woken: Receiver<()>) -> Result<Shipper, S3Error> {
        let (stop_tx, stop_rx) = crossbeam_channel::bounded(1);
        let (done_tx, done_rx) = crossbeam_channel::bounded(1);
        let (started_tx, started_rx) = crossbeam_channel::bounded(1);
        let thread = std::thread::Builder::new()
            .name("shipper".into())
            .spawn(move || {
                run(settings, woken, stop_rx, started_tx);
                let _ = done_tx.send(());
            })
            .expect("starting the shipper thread");
        let shipper = Shipper {
            stop: stop_tx,
            done: done_rx,
            thread: Some(thread),
        };
        match started_rx.recv_timeout(START_WAIT) {
            Ok(Started::Open) => {}
            Ok(Started::Refused(e)) => return Err(e),
            Err(_) => log::warn!(
                "the bucket did not answer within {START_WAIT:?}; receiving anyway, \
                 flushes wait in the outbox until it does"
            ),
        }
        Ok(shipper)
    }

    /// Asks the shipper to ship what is left and close, and waits up to [`STOP_WAIT`].
    pub fn stop(mut self) {
        let _ = self.stop.send(());
        match self.done.recv_timeout(STOP_WAIT) {
            Ok(()) => {
                if let Some(thread) = self.thread.take() {
                    let _ = thread.join();
                }
            }
            Err(_) => log::warn!(
                "shipping did not finish within {STOP_WAIT:?}; the rest waits in the outbox \
                 for the next start"
            ),
        }
    }
}

/// A token that identifies this data dir to the bucket, kept in
/// `receivers/<writer-id>/instance`: a restart on the same data dir is the same instance.
pub fn instance_token(data: &DataDir, writer_id: &str) -> Result<String, store::StoreError> {
    let path = data.receiver_dir(writer_id).join("instance");
    if let Some(text) = store::read_file(&path)?.and_then(|b| String::from_utf8(b).ok()) {
        let token = text.trim();
        if !token.is_empty() && token.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Ok(token.to_string());
        }
    }
    let mut bytes = [0u8; 16];
    let random = store::open_read(Path::new("/dev/urandom"))
        .ok()
        .flatten()
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes).ok());
    if random.is_none() {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u32(std::process::id());
        bytes[..8].copy_from_slice(&h.finish().to_le_bytes());
        bytes[8..].copy_from_slice(&crate::writer::unix_now().to_le_bytes());
    }
    let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    store::write_atomic(&path, format!("{token}\n").as_bytes())?;
    Ok(token)
}

/// Waits `pause`, or less if stopped; true when asked to stop.
fn stopped_within(stop: &Receiver<()>, pause: Duration) -> bool {
    !matches!(stop.recv_timeout(pause), Err(RecvTimeoutError::Timeout))
}

fn run(s: ShipperSettings, woken: Receiver<()>, stop: Receiver<()>, started: Sender<Started>) {
    let mut complained: Option<Instant> = None;
    let mut complain = |what: &str, e: &S3Error, counters: &ShipCounters| {
        counters.errors.fetch_add(1, Relaxed);
        let now = Instant::now();
        if complained.is_none_or(|at| now.duration_since(at) >= COMPLAINT_INTERVAL) {
            complained = Some(now);
            log::warn!("shipping to {}: {what}: {e}", s.bucket.url());
        }
    };
    // Open the database (the object store may be down: keep trying until stopped).
    let db = loop {
        match ShipDb::open(Arc::clone(&s.bucket), &s.writer_id, &s.instance, &s.holder) {
            Ok(db) => break db,
            Err(e @ S3Error::LeaseHeld { .. }) => {
                let _ = started.send(Started::Refused(e));
                return;
            }
            Err(e) => {
                complain("opening the database", &e, &s.counters);
                if stopped_within(&stop, s.interval) {
                    return;
                }
            }
        }
    };
    let _ = started.send(Started::Open);
    log::info!(
        "shipping flushes to {} (database {})",
        s.bucket.url(),
        db.location()
    );
    let mut shipped = loop {
        match db.shipped_epoch() {
            Ok(epoch) => break epoch,
            Err(e) => {
                complain("reading the shipped epoch", &e, &s.counters);
                if stopped_within(&stop, s.interval) {
                    return;
                }
            }
        }
    };
    s.counters.shipped_epoch.store(shipped, Relaxed);
    s.counters.published_epoch.store(shipped, Relaxed);
    let mut stopping = false;
    let mut unpublished = false;
    loop {
        match ship_round(&s, &db, &mut shipped, &mut unpublished) {
            Ok(()) => {}
            Err(e @ S3Error::Fenced { .. }) => {
                s.counters.fenced.store(true, Relaxed);
                log::error!("{e}");
                return;
            }
            Err(e) => complain("shipping", &e, &s.counters),
        }
        if stopping {
            break;
        }
        crossbeam_channel::select! {
            recv(stop) -> _ => stopping = true,
            recv(woken) -> _ => {}
            default(s.interval) => {}
        }
    }
    if let Err(e) = db.close() {
        log::warn!("closing {}: {e}", s.bucket.url());
    }
}

/// Ships every entry the outbox holds, oldest first, then publishes them to readers.
fn ship_round(
    s: &ShipperSettings,
    db: &ShipDb,
    shipped: &mut u64,
    unpublished: &mut bool,
) -> Result<(), S3Error> {
    let written = s.counters.written_epoch.load(Relaxed);
    for (epoch, bytes) in outbox::entries(&s.outbox_dir)? {
        // An entry the writer has not finished with (its marker not yet written) waits.
        if epoch > written {
            break;
        }
        if epoch > *shipped {
            let apps = match outbox::read_entry(&s.outbox_dir, epoch) {
                Ok(apps) => apps,
                Err(what) => {
                    log::error!("outbox entry not shipped, kept aside as .bad: {what}");
                    let path = outbox::entry_path(&s.outbox_dir, epoch);
                    let _ = std::fs::rename(&path, path.with_extension("bad"));
                    s.counters.entries.fetch_sub(1, Relaxed);
                    s.counters.bytes.fetch_sub(bytes, Relaxed);
                    continue;
                }
            };
            db.apply(epoch, &apps)?;
            *shipped = epoch;
            *unpublished = true;
            s.counters.shipped_epoch.store(epoch, Relaxed);
        }
        outbox::remove_entry(&s.outbox_dir, epoch)?;
        s.counters.entries.fetch_sub(1, Relaxed);
        s.counters.bytes.fetch_sub(bytes, Relaxed);
    }
    if *unpublished {
        db.publish()?;
        *unpublished = false;
    }
    s.counters.published_epoch.store(*shipped, Relaxed);
    Ok(())
}
