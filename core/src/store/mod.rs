//! The SHA-keyed file tree: where every binary finds the data.
//!
//! ```text
//! <data-dir>/
//!   LAYOUT                                  "ipevent-store 1": the layout version
//!   events/<sha[0..2]>/<sha>/<writer-id>.log   one log of blocks per app and writer
//!   events/index/<writer-id>.idx            each writer's app index ([`index`])
//!   events/addr/<writer-id>/<seq>.run       each writer's address index ([`addr_index`])
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
//! (no-follow opens, atomic replacement, the directory walker, [`StoreError`]), [`walk`]
//! (every app directory, every log, one log's records), [`reader`] ([`read_app`],
//! [`list_apps`]), [`writer`] ([`StoreWriter`]: the append path), `create` (new apps' logs made on several threads), [`log_state`]
//! (what the writer knows of each log), [`run`] (writing a run: appended, or a rewrite for
//! compaction and repair), [`limits`] (on new apps and on addresses per app), [`trash`] (what a reset or a forget moved away, deleted after), [`compact`] (a
//! log's runs, when to compact, the merge), [`index`] (each writer's app index, for
//! `list`), [`addr_index`] (each writer's address index, for `ip`) and [`changes`] (following the indexes as they grow, for `watch`). The receiver, the query CLI and the API reach the data through the [`Store`]
//! and [`AppendBlocks`] traits ([`backend`]), which the file tree implements; the object store
//! (`ipevent-store-s3`) implements [`Store`] beside it.

pub mod addr_index;
pub mod backend;
pub mod changes;
pub mod compact;
mod create;
pub mod fsio;
pub mod index;
pub mod layout;
pub mod limits;
pub mod log_state;
pub mod reader;
pub mod run;
pub mod trash;
pub mod walk;
pub mod writer;

pub use crate::block::AddrStats;
pub use backend::{
    AppCount, AppData, AppendBlocks, Appended, ChangeFeed, Runs, Store, StoreCounters,
};
pub use compact::COMPACT_AFTER_BLOCKS;
pub use fsio::{
    create_dir_all, for_each_entry, open_append, open_read, open_read_write, open_write_existing,
    plain_dir, read_file, sync_dir, write_atomic, StoreError, DIR_MODE, FILE_MODE,
    REFUSED_APP_LIMIT, REFUSED_LOW_DISK, REFUSED_NOT_A_DIRECTORY, REFUSED_NOT_A_FILE,
};
pub use layout::{
    host_writer_id, validate_writer_id, writer_id_for_host, DataDir, WriterLock, LAYOUT_VERSION,
    MAX_WRITER_ID_BYTES,
};
pub use limits::{StoreLimits, REFUSED_ADDRESS_LIMIT};
pub use log_state::MAX_TRACKED_LOGS;
pub use reader::{list_apps, max_epoch_of_writer, read_app, Snapshot, StoppedJournals};
pub use walk::scan_log_file;
pub use writer::StoreWriter;
