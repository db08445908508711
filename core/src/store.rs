//! The SHA-keyed file tree: where every binary finds the data.
//!
//! ```text
//! <data-dir>/
//!   LAYOUT                                  "ipevent-store 1": the layout version
//!   events/<sha[0..2]>/<sha>/<writer-id>.log   one log of blocks per app and writer
//!   receivers/<writer-id>/                  one directory per writer (receiver or API)
//!     lock                                  held while it runs
//!     control.sock  stats.json  state.json  a receiver's control socket, counters, run state
//!     journal                               a receiver's accepted records not yet flushed
//!   trash/                                  trees being deleted after a reset
//! ```
//!
//! Logs are only ever appended to or replaced whole by `rename`; nothing truncates a log in
//! place. So a reader that maps a log sees either whole verified blocks or a tail that fails
//! verification and is not counted ([`crate::block`]), and a mapping never loses its pages.
//! Several writers (receivers or hosts) share one tree without ever writing the same file.

use rustc_hash::FxHashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::block::{self, BlockBuilder, ScanSummary, Tail};
use crate::wire::AppSha;

/// Layout version written to `<data-dir>/LAYOUT`.
pub const LAYOUT_VERSION: u32 = 1;
const LAYOUT_FILE: &str = "LAYOUT";
const LAYOUT_PREFIX: &str = "ipevent-store ";

/// A log is rewritten as one merged block once it holds this many blocks, so a query reads
/// at most this many blocks per writer however long the app has been sending.
pub const COMPACT_AFTER_BLOCKS: u32 = 64;

/// The writer forgets what it knows of logs beyond this many apps (and re-verifies a log the
/// next time it appends to it), so its bookkeeping stays bounded under a flood of new apps.
pub const MAX_TRACKED_LOGS: usize = 1 << 18;

/// Mode of directories the store creates.
pub const DIR_MODE: u32 = 0o750;
/// Mode of files the store creates.
pub const FILE_MODE: u32 = 0o640;

/// Errors from the store. Each names what was being done and with which path.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// An I/O operation on a path failed.
    #[error("{action} {path}: {source}")]
    Io {
        /// What was being done ("opening", "appending to", ...).
        action: &'static str,
        /// The path it was done to.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The data dir was written by a newer or unknown version.
    #[error(
        "{path}: unsupported store layout {found:?} (this build reads layout {LAYOUT_VERSION})"
    )]
    Layout {
        /// The LAYOUT file.
        path: PathBuf,
        /// What it said.
        found: String,
    },
    /// The writer will not create a directory for a new app.
    #[error("not storing new app {app}: {reason}")]
    Refused {
        /// The app.
        app: AppSha,
        /// Which limit: [`REFUSED_APP_LIMIT`] or [`REFUSED_LOW_DISK`].
        reason: &'static str,
    },
    /// A path in the tree is not the directory it should be (a planted symlink, say).
    #[error("{0}: not a plain directory; refusing to write through it")]
    NotADirectory(PathBuf),
    /// Another process holds this writer id's lock.
    #[error(
        "writer id {writer_id} is in use by another process on {root} (lock {lock} is held); \
         give this one another --writer-id or data dir"
    )]
    WriterBusy {
        /// The writer id.
        writer_id: String,
        /// The data dir.
        root: PathBuf,
        /// The lock file.
        lock: PathBuf,
    },
    /// A writer id that is not a plain file name.
    #[error(
        "writer id {0:?} must be 1 to 64 characters of A-Z a-z 0-9 . _ - and not start with '.'"
    )]
    WriterId(String),
}

/// [`StoreError::Refused`] reason: `--max-apps` reached.
pub const REFUSED_APP_LIMIT: &str = "app_limit";
/// [`StoreError::Refused`] reason: free space or inodes below the threshold.
pub const REFUSED_LOW_DISK: &str = "low_disk";

/// [`StoreError::refused_reason`] of [`StoreError::NotADirectory`]: something planted in the
/// tree where an app's directory belongs.
pub const REFUSED_NOT_A_DIRECTORY: &str = "not_a_directory";

/// How often the writer looks at free space while it creates app directories.
const FREE_SPACE_CHECK_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// Limits on creating directories for new apps, so a flood of new SHAs cannot fill the disk.
#[derive(Debug, Clone, Copy, Default)]
pub struct StoreLimits {
    /// Most apps the store may hold (all writers); `None`: no limit.
    pub max_apps: Option<u64>,
    /// No new app below this many free bytes.
    pub min_free_bytes: u64,
    /// No new app below this many free inodes.
    pub min_free_inodes: u64,
}

impl StoreError {
    /// The limit that refused a new app, if that is what this is.
    pub fn refused_reason(&self) -> Option<&'static str> {
        match self {
            StoreError::Refused { reason, .. } => Some(reason),
            StoreError::NotADirectory(_) => Some(REFUSED_NOT_A_DIRECTORY),
            _ => None,
        }
    }

    /// True when the error is a full disk or an exhausted quota.
    pub fn is_out_of_space(&self) -> bool {
        match self {
            StoreError::Io { source, .. } => {
                matches!(
                    source.raw_os_error(),
                    Some(libc::ENOSPC) | Some(libc::EDQUOT)
                )
            }
            _ => false,
        }
    }
}

pub(crate) fn io_err<'a>(
    action: &'static str,
    path: &'a Path,
) -> impl FnOnce(io::Error) -> StoreError + 'a {
    move |source| StoreError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// Events seen for one address: how many, and the first and last arrival (unix seconds).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct AddrStats {
    /// Number of events.
    pub count: u64,
    /// Arrival of the first, unix seconds.
    pub first_seen: u32,
    /// Arrival of the last, unix seconds.
    pub last_seen: u32,
}

impl AddrStats {
    /// One event that arrived at `unix_secs`.
    #[inline]
    pub fn one(unix_secs: u32) -> AddrStats {
        AddrStats {
            count: 1,
            first_seen: unix_secs,
            last_seen: unix_secs,
        }
    }

    /// Folds `other` into `self`.
    #[inline]
    pub fn merge(&mut self, other: &AddrStats) {
        if self.count == 0 {
            *self = *other;
            return;
        }
        self.count += other.count;
        self.first_seen = self.first_seen.min(other.first_seen);
        self.last_seen = self.last_seen.max(other.last_seen);
    }
}

/// Longest writer id, in bytes: a file name with room for `.log` and `.log.tmp`.
pub const MAX_WRITER_ID_BYTES: usize = 64;

/// Checks that a writer id is a safe file name.
pub fn validate_writer_id(id: &str) -> Result<(), StoreError> {
    let ok = !id.is_empty()
        && id.len() <= MAX_WRITER_ID_BYTES
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(StoreError::WriterId(id.to_string()))
    }
}

/// A writer id made of `prefix` and `host`, every character a writer id does not allow
/// replaced by `-`, cut to the 64 characters a writer id may have. An empty host name counts as
/// `localhost`.
pub fn writer_id_for_host(prefix: &str, host: &str) -> String {
    let host = if host.is_empty() { "localhost" } else { host };
    let mut id = String::from(prefix);
    id.extend(host.chars().map(|c| {
        if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
            c
        } else {
            '-'
        }
    }));
    // Every character is ASCII now, so cutting bytes cuts characters.
    id.truncate(MAX_WRITER_ID_BYTES);
    id
}

/// [`writer_id_for_host`] with this machine's host name: the default writer id of a process.
pub fn host_writer_id(prefix: &str) -> String {
    let host = fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    writer_id_for_host(prefix, host.trim())
}

/// A data dir: computes every path of the layout. Paths are built only from validated SHAs
/// and writer ids, so no input can name a file outside the tree.
#[derive(Clone, Debug)]
pub struct DataDir {
    root: PathBuf,
}

impl DataDir {
    /// A data dir rooted at `root` (nothing is touched yet).
    pub fn new(root: impl Into<PathBuf>) -> DataDir {
        DataDir { root: root.into() }
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `<root>/events`.
    pub fn events_dir(&self) -> PathBuf {
        self.root.join("events")
    }

    /// `<root>/trash`.
    pub fn trash_dir(&self) -> PathBuf {
        self.root.join("trash")
    }

    /// `<root>/events/<sha[0..2]>/<sha>`.
    pub fn app_dir(&self, app: &AppSha) -> PathBuf {
        let hex = app.to_hex();
        self.events_dir().join(&hex[..2]).join(&hex)
    }

    /// `<root>/events/<sha[0..2]>/<sha>/<writer_id>.log`.
    pub fn log_path(&self, app: &AppSha, writer_id: &str) -> PathBuf {
        self.app_dir(app).join(format!("{writer_id}.log"))
    }

    /// `<root>/receivers`.
    pub fn receivers_dir(&self) -> PathBuf {
        self.root.join("receivers")
    }

    /// `<root>/receivers/<writer_id>`: the receiver's lock, control socket and stats.
    pub fn receiver_dir(&self, writer_id: &str) -> PathBuf {
        self.receivers_dir().join(writer_id)
    }

    /// The stats file a receiver rewrites every stats interval.
    pub fn stats_path(&self, writer_id: &str) -> PathBuf {
        self.receiver_dir(writer_id).join("stats.json")
    }

    /// The receiver's control socket.
    pub fn control_socket(&self, writer_id: &str) -> PathBuf {
        self.receiver_dir(writer_id).join("control.sock")
    }

    /// The receiver's lock file (one running receiver per writer id and data dir).
    pub fn lock_path(&self, writer_id: &str) -> PathBuf {
        self.receiver_dir(writer_id).join("lock")
    }

    /// The receiver's journal of accepted records not yet flushed.
    pub fn journal_path(&self, writer_id: &str) -> PathBuf {
        self.receiver_dir(writer_id).join("journal")
    }

    /// The receiver's state file (last epoch, clean shutdown).
    pub fn state_path(&self, writer_id: &str) -> PathBuf {
        self.receiver_dir(writer_id).join("state.json")
    }

    /// Writer ids that have a directory under `receivers/`.
    pub fn writer_ids(&self) -> Result<Vec<String>, StoreError> {
        let dir = self.receivers_dir();
        let mut ids = Vec::new();
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(ids),
            Err(e) => return Err(io_err("listing", &dir)(e)),
        };
        for entry in entries {
            let entry = entry.map_err(io_err("listing", &dir))?;
            if let Some(name) = entry.file_name().to_str() {
                if validate_writer_id(name).is_ok() {
                    ids.push(name.to_string());
                }
            }
        }
        ids.sort();
        Ok(ids)
    }

    /// Takes `writer_id`'s lock, so that each log has one writer at a time whichever process
    /// (receiver or API) claims the id. Held until the returned value is dropped.
    pub fn lock_writer(&self, writer_id: &str) -> Result<WriterLock, StoreError> {
        validate_writer_id(writer_id)?;
        create_dir_all(&self.receiver_dir(writer_id))?;
        let path = self.lock_path(writer_id);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(FILE_MODE)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&path)
            .map_err(io_err("opening lock", &path))?;
        match file.try_lock() {
            Ok(()) => Ok(WriterLock { _file: file }),
            Err(fs::TryLockError::WouldBlock) => Err(StoreError::WriterBusy {
                writer_id: writer_id.to_string(),
                root: self.root.clone(),
                lock: path,
            }),
            Err(fs::TryLockError::Error(e)) => Err(io_err("locking", &path)(e)),
        }
    }

    /// Creates the root and its layout marker if missing, and refuses a root written in an
    /// unknown layout.
    pub fn create(&self) -> Result<(), StoreError> {
        create_dir_all(&self.root)?;
        for dir in [self.events_dir(), self.receivers_dir()] {
            create_dir_all(&dir)?;
            let meta = fs::symlink_metadata(&dir).map_err(io_err("inspecting", &dir))?;
            if !meta.is_dir() {
                return Err(StoreError::NotADirectory(dir));
            }
        }
        let marker = self.root.join(LAYOUT_FILE);
        match self.check_layout() {
            Ok(true) => Ok(()),
            Ok(false) => write_atomic(
                &marker,
                format!("{LAYOUT_PREFIX}{LAYOUT_VERSION}\n").as_bytes(),
            ),
            Err(e) => Err(e),
        }
    }

    /// `Ok(true)` when the layout marker says this version, `Ok(false)` when there is none,
    /// an error when it names another layout.
    pub fn check_layout(&self) -> Result<bool, StoreError> {
        let marker = self.root.join(LAYOUT_FILE);
        match fs::read_to_string(&marker) {
            Ok(text) if text.trim() == format!("{LAYOUT_PREFIX}{LAYOUT_VERSION}") => Ok(true),
            Ok(text) => Err(StoreError::Layout {
                path: marker,
                found: text.trim().chars().take(40).collect(),
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(io_err("reading", &marker)(e)),
        }
    }
}

/// A writer id's lock, released when dropped.
#[derive(Debug)]
pub struct WriterLock {
    _file: File,
}

/// `mkdir -p` with the store's directory mode.
pub fn create_dir_all(path: &Path) -> Result<(), StoreError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(path)
        .map_err(io_err("creating directory", path))
}

/// Writes `bytes` to `path` through a temporary file and a rename, so readers see the old or
/// the new content, never a part.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let tmp = path.with_extension("tmp");
    let result = (|| {
        let mut file = open_new(&tmp)?;
        file.write_all(bytes).map_err(io_err("writing", &tmp))?;
        fs::rename(&tmp, path).map_err(io_err("renaming into place", path))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Creates (or truncates) a file without following a symlink at `path`.
fn open_new(path: &Path) -> Result<File, StoreError> {
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(FILE_MODE)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(io_err("creating", path))
}

/// Opens a file for reading without following a symlink. `Ok(None)` when it does not exist.
pub fn open_read(path: &Path) -> Result<Option<File>, StoreError> {
    match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
    {
        Ok(file) => Ok(Some(file)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err("opening", path)(e)),
    }
}

/// Scans the log at `path`, calling `on_record` for each verified record. `Ok(None)` when
/// there is no such file.
pub fn scan_log_file(
    path: &Path,
    on_record: impl FnMut(u32, AddrStats),
) -> Result<Option<ScanSummary>, StoreError> {
    let Some(file) = open_read(path)? else {
        return Ok(None);
    };
    let map = crate::sys::map_read_only(&file).map_err(io_err("mapping", path))?;
    Ok(Some(block::scan_log(map.as_ref(), on_record)))
}

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
}

impl AppData {
    /// Total events over all addresses.
    pub fn count(&self) -> u64 {
        self.addrs.iter().map(|(_, s)| s.count).sum()
    }
}

/// Reads and merges every log of `app`. `Ok(None)` when the store has never seen the app.
pub fn read_app(data: &DataDir, app: &AppSha) -> Result<Option<AppData>, StoreError> {
    data.check_layout()?;
    let dir = data.app_dir(app);
    let entries = match fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err("listing", &dir)(e)),
    };
    let mut merged: FxHashMap<u32, AddrStats> = FxHashMap::default();
    let mut out = AppData::default();
    for entry in entries {
        let entry = entry.map_err(io_err("listing", &dir))?;
        let path = entry.path();
        if path.extension().and_then(|e| e.to_str()) != Some("log") {
            continue;
        }
        let scanned = scan_log_file(&path, |ip, stats| {
            merged.entry(ip).or_default().merge(&stats);
        })?;
        let Some(summary) = scanned else { continue };
        out.logs += 1;
        out.blocks += summary.blocks;
        if let Tail::Torn { offset, .. } = summary.tail {
            out.torn.push((path, offset));
        }
    }
    if out.logs == 0 {
        return Ok(None);
    }
    out.addrs = merged.into_iter().collect();
    out.addrs.sort_unstable_by_key(|(ip, _)| *ip);
    Ok(Some(out))
}

/// One app known to the store and its event count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppCount {
    /// The app.
    pub app: AppSha,
    /// Its events, over all writers.
    pub count: u64,
}

/// Every app in the store with its count, most events first (ties by SHA).
pub fn list_apps(data: &DataDir) -> Result<Vec<AppCount>, StoreError> {
    data.check_layout()?;
    let events = data.events_dir();
    let mut out = Vec::new();
    let fans = match fs::read_dir(&events) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(io_err("listing", &events)(e)),
    };
    for fan in fans {
        let fan = fan.map_err(io_err("listing", &events))?;
        let fan_path = fan.path();
        for app_entry in fs::read_dir(&fan_path).map_err(io_err("listing", &fan_path))? {
            let app_entry = app_entry.map_err(io_err("listing", &fan_path))?;
            let Some(app) = app_entry
                .file_name()
                .to_str()
                .and_then(|name| name.parse::<AppSha>().ok())
            else {
                continue;
            };
            let mut count = 0u64;
            let mut logs = 0;
            let app_path = app_entry.path();
            for log in fs::read_dir(&app_path).map_err(io_err("listing", &app_path))? {
                let log = log.map_err(io_err("listing", &app_path))?.path();
                if log.extension().and_then(|e| e.to_str()) != Some("log") {
                    continue;
                }
                if let Some(summary) = scan_log_file(&log, |_, _| {})? {
                    count += summary.events;
                    logs += 1;
                }
            }
            if logs > 0 {
                out.push(AppCount { app, count });
            }
        }
    }
    out.sort_unstable_by(|a, b| b.count.cmp(&a.count).then(a.app.cmp(&b.app)));
    Ok(out)
}

/// Blocks after which `app`'s log is compacted: between half of [`COMPACT_AFTER_BLOCKS`] and
/// all of it, spread by the SHA, so that apps which started together do not all compact in the
/// same flush.
fn compact_limit(app: &AppSha) -> u32 {
    let half = COMPACT_AFTER_BLOCKS / 2;
    half + u32::from(app.0[31]) % half
}

/// Counts the app directories under `events/`.
fn count_app_dirs(data: &DataDir) -> Result<u64, StoreError> {
    let events = data.events_dir();
    let mut count = 0;
    let fans = match fs::read_dir(&events) {
        Ok(fans) => fans,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(io_err("listing", &events)(e)),
    };
    for fan in fans {
        let fan = fan.map_err(io_err("listing", &events))?.path();
        count += fs::read_dir(&fan).map_err(io_err("listing", &fan))?.count() as u64;
    }
    Ok(count)
}

/// What the writer knows of one of its logs.
#[derive(Debug, Clone, Copy)]
struct LogState {
    /// Length of the verified prefix: where the next block goes.
    good_len: u64,
    /// Blocks in it, for compaction.
    blocks: u32,
    /// Highest epoch of its blocks: which journaled records it already holds.
    max_epoch: u64,
    /// The tail holds bytes that are no verified block (a failed or torn write): the next
    /// append rewrites the log instead.
    needs_rewrite: bool,
    /// The app's directory is known to exist as a plain directory.
    dir_ready: bool,
}

impl LogState {
    /// A log that does not exist yet.
    const EMPTY: LogState = LogState {
        good_len: 0,
        blocks: 0,
        max_epoch: 0,
        needs_rewrite: false,
        dir_ready: false,
    };
}

/// Appends blocks to one writer's logs, repairing and compacting them as it goes.
///
/// It never truncates a log in place: a log with a bad tail, or with too many blocks, is
/// rewritten beside itself and renamed over, so concurrent readers stay correct.
#[derive(Debug)]
pub struct StoreWriter {
    data: DataDir,
    writer_id: String,
    logs: FxHashMap<AppSha, LogState>,
    /// Fan-out directories (by first SHA byte) known to be plain directories.
    fans_ready: [bool; 256],
    block: BlockBuilder,
    fsync: bool,
    limits: StoreLimits,
    /// Apps in the store, counted when a `max_apps` limit is set.
    apps: u64,
    /// When free space was last looked at, and whether it was below the thresholds.
    free_checked: Option<(std::time::Instant, bool)>,
}

impl StoreWriter {
    /// A writer for `writer_id` in `data`. With `fsync`, every append is followed by
    /// `fdatasync`, so a completed flush survives a power loss.
    pub fn new(data: DataDir, writer_id: &str, fsync: bool) -> Result<StoreWriter, StoreError> {
        validate_writer_id(writer_id)?;
        Ok(StoreWriter {
            data,
            writer_id: writer_id.to_string(),
            logs: FxHashMap::default(),
            fans_ready: [false; 256],
            block: BlockBuilder::default(),
            fsync,
            limits: StoreLimits::default(),
            apps: 0,
            free_checked: None,
        })
    }

    /// Sets the limits on new apps; with a `max_apps` limit, counts the apps already stored.
    pub fn set_limits(&mut self, limits: StoreLimits) -> Result<(), StoreError> {
        self.limits = limits;
        if limits.max_apps.is_some() {
            self.apps = count_app_dirs(&self.data)?;
        }
        Ok(())
    }

    /// Makes sure `app`'s directory exists as a plain directory, creating it (within the
    /// limits) when it does not. True when it was created now: the app is new to the store.
    ///
    /// A new app costs one `mkdir`: the fan-out directory is checked once per process, and a
    /// directory `mkdir` just made is a plain one.
    fn ensure_app_dir(&mut self, app: &AppSha) -> Result<bool, StoreError> {
        let dir = self.data.app_dir(app);
        let allowed = self.check_limits(app);
        if allowed.is_ok() {
            self.ensure_fan(app, &dir)?;
            match fs::DirBuilder::new().mode(DIR_MODE).create(&dir) {
                Ok(()) => {
                    self.apps += 1;
                    return Ok(true);
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(io_err("creating directory", &dir)(e)),
            }
        }
        match fs::symlink_metadata(&dir) {
            Ok(meta) if meta.is_dir() => {
                self.ensure_fan(app, &dir)?;
                Ok(false)
            }
            Ok(_) => Err(StoreError::NotADirectory(dir)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                allowed.and(Err(io_err("inspecting", &dir)(e)))
            }
            Err(e) => Err(io_err("inspecting", &dir)(e)),
        }
    }

    /// Makes sure the fan-out directory above `dir` is a plain directory.
    fn ensure_fan(&mut self, app: &AppSha, dir: &Path) -> Result<(), StoreError> {
        let slot = usize::from(app.0[0]);
        if self.fans_ready[slot] {
            return Ok(());
        }
        let fan = dir.parent().expect("an app dir has a parent");
        match fs::DirBuilder::new().mode(DIR_MODE).create(fan) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io_err("creating directory", fan)(e)),
        }
        // `mkdir` never follows a link, but a link planted there would be passed through.
        let meta = fs::symlink_metadata(fan).map_err(io_err("inspecting", fan))?;
        if !meta.is_dir() {
            return Err(StoreError::NotADirectory(fan.to_path_buf()));
        }
        self.fans_ready[slot] = true;
        Ok(())
    }

    fn check_limits(&mut self, app: &AppSha) -> Result<(), StoreError> {
        if self.limits.max_apps.is_some_and(|max| self.apps >= max) {
            return Err(StoreError::Refused {
                app: *app,
                reason: REFUSED_APP_LIMIT,
            });
        }
        if self.limits.min_free_bytes == 0 && self.limits.min_free_inodes == 0 {
            return Ok(());
        }
        let low = match self.free_checked {
            Some((at, low)) if at.elapsed() < FREE_SPACE_CHECK_INTERVAL => low,
            _ => {
                let events = self.data.events_dir();
                let (bytes, inodes) = crate::sys::free_space(&events)
                    .map_err(io_err("measuring free space of", &events))?;
                let low =
                    bytes < self.limits.min_free_bytes || inodes < self.limits.min_free_inodes;
                self.free_checked = Some((std::time::Instant::now(), low));
                low
            }
        };
        if low {
            return Err(StoreError::Refused {
                app: *app,
                reason: REFUSED_LOW_DISK,
            });
        }
        Ok(())
    }

    /// Forgets everything known of the logs (after a reset moved the tree away).
    pub fn forget_logs(&mut self) {
        self.logs.clear();
        self.fans_ready = [false; 256];
    }

    /// The highest epoch among the verified blocks of `app`'s log (0 when it has none):
    /// journaled records of that epoch or earlier are already in it.
    pub fn log_max_epoch(&mut self, app: &AppSha) -> Result<u64, StoreError> {
        if let Some(state) = self.logs.get(app) {
            return Ok(state.max_epoch);
        }
        let path = self.data.log_path(app, &self.writer_id);
        let state = self.inspect(&path)?;
        self.remember(app, state);
        Ok(state.max_epoch)
    }

    /// Appends one block holding `records` (sorted by address, non-empty) to `app`'s log.
    /// On error nothing counts twice: the caller keeps the records and retries later.
    pub fn append(
        &mut self,
        app: &AppSha,
        epoch: u64,
        records: &[(u32, AddrStats)],
    ) -> Result<(), StoreError> {
        assert!(!records.is_empty(), "empty append");
        debug_assert!(records.windows(2).all(|w| w[0].0 < w[1].0));
        let path = self.data.log_path(app, &self.writer_id);
        let known = self.logs.get(app).copied();
        let mut state = match known {
            Some(state) => state,
            None if self.ensure_app_dir(app)? => LogState {
                dir_ready: true,
                ..LogState::EMPTY
            },
            None => self.inspect(&path)?,
        };
        if !state.dir_ready {
            self.ensure_app_dir(app)?;
            state.dir_ready = true;
        }
        let fits_one_block = records.len() < block::MAX_RECORDS_PER_BLOCK / 2;
        if state.needs_rewrite || state.blocks + 1 >= compact_limit(app) || !fits_one_block {
            return self.rewrite(app, &path, epoch, records);
        }
        self.block.begin(epoch);
        for (ip, stats) in records {
            self.block.push(*ip, stats);
        }
        let bytes = self.block.finish();
        let result = append_bytes(&path, state.good_len, bytes, self.fsync);
        let written = bytes.len() as u64;
        match result {
            Ok(()) => {
                self.remember(
                    app,
                    LogState {
                        good_len: state.good_len + written,
                        blocks: state.blocks + 1,
                        max_epoch: state.max_epoch.max(epoch),
                        needs_rewrite: false,
                        dir_ready: true,
                    },
                );
                Ok(())
            }
            Err(e) => {
                // Part of the block may be on disk: never append behind it again.
                self.remember(
                    app,
                    LogState {
                        needs_rewrite: true,
                        ..state
                    },
                );
                Err(e)
            }
        }
    }

    fn remember(&mut self, app: &AppSha, state: LogState) {
        if self.logs.len() >= MAX_TRACKED_LOGS && !self.logs.contains_key(app) {
            self.logs.clear();
        }
        self.logs.insert(*app, state);
    }

    /// Learns the state of a log this writer has not touched yet in this process.
    fn inspect(&mut self, path: &Path) -> Result<LogState, StoreError> {
        let state = match scan_log_file(path, |_, _| {})? {
            None => LogState::EMPTY,
            Some(summary) => LogState {
                good_len: summary.good_bytes,
                blocks: summary.blocks as u32,
                max_epoch: summary.max_epoch,
                needs_rewrite: summary.tail != Tail::Clean,
                dir_ready: true,
            },
        };
        if state.needs_rewrite {
            log::warn!(
                "{}: tail after byte {} does not verify; the log will be rewritten without it",
                path.display(),
                state.good_len
            );
        }
        Ok(state)
    }

    /// Merges the log's verified blocks with `records` into a new file and renames it over
    /// the log.
    fn rewrite(
        &mut self,
        app: &AppSha,
        path: &Path,
        epoch: u64,
        records: &[(u32, AddrStats)],
    ) -> Result<(), StoreError> {
        let mut merged: FxHashMap<u32, AddrStats> = records.iter().copied().collect();
        let mut max_epoch = epoch;
        if let Some(summary) = scan_log_file(path, |ip, stats| {
            merged.entry(ip).or_default().merge(&stats);
        })? {
            max_epoch = max_epoch.max(summary.max_epoch);
        }
        let mut merged: Vec<(u32, AddrStats)> = merged.into_iter().collect();
        merged.sort_unstable_by_key(|(ip, _)| *ip);

        let tmp = path.with_extension("log.tmp");
        let result = (|| {
            let mut file = open_new(&tmp)?;
            let mut blocks = 0u32;
            let mut len = 0u64;
            // Leave room for counts split over several records.
            for chunk in merged.chunks(block::MAX_RECORDS_PER_BLOCK / 2) {
                self.block.begin(max_epoch);
                for (ip, stats) in chunk {
                    self.block.push(*ip, stats);
                }
                let bytes = self.block.finish();
                file.write_all(bytes).map_err(io_err("writing", &tmp))?;
                len += bytes.len() as u64;
                blocks += 1;
            }
            // The rename must never expose a file whose data is not on disk yet.
            file.sync_data().map_err(io_err("syncing", &tmp))?;
            fs::rename(&tmp, path).map_err(io_err("renaming into place", path))?;
            Ok(LogState {
                good_len: len,
                blocks,
                max_epoch,
                needs_rewrite: false,
                dir_ready: true,
            })
        })();
        match result {
            Ok(state) => {
                self.remember(app, state);
                Ok(())
            }
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                Err(e)
            }
        }
    }
}

/// Appends `bytes` to the log at `path`, which must be `expected_len` long.
fn append_bytes(
    path: &Path,
    expected_len: u64,
    bytes: &[u8],
    fsync: bool,
) -> Result<(), StoreError> {
    let mut file = OpenOptions::new()
        .append(true)
        .create(true)
        .mode(FILE_MODE)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(io_err("opening", path))?;
    let len = file.metadata().map_err(io_err("inspecting", path))?.len();
    if len != expected_len {
        return Err(StoreError::Io {
            action: "appending to",
            path: path.to_path_buf(),
            source: io::Error::other(format!(
                "log is {len} bytes, expected {expected_len}; another process wrote it"
            )),
        });
    }
    file.write_all(bytes)
        .map_err(io_err("appending to", path))?;
    if fsync {
        file.sync_data().map_err(io_err("syncing", path))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn app(byte: u8) -> AppSha {
        AppSha([byte; 32])
    }

    fn one(ip: u32, count: u64) -> (u32, AddrStats) {
        (
            ip,
            AddrStats {
                count,
                first_seen: 10,
                last_seen: 20,
            },
        )
    }

    #[test]
    fn appends_merge_across_blocks_and_writers() {
        let dir = tempfile::tempdir().unwrap();
        let data = DataDir::new(dir.path());
        data.create().unwrap();
        let mut a = StoreWriter::new(data.clone(), "a", false).unwrap();
        let mut b = StoreWriter::new(data.clone(), "b", false).unwrap();
        a.append(&app(1), 1, &[one(5, 2), one(6, 1)]).unwrap();
        a.append(&app(1), 2, &[one(5, 3)]).unwrap();
        b.append(&app(1), 1, &[one(6, 4)]).unwrap();
        let got = read_app(&data, &app(1)).unwrap().unwrap();
        assert_eq!(got.logs, 2);
        assert_eq!(got.count(), 10);
        assert_eq!(
            got.addrs
                .iter()
                .map(|(ip, s)| (*ip, s.count))
                .collect::<Vec<_>>(),
            vec![(5, 5), (6, 5)]
        );
        assert!(read_app(&data, &app(2)).unwrap().is_none());
    }

    #[test]
    fn compaction_keeps_every_count() {
        let dir = tempfile::tempdir().unwrap();
        let data = DataDir::new(dir.path());
        data.create().unwrap();
        let mut w = StoreWriter::new(data.clone(), "w", false).unwrap();
        for epoch in 1..=(COMPACT_AFTER_BLOCKS as u64 * 3) {
            w.append(&app(3), epoch, &[one(epoch as u32 % 7, 1)])
                .unwrap();
        }
        let got = read_app(&data, &app(3)).unwrap().unwrap();
        assert_eq!(got.count(), COMPACT_AFTER_BLOCKS as u64 * 3);
        assert!(got.blocks < COMPACT_AFTER_BLOCKS as u64);
    }

    #[test]
    fn a_torn_tail_is_skipped_then_repaired_by_the_next_writer() {
        let dir = tempfile::tempdir().unwrap();
        let data = DataDir::new(dir.path());
        data.create().unwrap();
        let mut w = StoreWriter::new(data.clone(), "w", false).unwrap();
        w.append(&app(4), 1, &[one(1, 3)]).unwrap();
        let path = data.log_path(&app(4), "w");
        let mut file = OpenOptions::new().append(true).open(&path).unwrap();
        file.write_all(b"IPEB\x01\x00garbage").unwrap();
        let got = read_app(&data, &app(4)).unwrap().unwrap();
        assert_eq!(got.count(), 3);
        assert_eq!(got.torn.len(), 1);

        let mut again = StoreWriter::new(data.clone(), "w", false).unwrap();
        again.append(&app(4), 2, &[one(2, 4)]).unwrap();
        let got = read_app(&data, &app(4)).unwrap().unwrap();
        assert_eq!(got.count(), 7);
        assert!(got.torn.is_empty());
    }

    #[test]
    fn list_orders_by_count() {
        let dir = tempfile::tempdir().unwrap();
        let data = DataDir::new(dir.path());
        data.create().unwrap();
        let mut w = StoreWriter::new(data.clone(), "w", false).unwrap();
        w.append(&app(1), 1, &[one(1, 1)]).unwrap();
        w.append(&app(2), 1, &[one(1, 9)]).unwrap();
        let list = list_apps(&data).unwrap();
        assert_eq!(
            list,
            vec![
                AppCount {
                    app: app(2),
                    count: 9
                },
                AppCount {
                    app: app(1),
                    count: 1
                }
            ]
        );
    }

    #[test]
    fn host_writer_ids_are_valid_writer_ids() {
        for host in ["", "box", "web-1.example.com", "ünïcode", &"h".repeat(200)] {
            for prefix in ["", "api-"] {
                let id = writer_id_for_host(prefix, host);
                assert!(id.starts_with(prefix), "{id}");
                validate_writer_id(&id).unwrap();
            }
        }
        assert_eq!(
            writer_id_for_host("api-", "web-1.example.com"),
            "api-web-1-example-com"
        );
        assert_eq!(writer_id_for_host("", ""), "localhost");
    }

    #[test]
    fn writer_ids_are_plain_names() {
        for bad in ["", "..", ".hidden", "a/b", "a b", &"x".repeat(65)] {
            assert!(validate_writer_id(bad).is_err(), "{bad:?}");
        }
        validate_writer_id("host-1.example_2").unwrap();
    }
}
