//! Creating the logs of apps new to the store on several threads at once.
//!
//! A flush that meets many new apps spends most of its time in the kernel making two inodes
//! per app (the app's directory and its log). Those calls touch no shared state of the
//! writer, so [`create_logs`] spreads them, with the encoding of each first run, over a few
//! threads; what the writer knows of the logs is updated afterwards, on its own thread, in
//! the order of the flush.
//!
//! A new app costs four system calls: `mkdirat` and `openat` (exclusive, no symlink
//! followed) relative to its open fan-out directory, so the kernel walks one or two path
//! components instead of the whole path from `/`, one `write` of the whole run, and `close`.
//! Nothing is allocated per app: names and blocks are built in each thread's buffers.

use std::ffi::CStr;
use std::fs::File;
use std::io::Write;
use std::thread;

use super::backend::Runs;
use super::fsio::{create_dir_in, create_new_in, io_err, StoreError};
use super::layout::DataDir;
use super::limits::AppDirs;
use super::run::encode_run;
use crate::block::{AddrStats, BlockBuilder};
use crate::wire::{AppSha, SHA_HEX_LEN};

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

/// Where the logs go: the data dir (for the paths errors name), the open fan-out
/// directories and the writer's id.
pub(super) struct Target<'a> {
    pub(super) data: &'a DataDir,
    pub(super) dirs: &'a AppDirs,
    pub(super) writer_id: &'a str,
}

/// One thread's buffers: the block being encoded, the bytes of a run, and the names
/// `<sha>` and `<sha>/<writer-id>.log`, NUL-terminated.
struct Buffers {
    block: BlockBuilder,
    bytes: Vec<u8>,
    dir_name: Vec<u8>,
    log_name: Vec<u8>,
}

impl Buffers {
    fn new(writer_id: &str) -> Buffers {
        let mut log_name = vec![b'0'; SHA_HEX_LEN];
        log_name.push(b'/');
        log_name.extend_from_slice(writer_id.as_bytes());
        log_name.extend_from_slice(b".log\0");
        let mut dir_name = vec![b'0'; SHA_HEX_LEN];
        dir_name.push(0);
        Buffers {
            block: BlockBuilder::default(),
            bytes: Vec::new(),
            dir_name,
            log_name,
        }
    }

    /// Writes `app`'s name into both names.
    fn name(&mut self, app: &AppSha) {
        let hex: &mut [u8; SHA_HEX_LEN] = (&mut self.dir_name[..SHA_HEX_LEN])
            .try_into()
            .expect("a SHA's length");
        app.write_hex(hex);
        self.log_name[..SHA_HEX_LEN].copy_from_slice(&self.dir_name[..SHA_HEX_LEN]);
    }
}

/// A name built by [`Buffers`]: hex digits, `/`, `.` and a validated writer id hold no NUL.
fn c_name(bytes: &[u8]) -> &CStr {
    CStr::from_bytes_with_nul(bytes).expect("one NUL, at the end")
}

/// Creates, for each app `runs.get(i)` with `i` in `fresh`, its directory and its log holding
/// its records as one run of `epoch`, on up to `threads` threads. The fan-out directory of
/// each app must be open in `target.dirs` ([`AppDirs::may_create`]). Returns one outcome per
/// entry of `fresh`, in its order.
pub(super) fn create_logs(
    target: &Target,
    epoch: u64,
    fsync: bool,
    runs: &Runs,
    fresh: &[usize],
    threads: usize,
) -> Vec<Created> {
    let threads = threads.clamp(1, fresh.len().div_ceil(MIN_APPS_PER_THREAD).max(1));
    let create_one = |buffers: &mut Buffers, i: usize| {
        let (app, records) = runs.get(i);
        create_log(target, app, epoch, records, fsync, buffers)
    };
    if threads == 1 {
        let mut buffers = Buffers::new(target.writer_id);
        return fresh.iter().map(|&i| create_one(&mut buffers, i)).collect();
    }
    let per_thread = fresh.len().div_ceil(threads);
    thread::scope(|scope| {
        let workers: Vec<_> = fresh
            .chunks(per_thread)
            .map(|part| {
                scope.spawn(move || {
                    let mut buffers = Buffers::new(target.writer_id);
                    part.iter()
                        .map(|&i| create_one(&mut buffers, i))
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
    target: &Target,
    app: &AppSha,
    epoch: u64,
    records: &[(u32, AddrStats)],
    fsync: bool,
    buffers: &mut Buffers,
) -> Created {
    let Some(fan) = target.dirs.fan(app) else {
        return Created::Ordinary;
    };
    buffers.name(app);
    if create_dir_in(fan, c_name(&buffers.dir_name)).is_err() {
        return Created::Ordinary;
    }
    let events = encode_run(&mut buffers.block, epoch, records, &mut buffers.bytes);
    match write_new_log(fan, c_name(&buffers.log_name), &buffers.bytes, fsync) {
        Ok(()) => Created::New {
            written: buffers.bytes.len() as u64,
            events,
        },
        Err((action, e)) => {
            let path = target.data.log_path(app, target.writer_id);
            Created::Failed(io_err(action, &path)(e))
        }
    }
}

/// Creates the log `name` in `fan` holding `bytes`; on error, what was being done.
fn write_new_log(
    fan: &File,
    name: &CStr,
    bytes: &[u8],
    fsync: bool,
) -> Result<(), (&'static str, std::io::Error)> {
    let mut file = create_new_in(fan, name).map_err(|e| ("creating", e))?;
    file.write_all(bytes).map_err(|e| ("writing", e))?;
    if fsync {
        file.sync_data().map_err(|e| ("syncing", e))?;
    }
    Ok(())
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
    fn a_created_log_holds_the_bytes_an_append_writes() {
        use crate::store::log_state::LogState;
        use crate::store::run::append_run;
        let dir = tempfile::tempdir().unwrap();
        let data = DataDir::new(dir.path().join("d"));
        data.create().unwrap();
        let mut w = StoreWriter::new(data.clone(), "w-1.x", false).unwrap();
        // Over one block of records, one count split over several records.
        let mut big: Vec<_> = (0..600_000u32).map(|ip| one(ip * 3, 1)).collect();
        big[7].1.count = u64::from(u32::MAX) * 2 + 5;
        let mut runs = Runs::default();
        for n in 1..300 {
            runs.push(&app(n), &[one(n, 2)]);
        }
        runs.push(&app(300), &big);
        assert!(flush(&mut w, 4, &runs).iter().all(Result::is_ok));
        for (n, records) in [(1, &[one(1, 2)][..]), (300, &big[..])] {
            let expected = dir.path().join(format!("expected-{n}"));
            let mut block = BlockBuilder::default();
            append_run(
                &expected,
                &LogState::created(),
                &mut block,
                4,
                records,
                false,
            )
            .unwrap();
            assert_eq!(
                std::fs::read(data.log_path(&app(n), "w-1.x")).unwrap(),
                std::fs::read(&expected).unwrap(),
                "app {n}"
            );
        }
        let got = read_app(&data, &app(300)).unwrap().unwrap();
        assert_eq!(got.count(), 600_000 - 1 + u64::from(u32::MAX) * 2 + 5);
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
