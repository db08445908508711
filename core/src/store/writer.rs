//! One writer's side of the file tree: appends a run per app and flush, keeps the app index,
//! and hands repair and compaction to [`super::run`], limits to [`super::limits`] and what it
//! knows of each log to [`super::log_state`].

use std::path::Path;
use std::thread;

use super::backend::{AppendBlocks, Appended, Runs, StoreCounters};
use super::create::{create_logs, Created, Target};
use super::fsio::StoreError;
use super::index::IndexWriter;
use super::layout::{validate_writer_id, DataDir};
use super::limits::{admit, AppDirs, StoreLimits};
use super::log_state::{LogState, TrackedLogs};
use super::run::{append_run, rewrite_log, run_bytes};
use crate::block::{AddrStats, BlockBuilder};
use crate::wire::AppSha;

/// Appends blocks to one writer's logs, repairing and compacting them as it goes, keeps its
/// app index ([`super::index`]) and the limits on new apps and addresses.
///
/// It never truncates a log in place: a log with a bad tail, or with a tail as large as its
/// base, is rewritten beside itself and renamed over, so concurrent readers stay correct.
#[derive(Debug)]
pub struct StoreWriter {
    data: DataDir,
    writer_id: String,
    logs: TrackedLogs,
    dirs: AppDirs,
    block: BlockBuilder,
    fsync: bool,
    /// Logs are compacted when their tail has grown; off for the last flush before exit.
    compaction: bool,
    counters: StoreCounters,
    /// Events refused by `max_addresses_per_app` since the caller last asked.
    refused_addresses: u64,
    index: IndexWriter,
    /// Reusable buffers for the address limit.
    admitted: Vec<(u32, AddrStats)>,
    /// Threads that create the logs of new apps ([`super::create`]).
    create_threads: usize,
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
            logs: TrackedLogs::default(),
            dirs: AppDirs::default(),
            block: BlockBuilder::default(),
            fsync,
            compaction: true,
            counters: StoreCounters::default(),
            refused_addresses: 0,
            index,
            admitted: Vec::new(),
            create_threads: thread::available_parallelism().map_or(1, |n| n.get().min(4)),
        })
    }

    /// Sets the limits on new apps; with a `max_apps` limit, counts the apps already stored.
    pub fn set_limits(&mut self, limits: StoreLimits) -> Result<(), StoreError> {
        self.dirs.set_limits(&self.data, limits)
    }

    /// What this writer has appended and rewritten so far.
    pub fn counters(&self) -> StoreCounters {
        self.counters
    }

    /// The state of `app`'s log, creating its directory when the app is new.
    fn log_state(&mut self, app: &AppSha, path: &Path) -> Result<LogState, StoreError> {
        let mut state = match self.logs.get(app) {
            Some(state) => state,
            None if self.dirs.ensure_app_dir(&self.data, app)? => LogState::created(),
            None => LogState::read(path)?,
        };
        if !state.dir_ready {
            self.dirs.ensure_app_dir(&self.data, app)?;
            state.dir_ready = true;
        }
        Ok(state)
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
        let records = match self.dirs.limits.max_addresses_per_app {
            Some(max) => {
                refused = admit(&path, &mut state, records, max, &mut admitted)?;
                &admitted[..]
            }
            None => records,
        };
        let result = if records.is_empty() {
            self.logs.remember(app, state);
            Ok(())
        } else {
            let written = self.write_run(app, &path, epoch, records, state);
            if written.is_ok() {
                self.index.addresses(app, records.iter().map(|(ip, _)| *ip));
            }
            written
        };
        self.admitted = admitted;
        result.map(|()| refused)
    }

    /// Writes `records` to the log at `path` as one run: appended to its end, or merged with
    /// it into a new base when it needs repair or compaction. Remembers the log's new state,
    /// and on error what is then known of it.
    fn write_run(
        &mut self,
        app: &AppSha,
        path: &Path,
        epoch: u64,
        records: &[(u32, AddrStats)],
        state: LogState,
    ) -> Result<(), StoreError> {
        let bytes = run_bytes(records.len());
        let rewrite =
            state.needs_rewrite || (self.compaction && state.wants_compaction(app, bytes));
        let (next, result) = if rewrite {
            match rewrite_log(path, &mut self.block, epoch, records) {
                Ok(new) => {
                    self.counters.rewritten_bytes += new.good_len;
                    self.counters.rewrites += 1;
                    (new, Ok(()))
                }
                Err(e) => (state, Err(e)),
            }
        } else {
            match append_run(path, &state, &mut self.block, epoch, records, self.fsync) {
                Ok((written, events)) => {
                    self.counters.appended_bytes += written;
                    (state.appended(written, events, epoch), Ok(()))
                }
                Err(e) => (state.torn(), Err(e)),
            }
        };
        self.logs.remember(app, next);
        result
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

impl StoreWriter {
    /// Writes the apps of `runs` that are new to the store on several threads
    /// ([`create_logs`]) and learns their logs; fills their entries of `results` and leaves
    /// the others (known apps, apps a limit may refuse, apps whose directory exists) `None`.
    fn create_new_apps(
        &mut self,
        epoch: u64,
        runs: &Runs,
        results: &mut [Option<Result<Appended, StoreError>>],
    ) {
        let max_addresses = self.dirs.limits.max_addresses_per_app;
        let mut fresh = Vec::new();
        for (i, (app, records)) in runs.iter().enumerate() {
            let within = max_addresses.is_none_or(|max| records.len() as u64 <= max);
            if within
                && self.logs.get(app).is_none()
                && matches!(self.dirs.may_create(&self.data, app), Ok(true))
            {
                fresh.push(i);
            }
        }
        let target = Target {
            data: &self.data,
            dirs: &self.dirs,
            writer_id: &self.writer_id,
        };
        let outcomes = create_logs(
            &target,
            epoch,
            self.fsync,
            runs,
            &fresh,
            self.create_threads,
        );
        for (i, outcome) in fresh.into_iter().zip(outcomes) {
            let (app, records) = runs.get(i);
            results[i] = match outcome {
                Created::Ordinary => None,
                Created::New { written, events } => {
                    let mut state = LogState::created();
                    if max_addresses.is_some() {
                        state.distinct = records.len() as u64;
                    }
                    self.counters.appended_bytes += written;
                    self.logs
                        .remember(app, state.appended(written, events, epoch));
                    self.index.count(app, events);
                    self.index.addresses(app, records.iter().map(|(ip, _)| *ip));
                    Some(Ok(Appended::default()))
                }
                Created::Failed(e) => {
                    self.logs.remember(app, LogState::created().torn());
                    Some(Err(e))
                }
            };
        }
    }
}

impl AppendBlocks for StoreWriter {
    /// New apps are created on several threads; the rest are appended one by one, in order.
    fn append_runs(&mut self, epoch: u64, runs: &Runs) -> Vec<Result<Appended, StoreError>> {
        let mut results: Vec<Option<Result<Appended, StoreError>>> = Vec::new();
        results.resize_with(runs.len(), || None);
        if self.index.in_flush() {
            self.create_new_apps(epoch, runs, &mut results);
        }
        results
            .into_iter()
            .zip(runs.iter())
            .map(|(done, (app, records))| {
                done.unwrap_or_else(|| self.append_one(app, epoch, records))
            })
            .collect()
    }

    fn tracked_logs_forgotten(&self) -> u64 {
        self.logs.forgotten()
    }

    /// Forgets everything known of the logs (after a reset moved the tree away).
    fn forget_logs(&mut self) {
        self.logs.clear();
        self.dirs.forget();
        self.index.forget();
    }

    fn forget_app(&mut self, app: &AppSha) -> Result<(), StoreError> {
        if self.logs.remove(app) || self.data.app_dir(app).is_dir() {
            // The directory goes with the app: one fewer app against `max_apps`.
            self.dirs.removed_one();
        }
        // A begin with no counts after it: readers read the app's log (gone) themselves.
        self.index
            .begin(&self.data, &self.writer_id, std::slice::from_ref(app))?;
        self.index.end()
    }

    /// The highest epoch among the verified blocks of `app`'s log (0 when it has none):
    /// journaled records of that epoch or earlier are already in it.
    fn log_max_epoch(&mut self, app: &AppSha) -> Result<u64, StoreError> {
        if let Some(state) = self.logs.get(app) {
            return Ok(state.max_epoch);
        }
        let path = self.data.log_path(app, &self.writer_id);
        let state = LogState::read(&path)?;
        self.logs.remember(app, state);
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
        self.dirs.close_fans();
        self.index.end()
    }

    fn set_compaction(&mut self, on: bool) {
        self.compaction = on;
    }

    fn store_counters(&self) -> StoreCounters {
        self.counters
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block;
    use crate::store::{list_apps, read_app, AppCount, COMPACT_AFTER_BLOCKS};
    use std::fs;
    use std::io::Write;

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
