//! Reading the journals of writers that are not running, without changing them: what a
//! stopped receiver accepted and had not yet written to its logs, which its next start
//! replays. The store's reader counts it, so a query never under-reports while a receiver is
//! down.

use std::fs;
use std::path::Path;

use super::{stream, Header, JournalError, Replayed};
use crate::aggregate::Record;
use crate::store::fsio::{io_err, open_read};
use crate::store::layout::DataDir;

/// Reads the journal at `path` without changing it (for queries about a writer that is not
/// running): calls `each` with every verified batch. `Ok(None)` when there is no journal or it
/// holds nothing.
pub fn read(
    path: &Path,
    each: impl FnMut(u64, &[Record]),
) -> Result<Option<Replayed>, JournalError> {
    let Some(file) = open_read(path)? else {
        return Ok(None);
    };
    let len = file
        .metadata()
        .map_err(io_err("inspecting journal", path))?
        .len();
    let Some(header) = Header::read(&file, len, path)? else {
        return Ok(None);
    };
    stream(&file, header.committed, path, each).map(Some)
}

/// Calls `each` with every record still in the journal of a writer that is not running
/// (`writer id, epoch, record`): events it accepted and had not written to its logs when it
/// stopped, which its next start replays. Journals are only read, never changed. A journal
/// that cannot be read is skipped with a warning.
pub fn for_each_stopped_record(data: &DataDir, mut each: impl FnMut(&str, u64, &Record)) {
    let Ok(ids) = data.writer_ids() else {
        return;
    };
    for id in ids {
        let path = data.journal_path(&id);
        // Most writers have no journal (the API) or are running: look before probing the lock.
        match fs::symlink_metadata(&path) {
            Ok(meta) if meta.is_file() && meta.len() > 0 => {}
            _ => continue,
        }
        if data.writer_running(&id) {
            continue;
        }
        let result = read(&path, |epoch, records| {
            for record in records {
                each(&id, epoch, record);
            }
        });
        if let Err(e) = result {
            log::warn!("not counting the journal of stopped writer {id}: {e}");
        }
    }
}
