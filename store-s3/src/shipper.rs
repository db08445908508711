//! Shipping to the bucket (`--store s3://...`): the writer leaves each flush in a local
//! outbox ([`Outbox`], called from the flush), and a shipper thread ([`Shipper`]) applies the
//! outbox entries to this writer's database in the bucket, off the ingest and flush path.
//! The receiver ships its flushes this way, and the API the events `POST /events` takes.
//!
//! Exactly once across crashes: each entry is applied as one write batch that also records
//! its epoch as the database's shipped epoch, and the entry is removed only once that batch is
//! durable. On start the shipper reads the shipped epoch back from the database and drops the
//! entries it already holds. The outbox's own marker (`outbox/written`) records the last epoch
//! written into the outbox, so a crash between a flush's local append and its outbox entry is
//! repaired from the journal (see [`Outbox::note_replayed`]).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::{Relaxed, SeqCst};
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::outbox::{self, EntryBuilder};
use crate::{Bucket, S3Error, ShipDb};
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use ipevent_core::aggregate::{Pending, Record};
use ipevent_core::control::{self, Command as Ctl, Reply};
use ipevent_core::stats::ReceiverStats;
use ipevent_core::store::{self, DataDir};
use ipevent_core::{AddrStats, AppSha};

/// How long the receiver waits at start for the bucket to confirm its writer id before it
/// starts anyway (ingest never waits on the object store; the shipper keeps trying).
pub const START_WAIT: Duration = Duration::from_secs(10);
/// How long a clean stop waits for the shipper to ship the last flush; what is left stays in
/// the outbox for the next start.
pub const STOP_WAIT: Duration = Duration::from_secs(10);
/// How long the shipper waits for its own writer to drain and flush for a sync request of
/// the cluster.
const SYNC_WAIT: Duration = Duration::from_secs(10);
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
    /// Records wait in memory for an outbox entry (its last write failed): the outbox does
    /// not cover every flush, so the shipper cannot answer a sync request.
    carried: AtomicBool,
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
    /// The bucket.
    pub bucket: Arc<Bucket>,
    /// The writer id whose database it ships to.
    pub writer_id: String,
    /// Stable token of this data dir (see [`instance_token`]).
    pub instance: String,
    /// Host and data dir, for the error another receiver with our id sees.
    pub holder: String,
    /// The outbox it ships from.
    pub outbox_dir: PathBuf,
    /// The data dir (a reset of the cluster resets its local tree too).
    pub data: DataDir,
    /// A receiver's control socket: the shipper asks its writer to drain and flush there
    /// when a reader's sync request arrives through the bucket. `None` for a writer whose
    /// events are in the outbox before it acknowledges them (the API's `POST /events`).
    pub control_socket: Option<PathBuf>,
    /// How often the outbox is shipped and the bucket looked at.
    pub interval: Duration,
    /// Counters shared with the outbox.
    pub counters: Arc<ShipCounters>,
    /// How long [`Shipper::start`] waits for the bucket to accept the writer id.
    pub start_wait: Duration,
}

impl Shipper {
    /// Starts the shipper and waits up to `start_wait` ([`START_WAIT`] for a receiver) for
    /// the bucket to accept our
    /// writer id. `Err` when another receiver holds it; after the wait (the bucket is not
    /// reachable) the receiver starts anyway and the shipper keeps trying.
    pub fn start(settings: ShipperSettings, woken: Receiver<()>) -> Result<Shipper, S3Error> {
        let settings_wait = settings.start_wait;
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
        let wait = settings_wait;
        match started_rx.recv_timeout(wait) {
            Ok(Started::Open) => {}
            Ok(Started::Refused(e)) => return Err(e),
            Err(_) if wait.is_zero() => {}
            Err(_) => log::warn!(
                "the bucket did not answer within {wait:?}; going on anyway, \
                 what is written waits in the outbox until it does"
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
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        bytes[8..].copy_from_slice(&nanos.to_le_bytes());
    }
    let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    store::write_atomic(&path, format!("{token}\n").as_bytes())?;
    Ok(token)
}

/// Waits `pause`, or less if stopped; true when asked to stop.
fn stopped_within(stop: &Receiver<()>, pause: Duration) -> bool {
    !matches!(stop.recv_timeout(pause), Err(RecvTimeoutError::Timeout))
}

/// What ends the shipping to one generation's database.
enum Next {
    /// The receiver stops.
    Stop,
    /// A reset started this generation: follow it.
    Generation(u64),
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
    // The object store may be down: every step is tried again each interval until stopped.
    let mut generation = loop {
        match s.bucket.generation() {
            Ok(generation) => break generation,
            Err(e) => {
                complain("reading the generation", &e, &s.counters);
                if stopped_within(&stop, s.interval) {
                    return;
                }
            }
        }
    };
    let mut starting = true;
    // A database this writer closed and still has to delete: (generation).
    let mut left_behind: Option<u64> = None;
    loop {
        let db = loop {
            match ShipDb::open_in(
                Arc::clone(&s.bucket),
                generation,
                &s.writer_id,
                &s.instance,
                &s.holder,
            ) {
                Ok(db) => break db,
                Err(e @ S3Error::LeaseHeld { .. }) => {
                    log::error!("{e}; not shipping");
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
        if starting {
            starting = false;
            let _ = started.send(Started::Open);
            // A reset this receiver missed while it was not running: drop what it kept from
            // before it (its data dir recorded the generation it last shipped to).
            match local_generation(&s.data, &s.writer_id) {
                Some(local) if local < generation => {
                    log::warn!(
                        "the cluster was reset while this receiver was away (generation {local} \
                         -> {generation}); dropping what it held from before"
                    );
                    while let Err(e) = drop_local_state(&s) {
                        log::warn!("following the reset: {e}; trying again");
                        if stopped_within(&stop, s.interval) {
                            return;
                        }
                    }
                    left_behind = Some(local);
                }
                _ => {}
            }
        }
        if let Err(e) = set_local_generation(&s.data, &s.writer_id, generation) {
            log::warn!("{e}");
        }
        let following = loop {
            match s.bucket.set_following(&s.writer_id, generation) {
                Ok(()) => break Ok(()),
                Err(e) => {
                    complain("saying which generation it ships to", &e, &s.counters);
                    if stopped_within(&stop, s.interval) {
                        break Err(());
                    }
                }
            }
        };
        if following.is_err() {
            let _ = db.close();
            return;
        }
        if let Some(old) = left_behind.take() {
            match s.bucket.delete_database(old, &s.writer_id) {
                Ok(n) => {
                    log::info!("deleted this writer's database of generation {old} ({n} objects)")
                }
                Err(e) => log::warn!("deleting this writer's database of generation {old}: {e}"),
            }
        }
        log::info!(
            "shipping flushes to {} (database {})",
            s.bucket.url(),
            db.location()
        );
        match ship_to(&s, &db, &woken, &stop, &mut complain) {
            None => return,
            Some(Next::Stop) => {
                if let Err(e) = db.close() {
                    log::warn!("closing {}: {e}", s.bucket.url());
                }
                return;
            }
            Some(Next::Generation(next)) => {
                log::info!("the cluster was reset (generation {next}): following");
                if let Err(e) = db.close_keeping_lease() {
                    log::warn!("closing {}: {e}", s.bucket.url());
                }
                while let Err(e) = drop_local_state(&s) {
                    log::warn!("following the reset: {e}; trying again");
                    if stopped_within(&stop, s.interval) {
                        return;
                    }
                }
                left_behind = Some(generation);
                generation = next;
            }
        }
    }
}

/// Ships to one generation's database until the receiver stops or a reset moves the cluster
/// to another generation. `None` when the database was taken over (fenced) and shipping ends.
fn ship_to(
    s: &ShipperSettings,
    db: &ShipDb,
    woken: &Receiver<()>,
    stop: &Receiver<()>,
    complain: &mut impl FnMut(&str, &S3Error, &ShipCounters),
) -> Option<Next> {
    let mut shipped = loop {
        match db.shipped_epoch() {
            Ok(epoch) => break epoch,
            Err(e) => {
                complain("reading the shipped epoch", &e, &s.counters);
                if stopped_within(stop, s.interval) {
                    return Some(Next::Stop);
                }
            }
        }
    };
    s.counters.shipped_epoch.store(shipped, Relaxed);
    s.counters.published_epoch.store(shipped, Relaxed);
    let mut stopping = false;
    let mut unpublished = false;
    let mut served = BTreeSet::new();
    let mut next_look = Instant::now();
    loop {
        let mut result = ship_round(s, db, &mut shipped, &mut unpublished);
        if result.is_ok() && !stopping && Instant::now() >= next_look {
            next_look = Instant::now() + s.interval;
            match s.bucket.generation() {
                Ok(current) if current > db.generation() => {
                    return Some(Next::Generation(current));
                }
                Ok(_) => {
                    result = answer_syncs(s, db, &mut shipped, &mut unpublished, &mut served);
                }
                Err(e) => result = Err(e),
            }
        }
        match result {
            Ok(()) => {}
            Err(e @ S3Error::Fenced { .. }) => {
                s.counters.fenced.store(true, Relaxed);
                log::error!("{e}");
                return None;
            }
            Err(e) => complain("shipping", &e, &s.counters),
        }
        if stopping {
            return Some(Next::Stop);
        }
        crossbeam_channel::select! {
            recv(stop) -> _ => stopping = true,
            recv(woken) -> _ => {}
            default(s.interval) => {}
        }
    }
}

fn generation_path(data: &DataDir, writer_id: &str) -> PathBuf {
    data.receiver_dir(writer_id).join("generation")
}

/// The generation this data dir last shipped to; `None` when it never shipped (a new data
/// dir, or one that ran without `--store`: nothing in it predates a reset it could know of).
fn local_generation(data: &DataDir, writer_id: &str) -> Option<u64> {
    store::read_file(&generation_path(data, writer_id))
        .ok()
        .flatten()
        .and_then(|bytes| String::from_utf8(bytes).ok())
        .and_then(|text| text.trim().parse().ok())
}

fn set_local_generation(
    data: &DataDir,
    writer_id: &str,
    generation: u64,
) -> Result<(), store::StoreError> {
    store::write_atomic(
        &generation_path(data, writer_id),
        format!("{generation}\n").as_bytes(),
    )
}

/// Follows a reset of the cluster on this host, as `DELETE /events` resets one host: holds
/// every receiver of the data dir (each drops what it holds pending and in its journal, and
/// this one what its outbox could not take), drops this receiver's outbox, moves the local
/// tree into `trash/` (deleted in the background) and lets them go.
fn drop_local_state(s: &ShipperSettings) -> Result<(), String> {
    let answers = control::hold_all(&s.data, SYNC_WAIT)
        .map_err(|e| format!("listing the receivers of {}: {e}", s.data.root().display()))?;
    let mut holds = Vec::new();
    let mut refused = Vec::new();
    for answer in answers {
        match answer.result {
            Ok(hold) => holds.push(hold),
            Err(e) => refused.push(format!("{}: {e}", answer.writer_id)),
        }
    }
    let result = if refused.is_empty() {
        drop_outbox(s).and_then(|()| move_tree_away(&s.data))
    } else {
        Err(format!(
            "receivers could not be held ({})",
            refused.join("; ")
        ))
    };
    for hold in holds {
        if let Err(e) = hold.end(SYNC_WAIT) {
            log::warn!("following the reset: a receiver did not confirm its release: {e}");
        }
    }
    result
}

/// Removes every outbox entry (the writer is held: none is being written).
fn drop_outbox(s: &ShipperSettings) -> Result<(), String> {
    for (epoch, bytes) in outbox::entries(&s.outbox_dir).map_err(|e| e.to_string())? {
        outbox::remove_entry(&s.outbox_dir, epoch).map_err(|e| e.to_string())?;
        s.counters.entries.fetch_sub(1, Relaxed);
        s.counters.bytes.fetch_sub(bytes, Relaxed);
    }
    Ok(())
}

/// Renames the local tree into `trash/` and puts an empty one in its place; the old one is
/// deleted on a thread of its own (and by the API's start if that is interrupted).
fn move_tree_away(data: &DataDir) -> Result<(), String> {
    let events = data.events_dir();
    let trash = data.trash_dir();
    store::create_dir_all(&trash).map_err(|e| e.to_string())?;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let target = trash.join(format!("events-{nanos}-{}", std::process::id()));
    match std::fs::rename(&events, &target) {
        Ok(()) => {
            let _ = std::thread::Builder::new()
                .name("trash".into())
                .spawn(move || {
                    if let Err(e) = std::fs::remove_dir_all(&target) {
                        log::warn!("deleting {}: {e}", target.display());
                    }
                });
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("moving {} into the trash: {e}", events.display())),
    }
    store::create_dir_all(&events).map_err(|e| e.to_string())
}

/// Serves the cluster's sync requests (see `ipevent_store_s3::Bucket::sync_all`): when the
/// bucket holds requests this shipper has not served, asks the writer to drain its sockets and
/// flush, ships and publishes that flush, and then names every served request still waiting
/// in this receiver's answer. A sync the writer refuses, or a flush the outbox could not
/// take, is not answered (the reader names this receiver when it gives up).
fn answer_syncs(
    s: &ShipperSettings,
    db: &ShipDb,
    shipped: &mut u64,
    unpublished: &mut bool,
    served: &mut BTreeSet<String>,
) -> Result<(), S3Error> {
    let listed: BTreeSet<String> = s
        .bucket
        .sync_requests()?
        .into_iter()
        .map(|r| r.id)
        .collect();
    served.retain(|id| listed.contains(id));
    if listed.iter().all(|id| served.contains(id)) {
        return Ok(());
    }
    let asked = s
        .control_socket
        .as_ref()
        .map(|socket| control::request(socket, Ctl::Sync, SYNC_WAIT));
    match asked {
        None | Some(Ok(Reply::Synced(_))) => {}
        Some(Ok(other)) => {
            log::warn!("sync request from the bucket: the writer answered {other:?}");
            return Ok(());
        }
        Some(Err(e)) => {
            log::warn!("sync request from the bucket: asking the writer: {e}");
            return Ok(());
        }
    }
    // The sync's flush wrote its entry before the writer answered: one round ships it.
    ship_round(s, db, shipped, unpublished)?;
    if s.counters.carried.load(SeqCst) {
        return Ok(());
    }
    served.extend(listed);
    s.bucket.answer_syncs(&s.writer_id, served)
}

/// Ships every entry the outbox holds, oldest first, then publishes them to readers.
fn ship_round(
    s: &ShipperSettings,
    db: &ShipDb,
    shipped: &mut u64,
    unpublished: &mut bool,
) -> Result<(), S3Error> {
    let written = s.counters.written_epoch.load(SeqCst);
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
