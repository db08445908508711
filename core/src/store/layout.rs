//! Where everything lives in a data dir: the paths of the layout, its version marker, writer
//! ids and their locks.

use std::fs::{self, File};
use std::path::{Path, PathBuf};

use super::fsio::{create_dir_all, for_each_entry, io_err, read_file, write_atomic, StoreError};
use crate::wire::AppSha;

/// Layout version written to `<data-dir>/LAYOUT`.
pub const LAYOUT_VERSION: u32 = 1;
const LAYOUT_FILE: &str = "LAYOUT";
const LAYOUT_PREFIX: &str = "ipevent-store ";

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
        let mut ids = Vec::new();
        for_each_entry(&self.receivers_dir(), |entry| {
            if let Some(name) = entry.file_name().to_str() {
                if validate_writer_id(name).is_ok() {
                    ids.push(name.to_string());
                }
            }
            Ok(())
        })?;
        ids.sort();
        Ok(ids)
    }

    /// Takes `writer_id`'s lock, so that each log has one writer at a time whichever process
    /// (receiver or API) claims the id. Held until the returned value is dropped. A lock held
    /// for a moment by a reader probing it ([`DataDir::writer_running`]) is waited for, up to
    /// [`LOCK_PROBE_WAIT`].
    pub fn lock_writer(&self, writer_id: &str) -> Result<WriterLock, StoreError> {
        validate_writer_id(writer_id)?;
        create_dir_all(&self.receiver_dir(writer_id))?;
        let path = self.lock_path(writer_id);
        let file = super::fsio::open_read_write(&path)?;
        let started = std::time::Instant::now();
        loop {
            match file.try_lock() {
                Ok(()) => return Ok(WriterLock { _file: file }),
                Err(fs::TryLockError::WouldBlock) if started.elapsed() < LOCK_PROBE_WAIT => {
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
                Err(fs::TryLockError::WouldBlock) => {
                    return Err(StoreError::WriterBusy {
                        writer_id: writer_id.to_string(),
                        root: self.root.clone(),
                        lock: path,
                    })
                }
                Err(fs::TryLockError::Error(e)) => return Err(io_err("locking", &path)(e)),
            }
        }
    }

    /// True when a process holds `writer_id`'s lock: a receiver (or the API) runs as that
    /// writer. Probes with a shared lock it drops at once; a writer starting at that moment
    /// waits for it ([`DataDir::lock_writer`]). A lock that cannot be probed counts as held.
    pub fn writer_running(&self, writer_id: &str) -> bool {
        let path = self.lock_path(writer_id);
        match super::fsio::open_read(&path) {
            Ok(Some(file)) => !matches!(file.try_lock_shared(), Ok(())),
            Ok(None) => false,
            Err(_) => true,
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
        let Some(bytes) = read_file(&marker)? else {
            return Ok(false);
        };
        let text = String::from_utf8_lossy(&bytes);
        if text.trim() == format!("{LAYOUT_PREFIX}{LAYOUT_VERSION}") {
            return Ok(true);
        }
        Err(StoreError::Layout {
            path: marker,
            found: text.trim().chars().take(40).collect(),
            expected: LAYOUT_VERSION,
        })
    }
}

/// Longest a starting writer waits for a reader's probe of its lock to end (a probe lasts
/// microseconds; another process running as the same writer holds it for ever).
pub const LOCK_PROBE_WAIT: std::time::Duration = std::time::Duration::from_millis(500);

/// A writer id's lock, released when dropped.
#[derive(Debug)]
pub struct WriterLock {
    _file: File,
}

#[cfg(test)]
mod tests {
    use super::*;

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
