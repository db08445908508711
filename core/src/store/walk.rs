//! Walking the file tree: every app directory under the fan-out directories, every log of an
//! app, and the verified records of one log. The reader, the app index and the writer's
//! limits all walk it through here.

use std::fs;
use std::path::{Path, PathBuf};

use super::fsio::{for_each_entry, map_read, plain_dir, StoreError};
use super::layout::DataDir;
use crate::block::{self, AddrStats, ScanSummary};

/// Scans the log at `path`, calling `on_record` for each verified record. `Ok(None)` when
/// there is no such file.
pub fn scan_log_file(
    path: &Path,
    on_record: impl FnMut(u32, AddrStats),
) -> Result<Option<ScanSummary>, StoreError> {
    let Some(map) = map_read(path)? else {
        return Ok(None);
    };
    Ok(Some(block::scan_log(map.as_ref(), on_record)))
}

/// Counts the app directories under `events/`.
pub(crate) fn count_app_dirs(data: &DataDir) -> Result<u64, StoreError> {
    let mut count = 0;
    for_each_app_dir(data, |_| {
        count += 1;
        Ok(())
    })?;
    Ok(count)
}

/// Calls `each` with every entry of every fan-out directory (two hex digits) under
/// `events/`: the app directories, and whatever else was put there. Fan-out entries that are
/// not plain directories are skipped with a warning: readers do not follow links.
pub(crate) fn for_each_app_dir(
    data: &DataDir,
    mut each: impl FnMut(&fs::DirEntry) -> Result<(), StoreError>,
) -> Result<(), StoreError> {
    for_each_entry(&data.events_dir(), |fan| {
        let path = fan.path();
        let name = fan.file_name();
        let is_fan = name.len() == 2 && name.as_encoded_bytes().iter().all(u8::is_ascii_hexdigit);
        if !is_fan {
            // The writers' app indexes (`index/`), or something no writer made.
            return Ok(());
        }
        if let Err(e) = plain_dir(&path) {
            log::warn!("{e}");
            return Ok(());
        }
        for_each_entry(&path, &mut each).map(drop)
    })
    .map(drop)
}

/// Calls `each` with the path of every `.log` file in the app directory `dir` (none when it
/// does not exist).
pub(crate) fn for_each_log(
    dir: &Path,
    mut each: impl FnMut(PathBuf) -> Result<(), StoreError>,
) -> Result<(), StoreError> {
    for_each_entry(dir, |entry| {
        let path = entry.path();
        if path.extension().and_then(|e| e.to_str()) != Some("log") {
            return Ok(());
        }
        each(path)
    })
    .map(drop)
}
