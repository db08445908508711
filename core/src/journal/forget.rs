//! Removing one app from the journal of a writer that is not running: what forgetting an app
//! ([`crate::forget`]) does to a stopped receiver's accepted records.

use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::{
    batch_bytes, encode_batch, encode_header, stream, Header, JournalError, JOURNAL_HEADER_BYTES,
};
use crate::store::fsio::{io_err, open_new, open_read, sync_dir};
use crate::wire::AppSha;

/// Removes every record of `app` from the journal at `path`, for a writer that is not running
/// (the caller holds its lock): one app forgotten ([`crate::forget`]) must not come back when
/// that writer replays its journal, nor be counted by readers meanwhile. The journal is
/// written anew beside itself, streaming one batch at a time, and renamed over, so a crash
/// leaves the old journal or the new one, never a mix. The header's epoch is kept. Returns
/// the records removed (0: the file was not touched).
pub fn drop_app(path: &Path, app: &AppSha) -> Result<u64, JournalError> {
    drop_records(path, |record_app| record_app == app)
}

/// Removes every record from the journal at `path`, for a writer that is not running (the
/// caller holds its lock): what a reset does to a stopped receiver's accepted records, which
/// must neither be counted by readers after it nor replayed by the writer's next start.
/// Returns the records removed (0: the file was not touched).
pub fn drop_all(path: &Path) -> Result<u64, JournalError> {
    drop_records(path, |_| true)
}

/// Rewrites the journal at `path` without the records whose app is `selected`; see
/// [`drop_app`].
fn drop_records(path: &Path, selected: impl Fn(&AppSha) -> bool) -> Result<u64, JournalError> {
    let Some(file) = open_read(path)? else {
        return Ok(0);
    };
    let len = file
        .metadata()
        .map_err(io_err("inspecting journal", path))?
        .len();
    let Some(header) = Header::read(&file, len, path)? else {
        return Ok(0);
    };
    let mut matching = 0u64;
    stream(&file, header.committed, path, |_, records| {
        matching += records.iter().filter(|r| selected(&r.app)).count() as u64;
    })?;
    if matching == 0 {
        return Ok(0);
    }
    let tmp = path.with_extension("forget.tmp");
    let out = open_new(&tmp)?;
    let mut pos = JOURNAL_HEADER_BYTES as u64;
    let mut failed: Option<io::Error> = None;
    let mut kept = Vec::new();
    let mut body = Vec::new();
    stream(&file, header.committed, path, |epoch, records| {
        if failed.is_some() {
            return;
        }
        kept.clear();
        kept.extend(records.iter().filter(|r| !selected(&r.app)).cloned());
        if kept.is_empty() {
            return;
        }
        body.clear();
        body.resize(batch_bytes(kept.len()), 0);
        encode_batch(&mut body, epoch, &kept);
        match out.write_all_at(&body, pos) {
            Ok(()) => pos += body.len() as u64,
            Err(e) => failed = Some(e),
        }
    })?;
    let mut head = vec![0u8; JOURNAL_HEADER_BYTES];
    encode_header(&mut head, pos - JOURNAL_HEADER_BYTES as u64, header.epoch);
    let written = match failed {
        Some(e) => Err(e),
        None => out
            .write_all_at(&head, 0)
            .and_then(|()| out.sync_data())
            .and_then(|()| std::fs::rename(&tmp, path)),
    };
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(io_err("rewriting journal", path)(e).into());
    }
    if let Some(dir) = path.parent() {
        sync_dir(dir)?;
    }
    Ok(matching)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::tests::{records, replayed};
    use crate::journal::{Journal, MIN_JOURNAL_BYTES};

    #[test]
    fn dropping_an_app_keeps_every_other_record_and_the_epoch() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal");
        let mut journal = Journal::open(&path, MIN_JOURNAL_BYTES).unwrap();
        journal.begin_epoch(6, false).unwrap();
        assert!(journal.append(7, &records(5)));
        assert!(journal.append(7, &records(1)));
        drop(journal);
        let gone = AppSha([0; 32]);
        assert_eq!(drop_app(&path, &gone).unwrap(), 2);
        assert_eq!(drop_app(&path, &gone).unwrap(), 0, "nothing left to drop");
        let journal = Journal::open(&path, MIN_JOURNAL_BYTES).unwrap();
        assert_eq!(journal.recorded_epoch(), 6);
        assert_eq!(replayed(&journal), vec![(7, records(5)[1..].to_vec())]);
    }
}
