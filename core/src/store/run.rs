//! Writing one sorted run of records, block after block: appended to the end of a log (one
//! run per flush), or merged with the log's verified blocks into a new file renamed over it
//! (compaction, and repair of a bad tail).

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::Path;

use super::compact;
use super::fsio::{io_err, map_read, open_append, open_create_new, open_new, StoreError};
use super::log_state::LogState;
use crate::block::{self, AddrStats, BlockBuilder};

/// Records per block of a run: half a block, which leaves room for counts split over
/// several records.
const RUN_CHUNK_RECORDS: usize = block::MAX_RECORDS_PER_BLOCK / 2;

/// Bytes of a run of `records` records (without split counts).
pub(super) fn run_bytes(records: usize) -> u64 {
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

impl<'a> RunWriter<'a> {
    /// A run of `epoch` into `file` (at `path`), built in `block`.
    fn new(file: File, path: &'a Path, block: &'a mut BlockBuilder, epoch: u64) -> RunWriter<'a> {
        block.begin(epoch);
        RunWriter {
            file,
            path,
            block,
            epoch,
            len: 0,
            events: 0,
        }
    }

    fn push(&mut self, ip: u32, stats: &AddrStats) -> Result<(), StoreError> {
        if block_full(self.block) {
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

/// True when the run's block being built takes no more records: the next one begins.
fn block_full(block: &BlockBuilder) -> bool {
    block.records() >= RUN_CHUNK_RECORDS
}

/// Encodes `records` (sorted, non-empty) into `out` as the bytes [`append_run`] writes for
/// them as one run of `epoch`, built in `block`. Returns the events.
pub(super) fn encode_run(
    block: &mut BlockBuilder,
    epoch: u64,
    records: &[(u32, AddrStats)],
    out: &mut Vec<u8>,
) -> u64 {
    out.clear();
    block.begin(epoch);
    let mut events = 0;
    for (ip, stats) in records {
        if block_full(block) {
            out.extend_from_slice(block.finish());
            block.begin_continuing(epoch);
        }
        block.push(*ip, stats);
        events += stats.count;
    }
    if block.records() > 0 {
        out.extend_from_slice(block.finish());
    }
    events
}

/// Appends `records` (sorted, non-empty) as one run of `epoch` to the end of the log at
/// `path`, whose state is `state`; with `fsync`, syncs it. Returns the bytes and events
/// written. On error part of the run may be on disk ([`LogState::torn`]).
pub(super) fn append_run(
    path: &Path,
    state: &LogState,
    block: &mut BlockBuilder,
    epoch: u64,
    records: &[(u32, AddrStats)],
    fsync: bool,
) -> Result<(u64, u64), StoreError> {
    let mut out = RunWriter::new(open_for_append(path, state)?, path, block, epoch);
    for (ip, stats) in records {
        out.push(*ip, stats)?;
    }
    out.finish()?;
    if fsync {
        out.file.sync_data().map_err(io_err("syncing", path))?;
    }
    Ok((out.len, out.events))
}

/// Merges the verified blocks of the log at `path` with `records` into a new file, one sorted
/// run, and renames it over the log; returns the log's new state. Streams: it holds one block
/// of output, never the log. On error the log is as it was and the new file is removed.
pub(super) fn rewrite_log(
    path: &Path,
    block: &mut BlockBuilder,
    epoch: u64,
    records: &[(u32, AddrStats)],
) -> Result<LogState, StoreError> {
    let map = map_read(path)?;
    let log = map.as_ref().map_or(&[][..], |m| m.as_ref());
    let max_epoch = compact::run_layout(log).max_epoch.max(epoch);
    let tmp = path.with_extension("log.tmp");
    let result = (|| {
        let mut out = RunWriter::new(open_new(&tmp)?, &tmp, block, max_epoch);
        let distinct = compact::merge(log, records, |ip, stats| out.push(ip, stats))?;
        out.finish()?;
        // The rename must never expose a file whose data is not on disk yet.
        out.file.sync_data().map_err(io_err("syncing", &tmp))?;
        fs::rename(&tmp, path).map_err(io_err("renaming into place", path))?;
        Ok(LogState::rewritten(
            out.len, out.events, distinct, max_epoch,
        ))
    })();
    drop(map);
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
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
