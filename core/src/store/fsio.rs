//! File operations the store trusts: no-follow opens, atomic replacement, the directory
//! walker, and [`StoreError`], which names what was being done and with which path.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::wire::AppSha;

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
    #[error("{path}: unsupported store layout {found:?} (this build reads layout {expected})")]
    Layout {
        /// The LAYOUT file.
        path: PathBuf,
        /// What it said.
        found: String,
        /// The layout version this build reads.
        expected: u32,
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
    #[error("{0}: not a plain directory; refusing to go through it")]
    NotADirectory(PathBuf),
    /// A path in the tree is not the regular file it should be (a directory or a symlink
    /// planted where a log belongs).
    #[error("{0}: not a regular file; refusing to read or write through it")]
    NotAFile(PathBuf),
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
    /// Another backend behind [`Store`](super::Store) (object storage) failed; the message
    /// names what was being done and where, never a credential.
    #[error("{0}")]
    Backend(String),
    /// The backend does not offer this operation; the message says which and where.
    #[error("{0}")]
    Unsupported(String),
}

/// [`StoreError::Refused`] reason: `--max-apps` reached.
pub const REFUSED_APP_LIMIT: &str = "app_limit";
/// [`StoreError::Refused`] reason: free space or inodes below the threshold.
pub const REFUSED_LOW_DISK: &str = "low_disk";

/// [`StoreError::refused_reason`] of [`StoreError::NotADirectory`]: something planted in the
/// tree where an app's directory belongs.
pub const REFUSED_NOT_A_DIRECTORY: &str = "not_a_directory";

/// [`StoreError::refused_reason`] of [`StoreError::NotAFile`]: something planted in the tree
/// where an app's log belongs.
pub const REFUSED_NOT_A_FILE: &str = "not_a_file";

impl StoreError {
    /// The limit that refused a new app, if that is what this is.
    pub fn refused_reason(&self) -> Option<&'static str> {
        match self {
            StoreError::Refused { reason, .. } => Some(reason),
            StoreError::NotADirectory(_) => Some(REFUSED_NOT_A_DIRECTORY),
            StoreError::NotAFile(_) => Some(REFUSED_NOT_A_FILE),
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

/// Options for every open of the store: a symlink at the path is never followed
/// (`O_NOFOLLOW`), the descriptor does not leak into child processes (`O_CLOEXEC`), a file
/// created gets [`FILE_MODE`]; `flags` are added.
fn no_follow(flags: libc::c_int) -> OpenOptions {
    let mut options = OpenOptions::new();
    options
        .mode(FILE_MODE)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | flags);
    options
}

/// `file`, opened at `path`, when it is a regular file; [`StoreError::NotAFile`] otherwise.
fn regular_file(file: File, path: &Path) -> Result<File, StoreError> {
    let meta = file.metadata().map_err(io_err("inspecting", path))?;
    if !meta.is_file() {
        return Err(StoreError::NotAFile(path.to_path_buf()));
    }
    Ok(file)
}

/// Creates (or truncates) a file without following a symlink at `path`.
pub(crate) fn open_new(path: &Path) -> Result<File, StoreError> {
    no_follow(0)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(io_err("creating", path))
}

/// Opens a regular file for reading without following a symlink. `Ok(None)` when it does not
/// exist; [`StoreError::NotAFile`] when a symlink, a directory or anything else is there.
pub fn open_read(path: &Path) -> Result<Option<File>, StoreError> {
    let file = match no_follow(libc::O_NONBLOCK).read(true).open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            return Err(StoreError::NotAFile(path.to_path_buf()))
        }
        Err(e) => return Err(io_err("opening", path)(e)),
    };
    regular_file(file, path).map(Some)
}

/// Maps the regular file at `path` read-only, opened as [`open_read`] opens it. `Ok(None)`
/// when it does not exist.
pub(crate) fn map_read(path: &Path) -> Result<Option<crate::sys::Mapped>, StoreError> {
    let Some(file) = open_read(path)? else {
        return Ok(None);
    };
    crate::sys::map_read_only(&file)
        .map(Some)
        .map_err(io_err("mapping", path))
}

/// Flushes `dir` itself to disk (without following a symlink), so that files created or
/// renamed in it survive a power loss.
pub fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    let file = no_follow(libc::O_DIRECTORY)
        .read(true)
        .open(dir)
        .map_err(io_err("opening", dir))?;
    file.sync_all().map_err(io_err("syncing", dir))
}

/// Checks that `dir` is a plain directory, not a symlink to one: readers refuse links exactly
/// as writers do. `Ok(false)` when it does not exist.
pub fn plain_dir(dir: &Path) -> Result<bool, StoreError> {
    match fs::symlink_metadata(dir) {
        Ok(meta) if meta.is_dir() => Ok(true),
        Ok(_) => Err(StoreError::NotADirectory(dir.to_path_buf())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(io_err("inspecting", dir)(e)),
    }
}

/// Opens a file for reading and writing, creating it if missing, without following a symlink.
pub fn open_read_write(path: &Path) -> Result<File, StoreError> {
    no_follow(0)
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(io_err("opening", path))
}

/// Opens a regular file for appending, creating it if missing, without following a symlink;
/// [`StoreError::NotAFile`] when something else is there.
pub fn open_append(path: &Path) -> Result<File, StoreError> {
    let file = no_follow(libc::O_NONBLOCK)
        .append(true)
        .create(true)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP | libc::EISDIR | libc::ENXIO) => {
                StoreError::NotAFile(path.to_path_buf())
            }
            _ => io_err("opening", path)(e),
        })?;
    regular_file(file, path)
}

/// Creates a file for appending, failing if anything is at `path` already (no symlink is
/// followed): for a log whose directory was just made.
pub fn open_create_new(path: &Path) -> Result<File, StoreError> {
    no_follow(0)
        .append(true)
        .create_new(true)
        .open(path)
        .map_err(io_err("creating", path))
}

/// Opens the directory at `path` (for [`create_dir_in`] and [`create_new_in`]), refusing a
/// symlink there as every open of the store does.
pub(crate) fn open_dir(path: &Path) -> Result<File, StoreError> {
    no_follow(libc::O_DIRECTORY)
        .read(true)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP | libc::ENOTDIR) => StoreError::NotADirectory(path.to_path_buf()),
            _ => io_err("opening", path)(e),
        })
}

/// Makes the directory `name` (one component) inside the open directory `dir`, with
/// [`DIR_MODE`]: no path above `dir` is walked again.
pub(crate) fn create_dir_in(dir: &File, name: &std::ffi::CStr) -> io::Result<()> {
    crate::sys::mkdir_at(dir, name, DIR_MODE)
}

/// [`open_create_new`] of `name`, relative to the open directory `dir`: created for
/// appending, failing if anything is there, no symlink followed.
pub(crate) fn create_new_in(dir: &File, name: &std::ffi::CStr) -> io::Result<File> {
    let flags = libc::O_WRONLY
        | libc::O_APPEND
        | libc::O_CREAT
        | libc::O_EXCL
        | libc::O_NOFOLLOW
        | libc::O_CLOEXEC;
    crate::sys::open_at(dir, name, flags, FILE_MODE)
}

/// Reads a whole (small) file without following a symlink. `Ok(None)` when it does not exist.
pub fn read_file(path: &Path) -> Result<Option<Vec<u8>>, StoreError> {
    use std::io::Read;
    let Some(mut file) = open_read(path)? else {
        return Ok(None);
    };
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)
        .map_err(io_err("reading", path))?;
    Ok(Some(bytes))
}

/// Opens an existing file for writing in place without following a symlink.
pub fn open_write_existing(path: &Path) -> Result<File, StoreError> {
    no_follow(0)
        .write(true)
        .open(path)
        .map_err(io_err("opening", path))
}

/// Calls `each` with every entry of the directory `dir`, and says whether `dir` exists (a
/// missing directory has no entries). Every listing of the tree goes through here.
pub fn for_each_entry(
    dir: &Path,
    mut each: impl FnMut(&fs::DirEntry) -> Result<(), StoreError>,
) -> Result<bool, StoreError> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(io_err("listing", dir)(e)),
    };
    for entry in entries {
        each(&entry.map_err(io_err("listing", dir))?)?;
    }
    Ok(true)
}
