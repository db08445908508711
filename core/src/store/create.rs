//! Creating the logs of apps new to the store on several threads at once.
//!
//! A flush that meets many new apps spends most of its time in the kernel making two inodes
//! per app (the app's directory and its log). Those calls touch no shared state of the
//! writer, so [`create_logs`] spreads them, with the encoding of each first run, over a few
//! threads; what the writer knows of the logs is updated afterwards, on its own thread, in
//! the order of the flush.

use std::fs;
use std::os::unix::fs::DirBuilderExt;
use std::thread;

use super::backend::Runs;
use super::fsio::{StoreError, DIR_MODE};
use super::layout::DataDir;
use super::log_state::LogState;
use super::run::append_run;
use crate::block::{AddrStats, BlockBuilder};
use crate::wire::AppSha;

/// Below this many new apps in one call, the threads cost more than they save.
pub(super) const MIN_APPS_PER_THREAD: usize = 128;

/// What became of one app given to [`create_logs`].
#[derive(Debug)]
pub(super) enum Created {
    /// Its directory and log were created and hold its first run: `written` bytes holding
    /// `events` events.
    New { written: u64, events: u64 },
    /// Its directory could not be made (most often: it exists, the app is not new); the
    /// writer's ordinary path, which learns the log first and reports errors, takes it.
    Ordinary,
    /// Creating or writing failed; part of the log may exist.
    Failed(StoreError),
}

/// Creates, for each app `runs.get(i)` with `i` in `fresh`, its directory and its log holding
/// its records as one run of `epoch`, on up to `threads` threads. The fan-out directories
/// must exist. Returns one outcome per entry of `fresh`, in its order.
pub(super) fn create_logs(
    data: &DataDir,
    writer_id: &str,
    epoch: u64,
    fsync: bool,
    runs: &Runs,
    fresh: &[usize],
    threads: usize,
) -> Vec<Created> {
    let threads = threads.clamp(1, fresh.len().div_ceil(MIN_APPS_PER_THREAD).max(1));
    let create_one = |block: &mut BlockBuilder, i: usize| {
        let (app, records) = runs.get(i);
        create_log(data, writer_id, app, epoch, records, fsync, block)
    };
    if threads == 1 {
        let mut block = BlockBuilder::default();
        return fresh.iter().map(|&i| create_one(&mut block, i)).collect();
    }
    let per_thread = fresh.len().div_ceil(threads);
    thread::scope(|scope| {
        let workers: Vec<_> = fresh
            .chunks(per_thread)
            .map(|part| {
                scope.spawn(move || {
                    let mut block = BlockBuilder::default();
                    part.iter()
                        .map(|&i| create_one(&mut block, i))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|worker| match worker.join() {
                Ok(outcomes) => outcomes,
                Err(panic) => std::panic::resume_unwind(panic),
            })
            .collect()
    })
}

/// Creates `app`'s directory and its log holding `records` as one run of `epoch`.
fn create_log(
    data: &DataDir,
    writer_id: &str,
    app: &AppSha,
    epoch: u64,
    records: &[(u32, AddrStats)],
    fsync: bool,
    block: &mut BlockBuilder,
) -> Created {
    let dir = data.app_dir(app);
    match fs::DirBuilder::new().mode(DIR_MODE).create(&dir) {
        Ok(()) => {}
        Err(_) => return Created::Ordinary,
    }
    let path = data.log_path(app, writer_id);
    match append_run(&path, &LogState::created(), block, epoch, records, fsync) {
        Ok((written, events)) => Created::New { written, events },
        Err(e) => Created::Failed(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{list_apps, read_app, AppendBlocks, StoreWriter};

    fn app(n: u32) -> AppSha {
        let mut sha = [0x5a; 32];
        sha[..4].copy_from_slice(&n.to_be_bytes());
        sha[0] = n as u8;
        AppSha(sha)
    }

    fn one(ip: u32, count: u64) -> (u32, AddrStats) {
        let stats = AddrStats {
            count,
            first_seen: 10,
            last_seen: 20,
        };
        (ip, stats)
    }

    fn flush(
        w: &mut StoreWriter,
        epoch: u64,
        runs: &Runs,
    ) -> Vec<Result<crate::store::Appended, StoreError>> {
        let apps: Vec<AppSha> = runs.iter().map(|(app, _)| *app).collect();
        w.begin_flush(&apps).unwrap();
        let results = w.append_runs(epoch, runs);
        w.end_flush().unwrap();
        results
    }

    #[test]
    fn new_apps_created_on_several_threads_read_back_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let data = DataDir::new(dir.path());
        data.create().unwrap();
        let mut w = StoreWriter::new(data.clone(), "a", false).unwrap();
        // One app this writer knows, one whose directory another writer made.
        w.append(&app(0), 1, &[one(1, 1)]).unwrap();
        let mut other = StoreWriter::new(data.clone(), "b", false).unwrap();
        other.append(&app(1), 1, &[one(2, 2)]).unwrap();

        let apps = 1000;
        let mut runs = Runs::default();
        for n in 0..apps {
            runs.push(&app(n), &[one(n, 1), one(n + 1, 2)]);
        }
        for epoch in [2, 3] {
            let results = flush(&mut w, epoch, &runs);
            assert_eq!(results.len(), apps as usize);
            assert!(results.iter().all(Result::is_ok));
        }
        for n in 0..apps {
            let got = read_app(&data, &app(n)).unwrap().unwrap();
            let before = match n {
                0 => 1,
                1 => 2,
                _ => 0,
            };
            assert_eq!(got.count(), before + 6, "app {n}");
            assert_eq!(got.logs, if n == 1 { 2 } else { 1 }, "app {n}");
        }
        let listed = list_apps(&data).unwrap();
        assert_eq!(listed.len(), apps as usize);
        let total: u64 = listed.iter().map(|a| a.count).sum();
        assert_eq!(total, u64::from(apps) * 6 + 3);
        assert_eq!(w.log_max_epoch(&app(500)).unwrap(), 3);
    }
}
