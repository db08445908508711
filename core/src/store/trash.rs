//! `trash/`: what a reset or a forget moved out of the tree, deleted after the move. A
//! rename is what makes a reset or a forget take effect at once, whatever the size of what it
//! removes; the deletion follows on its own, and what a stop interrupts is deleted by the
//! next [`empty_trash`].

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use super::fsio::{create_dir_all, for_each_entry, StoreError};
use super::layout::DataDir;

/// Renames `path` into `data`'s `trash/` under a name no other move, in this process or
/// another, uses (`label` says what it was). `None` when there is nothing at `path`.
pub fn move_to_trash(
    data: &DataDir,
    path: &Path,
    label: &str,
) -> Result<Option<PathBuf>, StoreError> {
    static SEQUENCE: AtomicU64 = AtomicU64::new(0);
    let trash = data.trash_dir();
    create_dir_all(&trash)?;
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let seq = SEQUENCE.fetch_add(1, Ordering::Relaxed);
    let target = trash.join(format!("{label}{nanos}-{}-{seq}", std::process::id()));
    match fs::rename(path, &target) {
        Ok(()) => Ok(Some(target)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(StoreError::Io {
            action: "moving into the trash",
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Moves the whole `events` tree into the trash and puts an empty one in its place: a reset.
/// Returns the moved tree, if there was one.
pub fn move_tree_away(data: &DataDir) -> Result<Option<PathBuf>, StoreError> {
    let events = data.events_dir();
    let moved = move_to_trash(data, &events, "events-")?;
    create_dir_all(&events)?;
    Ok(moved)
}

/// Deletes what was moved to `path` in the trash (a link planted there is removed, never
/// followed); a failure is logged, and the next [`empty_trash`] tries again.
pub fn remove(path: &Path) {
    let removed = match fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) => Err(e),
    };
    match removed {
        Ok(()) => log::debug!("deleted {}", path.display()),
        // Another process emptying the same trash got there first.
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => log::warn!("deleting {}: {e}", path.display()),
    }
}

/// [`remove`] on a thread of its own, so neither the caller nor a shutdown waits for it.
pub fn remove_in_background(path: PathBuf) {
    let spawned = std::thread::Builder::new()
        .name("trash".into())
        .spawn(move || remove(&path));
    if let Err(e) = spawned {
        log::warn!("starting the trash deletion: {e}; it is retried at the next start");
    }
}

/// Deletes, in the background, everything earlier resets and forgets left in the trash.
pub fn empty_trash(data: &DataDir) {
    let listed = for_each_entry(&data.trash_dir(), |entry| {
        remove_in_background(entry.path());
        Ok(())
    });
    if let Err(e) = listed {
        log::warn!("{e}");
    }
}
