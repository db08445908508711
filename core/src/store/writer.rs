//! One writer's side of the file tree: appends a block per app and flush, repairs a log with a
//! bad tail, compacts a log with too many blocks, and keeps new apps within the limits.

use rustc_hash::FxHashMap;
use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::DirBuilderExt;
use std::path::Path;

use super::backend::AppendBlocks;
use super::compact;
use super::fsio::{
    io_err, open_append, open_create_new, open_new, open_read, StoreError, DIR_MODE,
    REFUSED_APP_LIMIT, REFUSED_LOW_DISK,
};
use super::index::IndexWriter;
use super::layout::{validate_writer_id, DataDir};
use super::reader::count_app_dirs;
use crate::block::{self, AddrStats, BlockBuilder, Tail};
use crate::wire::AppSha;

/// Bounds the runs appended after a log's base before it is compacted: an app's limit is
/// between half of this and one less than all of it ([`compact_limit`]), and the log is
/// rewritten once its tail has that many runs and at least as many bytes as its base
/// ([`compact`]).
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
    /// Most distinct addresses this writer stores for one app; events of further new
    /// addresses are refused ([`REFUSED_ADDRESS_LIMIT`]). `None`: no limit.
    pub max_addresses_per_app: Option<u64>,
}

/// Reason of events refused by [`StoreLimits::max_addresses_per_app`].
pub const REFUSED_ADDRESS_LIMIT: &str = "address_limit";

/// Runs after the base at which `app`'s log may be compacted: between half of
/// [`COMPACT_AFTER_BLOCKS`] and one less than all of it (32 to 63), spread by the SHA, so that apps which started together do not all compact in the
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
    /// Bytes of the base run (what the last rewrite wrote, or the first block).
    base_bytes: u64,
    /// Runs appended after the base, and their bytes: what decides a compaction.
    tail_runs: u32,
    tail_bytes: u64,
    /// Events in the log: what the app index says of it.
    events: u64,
    /// Distinct addresses in the log, or an upper bound when `distinct_exact` is false.
    distinct: u64,
    distinct_exact: bool,
    /// Highest epoch of its blocks: which journaled records it already holds.
    max_epoch: u64,
    /// The tail holds bytes that are no verified block (a failed or torn write): the next
    /// append rewrites the log instead.
    needs_rewrite: bool,
    /// The app's directory is known to exist as a plain directory.
    dir_ready: bool,
    /// The log does not exist yet (its directory was just made): it is created exclusively,
    /// and needs no check of its length.
    is_new: bool,
}

impl LogState {
    /// A log that does not exist yet.
    const EMPTY: LogState = LogState {
        good_len: 0,
        base_bytes: 0,
        tail_runs: 0,
        tail_bytes: 0,
        events: 0,
        distinct: 0,
        distinct_exact: true,
        max_epoch: 0,
        needs_rewrite: false,
        dir_ready: false,
        is_new: false,
    };

    /// True when appending `bytes` more should rewrite the log instead (see [`compact`]).
    fn wants_compaction(&self, app: &AppSha, bytes: u64) -> bool {
        self.tail_runs + 1 >= compact_limit(app) && self.tail_bytes + bytes >= self.base_bytes
    }
}

/// What the writer has done to the store since it started: for the stats, and for tests of
/// the compaction's cost.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreCounters {
    /// Bytes of blocks appended to logs.
    pub appended_bytes: u64,
    /// Bytes written by rewrites (compaction and repair).
    pub rewritten_bytes: u64,
    /// Rewrites done.
    pub rewrites: u64,
}

/// Appends blocks to one writer's logs, repairing and compacting them as it goes, keeps its
/// app index ([`super::index`]) and the limits on new apps and addresses.
///
/// It never truncates a log in place: a log with a bad tail, or with a tail as large as its
/// base, is rewritten beside itself and renamed over, so concurrent readers stay correct.
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
    /// Logs are compacted when their tail has grown; off for the last flush before exit.
    compaction: bool,
    counters: StoreCounters,
    /// Events refused by `max_addresses_per_app` since the caller last asked.
    refused_addresses: u64,
    index: IndexWriter,
    /// Reusable buffers for the address limit.
    admitted: Vec<(u32, AddrStats)>,
}

impl StoreWriter {
    /// A writer for `writer_id` in `data`. With `fsync`, every append is followed by
    /// `fdatasync`, so a completed flush survives a power loss. Opens (or builds) the
    /// writer's app index.
    pub fn new(data: DataDir, writer_id: &str, fsync: bool) -> Result<StoreWriter, StoreError> {
        validate_writer_id(writer_id)?;
        let index = IndexWriter::open(&data, writer_id, fsync)?;
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
            compaction: true,
            counters: StoreCounters::default(),
            refused_addresses: 0,
            index,
            admitted: Vec::new(),
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

    /// What this writer has appended and rewritten so far.
    pub fn counters(&self) -> StoreCounters {
        self.counters
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
        let Some(file) = open_read(path)? else {
            return Ok(LogState::EMPTY);
        };
        let map = crate::sys::map_read_only(&file).map_err(io_err("mapping", path))?;
        let summary = block::scan_log(map.as_ref(), |_, _| {});
        let layout = compact::run_layout(map.as_ref());
        let state = LogState {
            good_len: summary.good_bytes,
            base_bytes: layout.base_bytes,
            tail_runs: layout.tail_runs,
            tail_bytes: layout.tail_bytes,
            events: summary.events,
            distinct: layout.records,
            distinct_exact: layout.tail_runs == 0 && layout.base_bytes == summary.good_bytes,
            max_epoch: summary.max_epoch,
            needs_rewrite: summary.tail != Tail::Clean,
            dir_ready: true,
            is_new: false,
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

    /// The state of `app`'s log, creating its directory when the app is new.
    fn log_state(&mut self, app: &AppSha, path: &Path) -> Result<LogState, StoreError> {
        let mut state = match self.logs.get(app).copied() {
            Some(state) => state,
            None if self.ensure_app_dir(app)? => LogState {
                dir_ready: true,
                is_new: true,
                ..LogState::EMPTY
            },
            None => self.inspect(path)?,
        };
        if !state.dir_ready {
            self.ensure_app_dir(app)?;
            state.dir_ready = true;
        }
        Ok(state)
    }

    /// Applies `max_addresses_per_app` to `records`: addresses the log holds always go in, new
    /// ones (lowest first) while the log has fewer distinct addresses than the limit. Fills
    /// `self.admitted` and returns the events refused. `state.distinct` stays exact once the
    /// log is near the limit, and an upper bound below it.
    fn admit(
        &mut self,
        path: &Path,
        state: &mut LogState,
        records: &[(u32, AddrStats)],
        max: u64,
    ) -> Result<u64, StoreError> {
        self.admitted.clear();
        let offered = records.len() as u64;
        if state.distinct + offered <= max {
            state.distinct += offered;
            state.distinct_exact = state.distinct_exact && state.is_new;
            self.admitted.extend_from_slice(records);
            return Ok(0);
        }
        let file = open_read(path)?;
        let map = match &file {
            Some(file) => Some(crate::sys::map_read_only(file).map_err(io_err("mapping", path))?),
            None => None,
        };
        let log = map.as_ref().map_or(&[][..], |m| m.as_ref());
        if !state.distinct_exact {
            state.distinct = compact::merge(log, &[], |_, _| Ok::<(), ()>(())).unwrap_or(0);
            state.distinct_exact = true;
        }
        let ips: Vec<u32> = records.iter().map(|(ip, _)| *ip).collect();
        let mut known = vec![false; ips.len()];
        compact::mark_known(log, &ips, &mut known);
        let mut refused = 0;
        for (record, known) in records.iter().zip(known) {
            if known {
                self.admitted.push(*record);
            } else if state.distinct < max {
                state.distinct += 1;
                self.admitted.push(*record);
            } else {
                refused += record.1.count;
            }
        }
        Ok(refused)
    }

    /// Appends `records` to `app`'s log as one run (several blocks when it is large), or
    /// rewrites the log when it needs repair or compaction. Returns the events refused by
    /// the address limit (which are not written).
    fn append_records(
        &mut self,
        app: &AppSha,
        epoch: u64,
        records: &[(u32, AddrStats)],
    ) -> Result<u64, StoreError> {
        assert!(!records.is_empty(), "empty append");
        debug_assert!(records.windows(2).all(|w| w[0].0 < w[1].0));
        let path = self.data.log_path(app, &self.writer_id);
        let mut state = self.log_state(app, &path)?;
        let mut refused = 0;
        let mut admitted = std::mem::take(&mut self.admitted);
        let records = match self.limits.max_addresses_per_app {
            Some(max) => {
                refused = self.admit(&path, &mut state, records, max)?;
                std::mem::swap(&mut admitted, &mut self.admitted);
                &admitted[..]
            }
            None => records,
        };
        let result = if records.is_empty() {
            self.remember(app, state);
            Ok(())
        } else {
            let run_bytes = run_bytes(records.len());
            if state.needs_rewrite || (self.compaction && state.wants_compaction(app, run_bytes)) {
                self.rewrite(app, &path, epoch, records, state)
            } else {
                self.append_run(app, &path, epoch, records, state)
            }
        };
        self.admitted = admitted;
        result.map(|()| refused)
    }

    /// Appends `records` as one run to the end of the log.
    fn append_run(
        &mut self,
        app: &AppSha,
        path: &Path,
        epoch: u64,
        records: &[(u32, AddrStats)],
        state: LogState,
    ) -> Result<(), StoreError> {
        let block = &mut self.block;
        let fsync = self.fsync;
        let result = (|| {
            let mut out = RunWriter {
                file: open_for_append(path, &state)?,
                path,
                block,
                epoch,
                len: 0,
                events: 0,
            };
            out.block.begin(epoch);
            for (ip, stats) in records {
                out.push(*ip, stats)?;
            }
            out.finish()?;
            if fsync {
                out.file.sync_data().map_err(io_err("syncing", path))?;
            }
            Ok((out.len, out.events))
        })();
        match result {
            Ok((written, events)) => {
                self.counters.appended_bytes += written;
                let first = state.good_len == 0;
                self.remember(
                    app,
                    LogState {
                        good_len: state.good_len + written,
                        base_bytes: if first { written } else { state.base_bytes },
                        tail_runs: state.tail_runs + u32::from(!first),
                        tail_bytes: state.tail_bytes + if first { 0 } else { written },
                        events: state.events + events,
                        max_epoch: state.max_epoch.max(epoch),
                        needs_rewrite: false,
                        is_new: false,
                        ..state
                    },
                );
                Ok(())
            }
            Err(e) => {
                // Part of the run may be on disk: never append behind it again.
                self.remember(
                    app,
                    LogState {
                        needs_rewrite: true,
                        is_new: false,
                        ..state
                    },
                );
                Err(e)
            }
        }
    }

    /// Merges the log's verified blocks with `records` into a new file, one sorted run, and
    /// renames it over the log. Streams: it holds one block of output, never the log.
    fn rewrite(
        &mut self,
        app: &AppSha,
        path: &Path,
        epoch: u64,
        records: &[(u32, AddrStats)],
        state: LogState,
    ) -> Result<(), StoreError> {
        let file = open_read(path)?;
        let map = match &file {
            Some(file) => Some(crate::sys::map_read_only(file).map_err(io_err("mapping", path))?),
            None => None,
        };
        let log = map.as_ref().map_or(&[][..], |m| m.as_ref());
        let max_epoch = compact::run_layout(log).max_epoch.max(epoch);
        let tmp = path.with_extension("log.tmp");
        let block = &mut self.block;
        let result = (|| {
            let mut out = RunWriter {
                file: open_new(&tmp)?,
                path: &tmp,
                block,
                epoch: max_epoch,
                len: 0,
                events: 0,
            };
            out.block.begin(max_epoch);
            let distinct = compact::merge(log, records, |ip, stats| out.push(ip, stats))?;
            out.finish()?;
            // The rename must never expose a file whose data is not on disk yet.
            out.file.sync_data().map_err(io_err("syncing", &tmp))?;
            fs::rename(&tmp, path).map_err(io_err("renaming into place", path))?;
            Ok(LogState {
                good_len: out.len,
                base_bytes: out.len,
                tail_runs: 0,
                tail_bytes: 0,
                events: out.events,
                distinct,
                distinct_exact: true,
                max_epoch,
                needs_rewrite: false,
                dir_ready: true,
                is_new: false,
            })
        })();
        drop(map);
        match result {
            Ok(new) => {
                self.counters.rewritten_bytes += new.good_len;
                self.counters.rewrites += 1;
                self.remember(app, new);
                Ok(())
            }
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                self.remember(app, state);
                Err(e)
            }
        }
    }

    /// Appends one block holding `records` (sorted by address, non-empty) to `app`'s log and
    /// returns how many events the address limit refused (not written). On error nothing
    /// counts twice: the caller keeps the records and retries later.
    pub fn append_counted(
        &mut self,
        app: &AppSha,
        epoch: u64,
        records: &[(u32, AddrStats)],
    ) -> Result<u64, StoreError> {
        let bracket = !self.index.in_flush();
        if bracket {
            self.index
                .begin(&self.data, &self.writer_id, std::slice::from_ref(app))?;
        }
        let result = self.append_records(app, epoch, records);
        match &result {
            Ok(_) => {
                let events = self.logs.get(app).map_or(0, |s| s.events);
                if events > 0 {
                    self.index.count(app, events);
                }
            }
            Err(StoreError::NotADirectory(_) | StoreError::NotAFile(_)) => self.index.check(app),
            Err(_) => {}
        }
        if bracket {
            let ended = self.index.end();
            result.and_then(|refused| ended.map(|()| refused))
        } else {
            result
        }
    }
}

/// Records per block of a run: half a block, which leaves room for counts split over
/// several records.
const RUN_CHUNK_RECORDS: usize = block::MAX_RECORDS_PER_BLOCK / 2;

/// Bytes of a run of `records` records (without split counts).
fn run_bytes(records: usize) -> u64 {
    let blocks = records.div_ceil(RUN_CHUNK_RECORDS);
    (blocks * block::BLOCK_HEADER_BYTES + records * block::BLOCK_RECORD_BYTES) as u64
}

/// Writes one sorted run, block after block: appended to a log, or into a new file.
struct RunWriter<'a> {
    file: File,
    path: &'a Path,
    block: &'a mut BlockBuilder,
    epoch: u64,
    len: u64,
    events: u64,
}

impl RunWriter<'_> {
    fn push(&mut self, ip: u32, stats: &AddrStats) -> Result<(), StoreError> {
        if self.block.records() >= RUN_CHUNK_RECORDS {
            self.write_block()?;
            self.block.begin_continuing(self.epoch);
        }
        self.block.push(ip, stats);
        self.events += stats.count;
        Ok(())
    }

    fn write_block(&mut self) -> Result<(), StoreError> {
        let bytes = self.block.finish();
        self.file
            .write_all(bytes)
            .map_err(io_err("writing", self.path))?;
        self.len += bytes.len() as u64;
        Ok(())
    }

    fn finish(&mut self) -> Result<(), StoreError> {
        if self.block.records() > 0 {
            self.write_block()?;
        }
        Ok(())
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
        self.index.forget();
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

    /// Appends `records` to `app`'s log (events beyond the address limit are dropped; see
    /// [`StoreWriter::append_counted`] to learn how many).
    fn append(
        &mut self,
        app: &AppSha,
        epoch: u64,
        records: &[(u32, AddrStats)],
    ) -> Result<(), StoreError> {
        let refused = self.append_counted(app, epoch, records)?;
        self.refused_addresses += refused;
        Ok(())
    }

    fn take_refused_addresses(&mut self) -> u64 {
        std::mem::take(&mut self.refused_addresses)
    }

    fn admitted_by_limit(&self) -> &[(u32, AddrStats)] {
        // `append_records` leaves the admitted records here whenever the limit applied.
        &self.admitted
    }

    fn begin_flush(&mut self, apps: &[AppSha]) -> Result<(), StoreError> {
        self.index.begin(&self.data, &self.writer_id, apps)
    }

    fn end_flush(&mut self) -> Result<(), StoreError> {
        self.index.end()
    }

    fn set_compaction(&mut self, on: bool) {
        self.compaction = on;
    }

    fn store_counters(&self) -> StoreCounters {
        self.counters
    }
}

/// Opens the log at `path` for appending: created exclusively when `state` says it is new,
/// otherwise checked to be exactly as long as the writer left it.
fn open_for_append(path: &Path, state: &LogState) -> Result<File, StoreError> {
    if state.is_new {
        return open_create_new(path);
    }
    let file = open_append(path)?;
    let len = file.metadata().map_err(io_err("inspecting", path))?.len();
    if len != state.good_len {
        return Err(StoreError::Io {
            action: "appending to",
            path: path.to_path_buf(),
            source: io::Error::other(format!(
                "log is {len} bytes, expected {}; another process wrote it",
                state.good_len
            )),
        });
    }
    Ok(file)
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

    /// Appends `flushes` runs of `per_flush` new addresses each, then checks the counts.
    fn grow(w: &mut StoreWriter, data: &DataDir, a: &AppSha, flushes: u32, per_flush: u32) {
        for f in 0..flushes {
            let records: Vec<_> = (0..per_flush).map(|i| one(f * per_flush + i, 1)).collect();
            w.append(a, u64::from(f) + 1, &records).unwrap();
        }
        let got = read_app(data, a).unwrap().unwrap();
        assert_eq!(got.count(), u64::from(flushes * per_flush));
        assert_eq!(got.addrs.len() as u32, flushes * per_flush);
    }

    #[test]
    fn compaction_rewrites_each_record_a_logarithmic_number_of_times() {
        let dir = tempfile::tempdir().unwrap();
        let data = DataDir::new(dir.path());
        data.create().unwrap();
        let mut w = StoreWriter::new(data.clone(), "w", false).unwrap();
        // An app that only ever sends new addresses: the log grows with every flush.
        let (flushes, per_flush) = (3000u32, 16u32);
        grow(&mut w, &data, &app(9), flushes, per_flush);
        let c = w.counters();
        let records = f64::from(flushes * per_flush);
        let record_bytes = block::BLOCK_RECORD_BYTES as f64 * records;
        // Each record is rewritten at most log2(n) times...
        assert!(
            (c.rewritten_bytes as f64) <= record_bytes * records.log2(),
            "{c:?}"
        );
        // ...and in fact within twice what was appended.
        assert!(c.rewritten_bytes <= 2 * c.appended_bytes, "{c:?}");
        assert!(c.rewrites >= 2, "{c:?}");
    }

    #[test]
    fn a_log_of_repeated_addresses_stays_short() {
        let dir = tempfile::tempdir().unwrap();
        let data = DataDir::new(dir.path());
        data.create().unwrap();
        let mut w = StoreWriter::new(data.clone(), "w", false).unwrap();
        let same: Vec<_> = (1..=14).map(|ip| one(ip, 1)).collect();
        for epoch in 1..=500 {
            w.append(&app(8), epoch, &same).unwrap();
        }
        let got = read_app(&data, &app(8)).unwrap().unwrap();
        assert_eq!(got.count(), 500 * 14);
        assert!(
            got.blocks < u64::from(COMPACT_AFTER_BLOCKS),
            "{}",
            got.blocks
        );
        let c = w.counters();
        assert!(c.rewritten_bytes <= 2 * c.appended_bytes, "{c:?}");
    }

    #[test]
    fn logs_written_before_run_flags_are_read_and_compacted() {
        let dir = tempfile::tempdir().unwrap();
        let data = DataDir::new(dir.path());
        data.create().unwrap();
        // What an older writer's rewrite left: several blocks of one merged run, flags 0.
        let a = app(7);
        fs::create_dir_all(data.app_dir(&a)).unwrap();
        let mut old = Vec::new();
        let mut builder = BlockBuilder::default();
        for part in 0..40u32 {
            builder.begin(3);
            builder.push(part * 2, &one(0, 5).1);
            builder.push(part * 2 + 1, &one(0, 1).1);
            old.extend_from_slice(builder.finish());
        }
        fs::write(data.log_path(&a, "w"), &old).unwrap();
        let mut w = StoreWriter::new(data.clone(), "w", false).unwrap();
        assert_eq!(w.log_max_epoch(&a).unwrap(), 3);
        for epoch in 4..80 {
            w.append(&a, epoch, &[one(1000 + epoch as u32, 1)]).unwrap();
        }
        let got = read_app(&data, &a).unwrap().unwrap();
        assert_eq!(got.count(), 40 * 6 + 76);
        assert!(w.counters().rewrites >= 1);
        assert_eq!(
            list_apps(&data).unwrap(),
            vec![AppCount::new(a, 40 * 6 + 76)]
        );
    }

    #[test]
    fn the_address_limit_refuses_exactly_the_new_addresses_beyond_it() {
        let dir = tempfile::tempdir().unwrap();
        let data = DataDir::new(dir.path());
        data.create().unwrap();
        let limits = StoreLimits {
            max_addresses_per_app: Some(10),
            ..StoreLimits::default()
        };
        let mut w = StoreWriter::new(data.clone(), "w", false).unwrap();
        w.set_limits(limits).unwrap();
        let a = app(6);
        let ips = |range: std::ops::Range<u32>, count| -> Vec<_> {
            range.map(|ip| one(ip, count)).collect()
        };
        assert_eq!(w.append_counted(&a, 1, &ips(0..6, 1)).unwrap(), 0);
        // 4 of these 8 new addresses fit (the lowest), 4 are refused with their 3 events.
        assert_eq!(w.append_counted(&a, 2, &ips(100..108, 3)).unwrap(), 12);
        // Known addresses always go in; a new one is refused.
        assert_eq!(w.append_counted(&a, 3, &ips(0..3, 2)).unwrap(), 0);
        assert_eq!(w.append_counted(&a, 4, &ips(50..51, 7)).unwrap(), 7);
        // A new writer on the same log knows as much.
        let mut again = StoreWriter::new(data.clone(), "w", false).unwrap();
        again.set_limits(limits).unwrap();
        assert_eq!(
            again
                .append_counted(&a, 5, &[one(5, 1), one(103, 1), one(104, 1)])
                .unwrap(),
            1
        );
        let got = read_app(&data, &a).unwrap().unwrap();
        assert_eq!(got.addrs.len(), 10);
        assert_eq!(got.count(), 6 + 12 + 6 + 2);
    }

    #[test]
    fn list_reads_the_indexes_and_settles_an_unfinished_flush() {
        let dir = tempfile::tempdir().unwrap();
        let data = DataDir::new(dir.path());
        data.create().unwrap();
        let mut a = StoreWriter::new(data.clone(), "a", false).unwrap();
        let mut b = StoreWriter::new(data.clone(), "b", false).unwrap();
        for i in 1..=20u8 {
            a.append(&app(i), 1, &[one(1, u64::from(i))]).unwrap();
        }
        b.append(&app(1), 1, &[one(2, 100)]).unwrap();
        let walked = {
            // The same tree without indexes: every log read.
            fs::rename(data.events_dir().join("index"), dir.path().join("idx")).unwrap();
            let walked = list_apps(&data).unwrap();
            fs::rename(dir.path().join("idx"), data.events_dir().join("index")).unwrap();
            walked
        };
        let indexed = list_apps(&data).unwrap();
        assert_eq!(indexed, walked);
        assert_eq!(indexed[0].count, 101);
        assert_eq!(indexed.len(), 20);

        // A flush that began and died before its counts: the reader reads those logs.
        a.begin_flush(&[app(2), app(30)]).unwrap();
        a.append(&app(2), 2, &[one(9, 1000)]).unwrap();
        a.append(&app(30), 2, &[one(9, 5)]).unwrap();
        drop(a);
        let listed = list_apps(&data).unwrap();
        assert_eq!(listed[0].count, 1002);
        assert!(listed.contains(&AppCount::new(app(30), 5)));
        // The writer settles it when it opens its index again.
        let _a = StoreWriter::new(data.clone(), "a", false).unwrap();
        assert_eq!(list_apps(&data).unwrap(), listed);
        let bytes = fs::read(super::super::index::index_path(&data, "a")).unwrap();
        assert!(super::super::index::read_index(&bytes)
            .0
            .unsettled
            .is_empty());

        // A writer without an index (an older version): every log is read.
        fs::create_dir_all(data.receiver_dir("old")).unwrap();
        fs::create_dir_all(data.app_dir(&app(40))).unwrap();
        let mut builder = BlockBuilder::default();
        builder.begin(1);
        builder.push(1, &one(1, 4).1);
        fs::write(data.log_path(&app(40), "old"), builder.finish()).unwrap();
        let all = list_apps(&data).unwrap();
        assert!(all.contains(&AppCount::new(app(40), 4)));
        assert_eq!(all.len(), listed.len() + 1);
    }
}
