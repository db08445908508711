//! What a storage backend offers: [`Store`] for readers (one app, every app, and the
//! [`ChangeFeed`] of the apps flushes change) and [`AppendBlocks`] for a writer (a flush's
//! blocks). The file tree implements both ([`DataDir`](super::DataDir) and
//! [`StoreWriter`](super::StoreWriter)); another backend (object storage) would sit beside it
//! without touching the receiver, the query CLI or the API.

use std::path::PathBuf;

use super::fsio::StoreError;
use crate::block::AddrStats;
use crate::lookup::Cidr;
use crate::wire::AppSha;

/// Everything the store holds for one app, merged over all writers' logs.
#[derive(Debug, Clone, Default)]
pub struct AppData {
    /// Per address, sorted by address.
    pub addrs: Vec<(u32, AddrStats)>,
    /// Logs read.
    pub logs: usize,
    /// Verified blocks read.
    pub blocks: u64,
    /// Logs whose tail did not verify, with the offset where counting stopped.
    pub torn: Vec<(PathBuf, u64)>,
    /// Logs that could not be read at all (a directory or a symlink planted in their place, an
    /// I/O error), with why; the other logs of the app are counted.
    pub unreadable: Vec<(PathBuf, String)>,
    /// Events read from the journals of writers that are not running: accepted, not yet in
    /// their logs, and replayed by their next start.
    pub journaled: u64,
}

impl AppData {
    /// Total events over all addresses.
    pub fn count(&self) -> u64 {
        self.addrs.iter().map(|(_, s)| s.count).sum()
    }
}

/// One app known to the store and its event count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppCount {
    /// The app.
    pub app: AppSha,
    /// Its events, over all writers (the logs that could be read).
    pub count: u64,
    /// Why some of its data could not be read (a planted symlink or directory, an I/O
    /// error); `None` when all of it was.
    pub unreadable: Option<String>,
}

impl AppCount {
    /// An app whose logs were all read.
    pub fn new(app: AppSha, count: u64) -> AppCount {
        AppCount {
            app,
            count,
            unreadable: None,
        }
    }
}

/// What the writer has done to the store since it started: for the stats, and for tests of
/// the compaction's cost.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreCounters {
    /// Bytes of blocks appended to logs.
    pub appended_bytes: u64,
    /// Bytes written by rewrites (compaction and repair).
    pub rewritten_bytes: u64,
    /// Rewrites done.
    pub rewrites: u64,
}

/// What [`Store::read_apps`] calls with each app and what reading it gave.
pub type EachApp<'a> = dyn FnMut(&AppSha, Result<Option<AppData>, StoreError>) + 'a;

/// Where the events are kept, as every binary reads them: one app's data merged over all
/// writers, and every app with its count. The file tree ([`DataDir`](super::DataDir)) is one; another backend
/// (object storage) implements the same.
pub trait Store {
    /// Reads and merges every writer's data of `app`. `Ok(None)` when the store has never
    /// seen the app.
    fn read_app(&self, app: &AppSha) -> Result<Option<AppData>, StoreError>;

    /// Every app in the store with its count, most events first (ties by SHA).
    fn list_apps(&self) -> Result<Vec<AppCount>, StoreError>;

    /// Reads each of `apps` as [`Store::read_app`] would, calling `each` with its result, in
    /// order; a backend may share work across the batch (the file tree reads the stopped
    /// writers' journals once). An error means none could be read.
    fn read_apps(&self, apps: &[AppSha], each: &mut EachApp<'_>) -> Result<(), StoreError> {
        for app in apps {
            each(app, self.read_app(app));
        }
        Ok(())
    }

    /// The apps that may hold an address in `cidr`: every app that does, perhaps with others
    /// (the caller reads each and checks), or `None` when the backend keeps no address index
    /// for some of its data and the caller must read every app.
    fn apps_with_address(&self, _cidr: Cidr) -> Result<Option<Vec<AppSha>>, StoreError> {
        Ok(None)
    }

    /// Starts following which apps the writers' flushes change, from now on: what
    /// `watch` reads ([`crate::watch`]). A backend that cannot answers
    /// [`StoreError::Unsupported`].
    fn follow_changes(&self) -> Result<Box<dyn ChangeFeed>, StoreError> {
        Err(StoreError::Unsupported(
            "this store cannot be watched (watch reads a local data dir)".to_string(),
        ))
    }
}

/// The apps that writers' flushes changed, as they finish: what `watch` re-reads, so that
/// it never reads every app of the store. From [`Store::follow_changes`].
pub trait ChangeFeed: Send {
    /// Appends to `out` every app whose data a flush changed since the previous call (or
    /// since the feed was made), each app once per call, in the order the flushes finished
    /// (one writer's flushes in their order; different writers' by when they were seen).
    /// An app may be named although nothing of it changed (a writer's restart after a
    /// crash, say), never left out when something did.
    fn changed(&mut self, out: &mut Vec<AppSha>) -> Result<(), StoreError>;
}

/// One flush's apps and their records (each run sorted by address, non-empty), kept flat so
/// a large flush is handed to the store in bounded chunks without an allocation per app.
#[derive(Debug, Default, Clone)]
pub struct Runs {
    apps: Vec<AppSha>,
    /// End of each app's records in `records`.
    ends: Vec<usize>,
    records: Vec<(u32, AddrStats)>,
}

impl Runs {
    /// Adds `app` with its `records` (sorted by address, non-empty).
    pub fn push(&mut self, app: &AppSha, records: &[(u32, AddrStats)]) {
        debug_assert!(!records.is_empty());
        self.apps.push(*app);
        self.records.extend_from_slice(records);
        self.ends.push(self.records.len());
    }

    /// Apps held.
    pub fn len(&self) -> usize {
        self.apps.len()
    }

    /// True when no app is held.
    pub fn is_empty(&self) -> bool {
        self.apps.is_empty()
    }

    /// Records held, over all apps.
    pub fn records(&self) -> usize {
        self.records.len()
    }

    /// The `i`th app and its records.
    pub fn get(&self, i: usize) -> (&AppSha, &[(u32, AddrStats)]) {
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        (&self.apps[i], &self.records[start..self.ends[i]])
    }

    /// Every app and its records, in the order they were pushed.
    pub fn iter(&self) -> impl Iterator<Item = (&AppSha, &[(u32, AddrStats)])> {
        (0..self.len()).map(|i| self.get(i))
    }

    /// Empties it, keeping its buffers.
    pub fn clear(&mut self) {
        self.apps.clear();
        self.ends.clear();
        self.records.clear();
    }
}

/// One app's run written by [`AppendBlocks::append_runs`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Appended {
    /// Events the per-app address limit refused ([`super::REFUSED_ADDRESS_LIMIT`]).
    pub refused: u64,
    /// When some were refused: the records written (what is shipped elsewhere must match).
    pub admitted: Vec<(u32, AddrStats)>,
}

/// One writer's side of a store: where a flush's blocks go, one block per app and flush.
pub trait AppendBlocks {
    /// Appends one block of flush `epoch` holding `records` (sorted by address, non-empty) to
    /// `app`'s data. On error nothing counts twice: the caller keeps the records and retries
    /// later.
    fn append(
        &mut self,
        app: &AppSha,
        epoch: u64,
        records: &[(u32, AddrStats)],
    ) -> Result<(), StoreError>;

    /// Appends each app's run in `runs` as flush `epoch`, as [`AppendBlocks::append_one`]
    /// would one after the other; one result per app, in their order. The file tree creates
    /// the logs of new apps on several threads.
    fn append_runs(&mut self, epoch: u64, runs: &Runs) -> Vec<Result<Appended, StoreError>> {
        runs.iter()
            .map(|(app, records)| self.append_one(app, epoch, records))
            .collect()
    }

    /// [`AppendBlocks::append`], and what the address limit refused of it.
    fn append_one(
        &mut self,
        app: &AppSha,
        epoch: u64,
        records: &[(u32, AddrStats)],
    ) -> Result<Appended, StoreError> {
        self.append(app, epoch, records)?;
        let refused = self.take_refused_addresses();
        let admitted = if refused > 0 {
            self.admitted_by_limit().to_vec()
        } else {
            Vec::new()
        };
        Ok(Appended { refused, admitted })
    }

    /// The highest epoch among the verified blocks this writer holds for `app` (0 when none):
    /// journaled records of that epoch or earlier are already stored.
    fn log_max_epoch(&mut self, app: &AppSha) -> Result<u64, StoreError>;

    /// Forgets everything known of the stored data (after a reset moved it away).
    fn forget_logs(&mut self);

    /// Forgets what is known of `app`'s data, which is about to be removed (one app
    /// forgotten, [`crate::forget`]): the next append to it starts a new log, and readers of
    /// the writer's app index read the app's log themselves instead of trusting its count.
    fn forget_app(&mut self, app: &AppSha) -> Result<(), StoreError>;

    /// Times the writer's bookkeeping reached its bound and was forgotten (a counter for
    /// operators; 0 for a backend without such a bound).
    fn tracked_logs_forgotten(&self) -> u64 {
        0
    }

    /// Events that [`AppendBlocks::append`] dropped for the per-app address limit since the
    /// last call ([`super::REFUSED_ADDRESS_LIMIT`]).
    fn take_refused_addresses(&mut self) -> u64 {
        0
    }

    /// After an [`AppendBlocks::append`] whose address limit refused events (see
    /// [`AppendBlocks::take_refused_addresses`]): the records it did write, so that what is
    /// shipped elsewhere matches the store.
    fn admitted_by_limit(&self) -> &[(u32, AddrStats)] {
        &[]
    }

    /// Announces a flush that will append to `apps` (before any of its appends).
    fn begin_flush(&mut self, _apps: &[AppSha]) -> Result<(), StoreError> {
        Ok(())
    }

    /// Ends the flush [`AppendBlocks::begin_flush`] announced.
    fn end_flush(&mut self) -> Result<(), StoreError> {
        Ok(())
    }

    /// Turns compaction on or off (off for the last flush before exit, so that a stop never
    /// waits for a large rewrite).
    fn set_compaction(&mut self, _on: bool) {}

    /// What this writer has appended and rewritten so far.
    fn store_counters(&self) -> StoreCounters {
        StoreCounters::default()
    }
}
