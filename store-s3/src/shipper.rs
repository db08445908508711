//! Shipping to the bucket (`--store s3://...`): the writer leaves each flush in a local
//! outbox ([`Outbox`], called from the flush), and a shipper thread ([`Shipper`]) applies the
//! outbox entries to this writer's database in the bucket, off the ingest and flush path.
//! The receiver ships its flushes this way, and the API the events `POST /events` takes.
//!
//! Exactly once across crashes: the entries of a round (see `Unpublished`) are applied as
//! one write batch that also records the last one's epoch as the database's shipped epoch,
//! and the entries are removed only once that batch is durable. On start the shipper reads
//! the shipped epoch back from the database and drops the entries it already holds. The
//! outbox's own marker (`outbox/written`) records the last epoch written into the outbox, so
//! a crash between a flush's local append and its outbox entry is
//! repaired from the journal (see [`Outbox::note_replayed`]).

use std::collections::hash_map::Entry;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::{Relaxed, SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::outbox;
pub use crate::outbox_writer::{Outbox, ShipCounters};
use crate::{Bucket, S3Error, ShipDb};
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use ipevent_core::control::{self, Command as Ctl, Reply};
use ipevent_core::forget;
use ipevent_core::store::{self, trash, DataDir};
use ipevent_core::{AddrStats, AppSha};
use rustc_hash::FxHashMap;

/// How long the receiver waits at start for the bucket to confirm its writer id before it
/// starts anyway (ingest never waits on the object store; the shipper keeps trying).
pub const START_WAIT: Duration = Duration::from_secs(10);
/// How long a clean stop waits for the shipper to ship the last flush; what is left stays in
/// the outbox for the next start.
pub const STOP_WAIT: Duration = Duration::from_secs(10);
/// How long the shipper waits for its own writer to drain and flush for a sync request of
/// the cluster.
const SYNC_WAIT: Duration = Duration::from_secs(10);
/// How often the shipper looks at the bucket for sync requests, resets and forgets, when
/// the ship interval is longer: those wait on every receiver, so they are answered within
/// about a second however seldom flushes are shipped.
const LOOK_INTERVAL: Duration = Duration::from_secs(1);

/// How often the shipper looks at the bucket when it ships every `interval`.
fn look_interval(interval: Duration) -> Duration {
    interval.min(LOOK_INTERVAL)
}

/// Shipping failures are logged at most this often.
const COMPLAINT_INTERVAL: Duration = Duration::from_secs(10);

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
    /// How often, at most, waiting flushes are shipped as one round and published (the
    /// bucket is looked at every [`LOOK_INTERVAL`], or this if shorter).
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
    let Some(mut generation) = retrying(&s, &stop, "reading the generation", &mut complain, || {
        s.bucket.generation()
    }) else {
        return;
    };
    let mut starting = true;
    // A database this writer closed and still has to delete: (generation).
    let mut left_behind: Option<u64> = None;
    loop {
        let Some(db) = open_db(&s, generation, &stop, &started, &mut complain) else {
            return;
        };
        if starting {
            starting = false;
            let _ = started.send(Started::Open);
            match follow_missed_reset(&s, generation, &stop) {
                Err(()) => return,
                Ok(missed) => left_behind = missed.or(left_behind),
            }
        }
        if let Err(e) = set_local_generation(&s.data, &s.writer_id, generation) {
            log::warn!("{e}");
        }
        let following = retrying(
            &s,
            &stop,
            "saying which generation it ships to",
            &mut complain,
            || s.bucket.set_following(&s.writer_id, generation),
        );
        if following.is_none() {
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
                if !drop_local_state_retrying(&s, &stop) {
                    return;
                }
                left_behind = Some(generation);
                generation = next;
            }
        }
    }
}

/// Runs `step` until it succeeds, complaining about each failure and waiting one interval
/// between tries; `None` when asked to stop meanwhile.
fn retrying<T>(
    s: &ShipperSettings,
    stop: &Receiver<()>,
    what: &str,
    complain: &mut impl FnMut(&str, &S3Error, &ShipCounters),
    mut step: impl FnMut() -> Result<T, S3Error>,
) -> Option<T> {
    loop {
        match step() {
            Ok(value) => return Some(value),
            Err(e) => {
                complain(what, &e, &s.counters);
                if stopped_within(stop, look_interval(s.interval)) {
                    return None;
                }
            }
        }
    }
}

/// Opens this writer's database of `generation`, trying again each interval; `None` when
/// stopped meanwhile or when another process holds its lease (reported through `started`).
fn open_db(
    s: &ShipperSettings,
    generation: u64,
    stop: &Receiver<()>,
    started: &Sender<Started>,
    complain: &mut impl FnMut(&str, &S3Error, &ShipCounters),
) -> Option<ShipDb> {
    loop {
        let opened = ShipDb::open_in(
            Arc::clone(&s.bucket),
            generation,
            &s.writer_id,
            &s.instance,
            &s.holder,
        );
        match opened {
            Ok(db) => return Some(db),
            Err(e @ S3Error::LeaseHeld { .. }) => {
                log::error!("{e}; not shipping");
                let _ = started.send(Started::Refused(e));
                return None;
            }
            Err(e) => {
                complain("opening the database", &e, &s.counters);
                if stopped_within(stop, look_interval(s.interval)) {
                    return None;
                }
            }
        }
    }
}

/// A reset this receiver missed while it was not running: drops what it kept from before it
/// (its data dir recorded the generation it last shipped to). Returns the generation whose
/// database it left behind, if any; `Err` when stopped meanwhile.
fn follow_missed_reset(
    s: &ShipperSettings,
    generation: u64,
    stop: &Receiver<()>,
) -> Result<Option<u64>, ()> {
    match local_generation(&s.data, &s.writer_id) {
        Some(local) if local < generation => {
            log::warn!(
                "the cluster was reset while this receiver was away (generation {local} -> \
                 {generation}); dropping what it held from before"
            );
            if drop_local_state_retrying(s, stop) {
                Ok(Some(local))
            } else {
                Err(())
            }
        }
        _ => Ok(None),
    }
}

/// [`drop_local_state`] until it succeeds; false when stopped meanwhile.
fn drop_local_state_retrying(s: &ShipperSettings, stop: &Receiver<()>) -> bool {
    while let Err(e) = drop_local_state(s) {
        log::warn!("following the reset: {e}; trying again");
        if stopped_within(stop, look_interval(s.interval)) {
            return false;
        }
    }
    true
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
                if stopped_within(stop, look_interval(s.interval)) {
                    return Some(Next::Stop);
                }
            }
        }
    };
    s.counters.shipped_epoch.store(shipped, Relaxed);
    s.counters.published_epoch.store(shipped, Relaxed);
    let mut forgets = loop {
        match db.forgotten_seq() {
            Ok(seq) => break Forgets::new(s, db.generation(), seq),
            Err(e) => {
                complain("reading the forget sequence", &e, &s.counters);
                if stopped_within(stop, look_interval(s.interval)) {
                    return Some(Next::Stop);
                }
            }
        }
    };
    let mut stopping = false;
    let mut unpublished = Unpublished::default();
    let mut served = BTreeSet::new();
    let mut next_look = Instant::now();
    loop {
        let mut result = Ok(());
        let looking = !stopping && Instant::now() >= next_look;
        if looking {
            next_look = Instant::now() + look_interval(s.interval);
            match s.bucket.generation() {
                Ok(current) if current > db.generation() => {
                    return Some(Next::Generation(current));
                }
                Ok(_) => {}
                Err(e) => result = Err(e),
            }
        }
        // Forgets first: nothing written after a forget's hold is shipped before the
        // database has lost the app, and nothing is shipped while one is half applied.
        if result.is_ok() && (looking || !forgets.settled) {
            forgets.settled = false;
            result = apply_forgets(s, db, &mut forgets);
            forgets.settled = result.is_ok();
        }
        if result.is_ok() && forgets.settled {
            result = ship_round(s, db, &mut shipped, &mut unpublished, stopping);
        }
        if result.is_ok() && looking {
            result = answer_syncs(s, db, &mut shipped, &mut unpublished, &mut served);
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
            default(unpublished.wait(s.interval).min(next_look.saturating_duration_since(Instant::now()))) => {}
        }
    }
}

/// Where this writer stands with the bucket's forget log (see `ipevent_store_s3::Bucket::forget`).
struct Forgets {
    /// The last forget its database has applied.
    db: u64,
    /// The last forget its local state (journal, outbox, local tree) has applied, kept in
    /// `receivers/<writer-id>/forgotten`: a forget a stopped writer's database got from the
    /// forget itself is applied locally at the next start, before anything is shipped.
    local: u64,
    /// Every forget in the log was applied when it was last looked at.
    settled: bool,
    /// `forgotten/<writer-id>` says `db`.
    told: bool,
}

impl Forgets {
    fn new(s: &ShipperSettings, generation: u64, db: u64) -> Forgets {
        Forgets {
            db,
            local: local_forgotten(&s.data, &s.writer_id, generation),
            settled: false,
            told: false,
        }
    }
}

fn forgotten_path(data: &DataDir, writer_id: &str) -> PathBuf {
    data.receiver_dir(writer_id).join("forgotten")
}

/// The last forget of `generation`'s log this data dir's local state applied (0: none, or
/// only forgets of an earlier generation, whose state a reset dropped since).
fn local_forgotten(data: &DataDir, writer_id: &str, generation: u64) -> u64 {
    let text = store::read_file(&forgotten_path(data, writer_id))
        .ok()
        .flatten()
        .and_then(|bytes| String::from_utf8(bytes).ok())
        .unwrap_or_default();
    let mut words = text.split_whitespace().map(|w| w.parse::<u64>().ok());
    match (words.next().flatten(), words.next().flatten()) {
        (Some(g), Some(seq)) if g == generation => seq,
        _ => 0,
    }
}

/// Applies, in order, the forgets of the bucket's log this writer has not applied: first to
/// its local state (every receiver of the data dir held and flushed, so no journal holds the
/// app; its outbox entries and local tree lose the app), then to its database (the app's keys
/// deleted with the sequence recorded, durable, published), then says so in the bucket.
fn apply_forgets(s: &ShipperSettings, db: &ShipDb, f: &mut Forgets) -> Result<(), S3Error> {
    let generation = db.generation();
    let found = s.bucket.forgets_after(generation, f.db.min(f.local))?;
    let local_before = f.local;
    for (seq, apps) in found.iter().filter(|(seq, _)| *seq > local_before) {
        for app in apps {
            forget_locally(s, app)?;
            log::info!("forget {app}: removed from this host's journal, outbox and local tree");
        }
        store::write_atomic(
            &forgotten_path(&s.data, &s.writer_id),
            format!("{generation} {seq}\n").as_bytes(),
        )?;
        f.local = *seq;
    }
    let to_db: Vec<AppSha> = found
        .iter()
        .filter(|(seq, _)| *seq > f.db)
        .flat_map(|(_, apps)| apps.iter().copied())
        .collect();
    if let Some(&(last, _)) = found.last().filter(|(last, _)| *last > f.db) {
        let removed = db.forget(last, &to_db)?;
        db.publish()?;
        f.db = last;
        f.told = false;
        log::info!(
            "forget: {} apps removed from {} ({removed} addresses), up to forget {last}",
            to_db.len(),
            db.location()
        );
    }
    if !f.told {
        s.bucket.set_forgotten(&s.writer_id, generation, f.db)?;
        f.told = true;
    }
    Ok(())
}

/// Removes `app` from this writer's local state: with a receiver, through the local forget
/// (`forget-shipped`: every receiver of the data dir drains, flushes and holds; stopped ones'
/// journals lose the app; the app's directory goes), its outbox entries losing the app while
/// the receivers are held; for the API's own writer (no control socket), from its outbox.
fn forget_locally(s: &ShipperSettings, app: &AppSha) -> Result<(), S3Error> {
    let strip = || -> Result<bool, String> {
        let (removed, freed) = outbox::strip_app(&s.outbox_dir, app).map_err(|e| e.to_string())?;
        s.counters.entries.fetch_sub(removed, Relaxed);
        s.counters.bytes.fetch_sub(freed, Relaxed);
        Ok(true)
    };
    let failed = |why: String| {
        S3Error::Local(store::StoreError::Backend(format!(
            "forgetting app {app} on this host: {why}"
        )))
    };
    match &s.control_socket {
        None => strip().map(|_| ()).map_err(failed),
        Some(_) => forget::forget_app_for_bucket(&s.data, app, SYNC_WAIT, strip)
            .map(|_| ())
            .map_err(|e| failed(e.to_string())),
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
        drop_outbox(s).and_then(|()| {
            let moved = trash::move_tree_away(&s.data).map_err(|e| e.to_string())?;
            if let Some(moved) = moved {
                trash::remove_in_background(moved);
            }
            Ok(())
        })
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

/// Serves the cluster's sync requests (see `ipevent_store_s3::Bucket::sync_all`): when the
/// bucket holds requests this shipper has not served, asks the writer to drain its sockets and
/// flush, ships and publishes that flush, and then names every served request still waiting
/// in this receiver's answer. A sync the writer refuses, or a flush the outbox could not
/// take, is not answered (the reader names this receiver when it gives up).
fn answer_syncs(
    s: &ShipperSettings,
    db: &ShipDb,
    shipped: &mut u64,
    unpublished: &mut Unpublished,
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
    ship_round(s, db, shipped, unpublished, true)?;
    if s.counters.carried.load(SeqCst) {
        return Ok(());
    }
    served.extend(listed);
    s.bucket.answer_syncs(&s.writer_id, served)
}

/// Where the shipper stands between rounds: what it applied to its database but did not
/// publish yet (the database has no WAL: a batch is durable, and visible to readers, once
/// published), whether flushes wait in the outbox, and when the last round of applying
/// began. Each write batch and each publish cost the database per key and per table, however
/// little they hold, so flushes that come within one ship interval wait and go together: one
/// round per interval applies every waiting flush as one batch (an app that comes in every
/// flush costs its keys once) and publishes it. Readers are then at most about one interval
/// and one round behind the writer; a sync or a stop ships and publishes at once.
#[derive(Debug, Default)]
struct Unpublished {
    /// Something applied is not published yet (its publish failed).
    pending: bool,
    /// Outbox entries wait for the next round.
    waiting: bool,
    /// The outbox entries applied and not published (epoch, bytes): removed once published.
    applied: Vec<(u64, u64)>,
    /// When the last round of applying began.
    last: Option<Instant>,
}

impl Unpublished {
    /// Whether a round may begin now and keep to one per `interval`.
    fn due(&self, interval: Duration) -> bool {
        self.last.is_none_or(|at| at.elapsed() >= interval)
    }

    /// How long the shipper may wait for a wake-up before the next round is due.
    fn wait(&self, interval: Duration) -> Duration {
        match (self.pending || self.waiting, self.last) {
            (true, Some(at)) => interval.saturating_sub(at.elapsed()),
            (true, None) => Duration::ZERO,
            (false, _) => interval,
        }
    }
}

/// Most bytes of outbox entries one round applies as one write batch (see
/// [`Unpublished`]): bounds the shipper's memory, which holds about twice this while it
/// merges them. A shipper catching up applies and publishes one such batch after another.
const ROUND_BYTES: u64 = 32 << 20;

/// Ships the outbox entries, oldest first, when a round is due (see [`Unpublished`]), they
/// fill a round, or `now`: each round's entries as one write batch, published at once.
/// `shipped` is the last epoch applied; an entry leaves the outbox once published.
fn ship_round(
    s: &ShipperSettings,
    db: &ShipDb,
    shipped: &mut u64,
    unpublished: &mut Unpublished,
    now: bool,
) -> Result<(), S3Error> {
    // A publish that failed is tried first: the entries it holds are applied already.
    publish_if(s, db, *shipped, unpublished, true)?;
    let written = s.counters.written_epoch.load(SeqCst);
    let mut waiting = Vec::new();
    for (epoch, bytes) in outbox::entries(&s.outbox_dir)? {
        // An entry the writer has not finished with (its marker not yet written) waits.
        if epoch > written {
            break;
        }
        if epoch > *shipped {
            waiting.push((epoch, bytes));
        } else if !unpublished.applied.iter().any(|(e, _)| *e == epoch) {
            // Published before a restart, and left by it.
            remove_entry(s, epoch, bytes)?;
        }
    }
    let mut rest = &waiting[..];
    while !rest.is_empty() {
        let round_full = rest.iter().map(|(_, bytes)| bytes).sum::<u64>() >= ROUND_BYTES;
        if !(now || round_full || unpublished.due(s.interval)) {
            break;
        }
        unpublished.last = Some(Instant::now());
        let mut taken = 1;
        let mut bytes = rest[0].1;
        while taken < rest.len() && bytes + rest[taken].1 <= ROUND_BYTES {
            bytes += rest[taken].1;
            taken += 1;
        }
        let (round, later) = rest.split_at(taken);
        rest = later;
        let began = Instant::now();
        let mut apps = Coalesced::default();
        let mut read = Vec::with_capacity(round.len());
        for &(epoch, bytes) in round {
            match outbox::read_entry(&s.outbox_dir, epoch) {
                Ok(entry) => {
                    apps.add(entry);
                    read.push((epoch, bytes));
                }
                Err(what) => {
                    log::error!("outbox entry not shipped, kept aside as .bad: {what}");
                    let path = outbox::entry_path(&s.outbox_dir, epoch);
                    let _ = std::fs::rename(&path, path.with_extension("bad"));
                    s.counters.entries.fetch_sub(1, Relaxed);
                    s.counters.bytes.fetch_sub(bytes, Relaxed);
                }
            }
        }
        if let Some(&(epoch, _)) = read.last() {
            let apps = apps.into_apps();
            let read_at = Instant::now();
            db.apply(epoch, &apps)?;
            // Only now: a round whose apply failed is read and applied again, whole.
            unpublished.applied.extend(read);
            let applied_at = Instant::now();
            *shipped = epoch;
            unpublished.pending = true;
            publish_if(s, db, *shipped, unpublished, true)?;
            log::debug!(
                "round up to flush {epoch}: {} flushes, {bytes} bytes, {} apps; read in {:?}, \
                 applied in {:?}, published in {:?}",
                round.len(),
                apps.len(),
                read_at - began,
                applied_at - read_at,
                applied_at.elapsed()
            );
        }
    }
    unpublished.waiting = !rest.is_empty();
    publish_if(s, db, *shipped, unpublished, now)
}

/// The apps of several outbox entries, each app's addresses gathered from all of them
/// ([`ShipDb::apply`] merges an app's repeated addresses).
#[derive(Default)]
struct Coalesced {
    apps: FxHashMap<AppSha, Vec<(u32, AddrStats)>>,
}

impl Coalesced {
    fn add(&mut self, entry: outbox::EntryApps) {
        for (app, addrs) in entry {
            match self.apps.entry(app) {
                Entry::Vacant(v) => {
                    v.insert(addrs);
                }
                Entry::Occupied(mut o) => o.get_mut().extend(addrs),
            }
        }
    }

    fn into_apps(self) -> outbox::EntryApps {
        self.apps.into_iter().collect()
    }
}

/// Publishes what was applied if that is pending and `now`, and then removes the entries it
/// made durable from the outbox.
fn publish_if(
    s: &ShipperSettings,
    db: &ShipDb,
    shipped: u64,
    unpublished: &mut Unpublished,
    now: bool,
) -> Result<(), S3Error> {
    if unpublished.pending && now {
        db.publish()?;
        unpublished.pending = false;
    }
    if !unpublished.pending {
        s.counters.shipped_epoch.store(shipped, Relaxed);
        s.counters.published_epoch.store(shipped, Relaxed);
        for (epoch, bytes) in std::mem::take(&mut unpublished.applied) {
            remove_entry(s, epoch, bytes)?;
        }
    }
    Ok(())
}

fn remove_entry(s: &ShipperSettings, epoch: u64, bytes: u64) -> Result<(), S3Error> {
    outbox::remove_entry(&s.outbox_dir, epoch)?;
    s.counters.entries.fetch_sub(1, Relaxed);
    s.counters.bytes.fetch_sub(bytes, Relaxed);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_round_is_due_at_once_after_a_quiet_interval_and_at_most_once_per_interval() {
        let interval = Duration::from_secs(3600);
        let mut u = Unpublished::default();
        // Nothing waits: the shipper waits a whole interval for a wake-up.
        assert_eq!(u.wait(interval), interval);
        // A flush waits, no round yet: due now.
        u.waiting = true;
        assert!(u.due(interval));
        assert_eq!(u.wait(interval), Duration::ZERO);
        // A round began just now: the next one waits for the rest of the interval.
        u.last = Some(Instant::now());
        assert!(!u.due(interval));
        let wait = u.wait(interval);
        assert!(wait > Duration::ZERO && wait <= interval, "{wait:?}");
        // Nothing waits: a whole interval again.
        u.waiting = false;
        assert_eq!(u.wait(interval), interval);
        // A round began an interval ago: due again.
        u.waiting = true;
        u.last = Instant::now().checked_sub(interval);
        if u.last.is_some() {
            assert!(u.due(interval));
            assert_eq!(u.wait(interval), Duration::ZERO);
        }
    }

    #[test]
    fn coalesced_entries_hold_every_address_of_every_app_once_per_app() {
        let stats = |count, first_seen, last_seen| AddrStats {
            count,
            first_seen,
            last_seen,
        };
        let (a, b) = (AppSha([1; 32]), AppSha([2; 32]));
        let mut apps = Coalesced::default();
        apps.add(vec![(a, vec![(10, stats(1, 5, 5)), (20, stats(2, 5, 6))])]);
        apps.add(vec![
            (b, vec![(7, stats(1, 9, 9))]),
            (a, vec![(10, stats(3, 7, 8)), (15, stats(1, 7, 7))]),
        ]);
        let mut out = apps.into_apps();
        out.sort_by_key(|(app, _)| *app);
        assert_eq!(
            out,
            vec![
                (
                    a,
                    vec![
                        (10, stats(1, 5, 5)),
                        (20, stats(2, 5, 6)),
                        (10, stats(3, 7, 8)),
                        (15, stats(1, 7, 7))
                    ]
                ),
                (b, vec![(7, stats(1, 9, 9))]),
            ]
        );
    }
}
