//! One writer's side of the file tree: appends a block per app and flush, repairs a log with a
//! bad tail, compacts a log with too many blocks, and keeps new apps within the limits.

use rustc_hash::FxHashMap;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::DirBuilderExt;
use std::path::Path;

use super::backend::AppendBlocks;
use super::fsio::{io_err, open_new, StoreError, DIR_MODE, REFUSED_APP_LIMIT, REFUSED_LOW_DISK};
use super::layout::{validate_writer_id, DataDir};
use super::reader::{count_app_dirs, scan_log_file};
use crate::block::{self, AddrStats, BlockBuilder, Tail};
use crate::wire::AppSha;

/// A log is rewritten as one merged block once it holds this many blocks, so a query reads
/// at most this many blocks per writer however long the app has been sending.
pub const COMPACT_AFTER_BLOCKS: u32 = 64;

/// The writer forgets what it knows of logs beyond this many apps (and re-verifies a log the
/// next time it appends to it), so its bookkeeping stays bounded under a flood of new apps.
pub const MAX_TRACKED_LOGS: usize = 1 << 18;

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

/// Blocks after which `app`'s log is compacted: between half of [`COMPACT_AFTER_BLOCKS`] and
/// all of it, spread by the SHA, so that apps which started together do not all compact in the
/// same flush.
fn compact_limit(app: &AppSha) -> u32 {
    let half = COMPACT_AFTER_BLOCKS / 2;
    half + u32::from(app.0[31]) % half
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
    /// Times the bookkeeping reached [`MAX_TRACKED_LOGS`] and was forgotten.
    tracked_logs_forgotten: u64,
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
            tracked_logs_forgotten: 0,
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

    fn remember(&mut self, app: &AppSha, state: LogState) {
        if self.logs.len() >= MAX_TRACKED_LOGS && !self.logs.contains_key(app) {
            self.logs.clear();
            self.tracked_logs_forgotten += 1;
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

impl AppendBlocks for StoreWriter {
    fn tracked_logs_forgotten(&self) -> u64 {
        self.tracked_logs_forgotten
    }

    /// Forgets everything known of the logs (after a reset moved the tree away).
    fn forget_logs(&mut self) {
        self.logs.clear();
        self.fans_ready = [false; 256];
    }

    /// The highest epoch among the verified blocks of `app`'s log (0 when it has none):
    /// journaled records of that epoch or earlier are already in it.
    fn log_max_epoch(&mut self, app: &AppSha) -> Result<u64, StoreError> {
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
    fn append(
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
}

/// Appends `bytes` to the log at `path`, which must be `expected_len` long.
fn append_bytes(
    path: &Path,
    expected_len: u64,
    bytes: &[u8],
    fsync: bool,
) -> Result<(), StoreError> {
    let mut file = super::fsio::open_append(path)?;
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
    use crate::store::{list_apps, read_app, AppCount};

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
        let mut file = fs::OpenOptions::new().append(true).open(&path).unwrap();
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
            vec![AppCount::new(app(2), 9), AppCount::new(app(1), 1)]
        );
    }
}
