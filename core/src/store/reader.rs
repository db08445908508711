//! The one store reader: maps every writer's log of an app, verifies each block and merges
//! what verifies; lists every app with its count.

use rustc_hash::FxHashMap;
use std::fs;
use std::path::{Path, PathBuf};

use super::fsio::{for_each_entry, io_err, open_read, StoreError};
use super::layout::DataDir;
use crate::block::{self, AddrStats, ScanSummary, Tail};
use crate::wire::AppSha;

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
    let mut merged: FxHashMap<u32, AddrStats> = FxHashMap::default();
    let mut out = AppData::default();
    for_each_log(&data.app_dir(app), |path| {
        let scanned = scan_log_file(&path, |ip, stats| {
            merged.entry(ip).or_default().merge(&stats);
        })?;
        let Some(summary) = scanned else {
            return Ok(());
        };
        out.logs += 1;
        out.blocks += summary.blocks;
        if let Tail::Torn { offset, .. } = summary.tail {
            out.torn.push((path, offset));
        }
        Ok(())
    })?;
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
    let mut out = Vec::new();
    for_each_app_dir(data, |app_entry| {
        let Some(app) = app_entry
            .file_name()
            .to_str()
            .and_then(|name| name.parse::<AppSha>().ok())
        else {
            return Ok(());
        };
        let mut count = 0u64;
        let mut logs = 0;
        for_each_log(&app_entry.path(), |log| {
            if let Some(summary) = scan_log_file(&log, |_, _| {})? {
                count += summary.events;
                logs += 1;
            }
            Ok(())
        })?;
        if logs > 0 {
            out.push(AppCount { app, count });
        }
        Ok(())
    })?;
    out.sort_unstable_by(|a, b| b.count.cmp(&a.count).then(a.app.cmp(&b.app)));
    Ok(out)
}

/// The highest epoch among the verified blocks of `writer_id`'s logs (0 when it has none). A
/// log that cannot be read is skipped with a warning: it holds no block a writer could use.
pub fn max_epoch_of_writer(data: &DataDir, writer_id: &str) -> Result<u64, StoreError> {
    let name = format!("{writer_id}.log");
    let mut max_epoch = 0;
    for_each_app_dir(data, |app_entry| {
        match scan_log_file(&app_entry.path().join(&name), |_, _| {}) {
            Ok(Some(summary)) => max_epoch = max_epoch.max(summary.max_epoch),
            Ok(None) => {}
            Err(e) => log::warn!("{e}"),
        }
        Ok(())
    })?;
    Ok(max_epoch)
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

/// Calls `each` with every entry of every fan-out directory under `events/`: the app
/// directories, and whatever else was put there.
fn for_each_app_dir(
    data: &DataDir,
    mut each: impl FnMut(&fs::DirEntry) -> Result<(), StoreError>,
) -> Result<(), StoreError> {
    for_each_entry(&data.events_dir(), |fan| {
        for_each_entry(&fan.path(), &mut each).map(drop)
    })
    .map(drop)
}

/// Calls `each` with the path of every `.log` file in the app directory `dir` (none when it
/// does not exist).
fn for_each_log(
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
