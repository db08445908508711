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
//!
//! The rooms: [`layout`] (paths, the layout marker, writer ids and their locks), [`fsio`]
//! (no-follow opens, atomic replacement, the directory walker, [`StoreError`]), [`reader`]
//! ([`read_app`], [`list_apps`]) and [`writer`] ([`StoreWriter`]: append, repair, compaction,
//! limits on new apps). The receiver, the query CLI and the API reach the data through the
//! [`Store`] and [`AppendBlocks`] traits, which the file tree implements, so another backend
//! can sit beside it.

pub mod fsio;
pub mod layout;
pub mod reader;
pub mod writer;

pub use crate::block::AddrStats;
pub(crate) use fsio::io_err;
pub use fsio::{
    create_dir_all, open_append, open_read, open_read_write, open_write_existing, plain_dir,
    read_file, write_atomic, StoreError, DIR_MODE, FILE_MODE, REFUSED_APP_LIMIT, REFUSED_LOW_DISK,
    REFUSED_NOT_A_DIRECTORY, REFUSED_NOT_A_FILE,
};
pub use layout::{
    host_writer_id, validate_writer_id, writer_id_for_host, DataDir, WriterLock, LAYOUT_VERSION,
    MAX_WRITER_ID_BYTES,
};
pub use reader::{list_apps, max_epoch_of_writer, read_app, scan_log_file, AppCount, AppData};
pub use writer::{StoreLimits, StoreWriter, COMPACT_AFTER_BLOCKS, MAX_TRACKED_LOGS};

use crate::wire::AppSha;

/// Where the events are kept, as every binary reads them: one app's data merged over all
/// writers, and every app with its count. The file tree ([`DataDir`]) is one; another backend
/// (object storage) implements the same.
pub trait Store {
    /// Reads and merges every writer's data of `app`. `Ok(None)` when the store has never
    /// seen the app.
    fn read_app(&self, app: &AppSha) -> Result<Option<AppData>, StoreError>;

    /// Every app in the store with its count, most events first (ties by SHA).
    fn list_apps(&self) -> Result<Vec<AppCount>, StoreError>;
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

    /// The highest epoch among the verified blocks this writer holds for `app` (0 when none):
    /// journaled records of that epoch or earlier are already stored.
    fn log_max_epoch(&mut self, app: &AppSha) -> Result<u64, StoreError>;

    /// Forgets everything known of the stored data (after a reset moved it away).
    fn forget_logs(&mut self);

    /// Times the writer's bookkeeping reached its bound and was forgotten (a counter for
    /// operators; 0 for a backend without such a bound).
    fn tracked_logs_forgotten(&self) -> u64 {
        0
    }
}

impl Store for DataDir {
    fn read_app(&self, app: &AppSha) -> Result<Option<AppData>, StoreError> {
        reader::read_app(self, app)
    }

    fn list_apps(&self) -> Result<Vec<AppCount>, StoreError> {
        reader::list_apps(self)
    }
}
