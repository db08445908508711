//! The address index: per writer, which apps its logs hold each address for, so that
//! `ipevent-query ip` reads only the apps that talked to an address instead of every app.
//!
//! ```text
//! events/addr/<writer-id>/<sequence>.run   sorted runs, oldest (and largest) first
//!
//! run: blocks of RUN_BLOCK_RECORDS records (the last block fewer, at least one)
//! block header, 16 bytes, little-endian
//!   0  magic         4  "IPEA"
//!   4  version       2  1
//!   6  reserved      2  0
//!   8  record_count  4  1 ..= RUN_BLOCK_RECORDS
//!  12  crc32c        4  CRC-32C of header bytes 0..12 followed by the records
//! records, 36 bytes each, sorted and without duplicates over the whole run
//!   ip (4, big-endian) ‖ app SHA-256 (32)
//! ```
//!
//! The index is a hint: it names the apps that may hold an address, and the lookup reads each
//! of them through the one reader ([`super::reader`]) and classifies it, so an entry for an
//! app that was forgotten, expired or reset since costs a read and nothing else. The one
//! invariant is that every (app, address) of any log of the writer is in its runs, or the
//! app is one that readers of the writer's app index ([`super::index`]) read directly
//! anyway (a begin with no counts after it, or a check): a flush writes the run of its
//! pairs after its logs and before its counts block, so a crash in between leaves those apps
//! unsettled, and the writer's settle on reopen adds their pairs before it settles them.
//!
//! A flush writes one run (or one per [`MAX_PENDING_BYTES`] of pairs, for a very large flush),
//! through a temporary file renamed into place; then the runs are merged as the log's
//! compaction merges ([`super::compact`]): the newest runs are merged with an older one
//! once, together, they hold at least as many bytes, so every run is more than the sum of
//! the runs after it, there are at most log2 of the index's size of them, and a pair is
//! rewritten O(log n) times. The merge streams the mapped runs through a heap, holding one
//! block of output. The merged run is in place before its inputs are removed; a reader that
//! finds a listed run gone lists again.
//!
//! A reader maps each run, finds by binary search the first block that may hold the range,
//! verifies every block it reads, and collects the apps. A run that fails verification
//! makes the reader read every app of that writer (never a wrong answer); the writer
//! verifies its runs when it opens and rebuilds the index from its logs when one fails, or
//! when there is none (logs written before the index existed). The index lives under
//! `events/`, so a reset moves it away with the logs.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fs;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use super::fsio::{
    create_dir_all, for_each_entry, io_err, map_read, open_new, open_read, plain_dir, sync_dir,
    StoreError,
};
use super::index::{index_path, indexed_writers, read_index, unsettled_apps};
use super::layout::DataDir;
use super::reader::StoppedJournals;
use super::walk::{for_each_app_dir, scan_log_file};
use crate::lookup::Cidr;
use crate::wire::AppSha;

/// The directory of every writer's address index, inside `events/`.
pub const ADDR_DIR: &str = "addr";
/// First four bytes of every run block.
pub const RUN_MAGIC: [u8; 4] = *b"IPEA";
/// Run format version.
pub const RUN_VERSION: u16 = 1;
/// Size of a run block header.
pub const RUN_HEADER_BYTES: usize = 16;
/// Size of one (address, app) record.
pub const RUN_RECORD_BYTES: usize = 36;
/// Records in every block of a run but the last: a lookup verifies 144 KiB per block it
/// reads, and a run of 10M pairs has about 2,500 blocks to search.
pub const RUN_BLOCK_RECORDS: usize = 4096;
const RUN_BLOCK_BYTES: usize = RUN_HEADER_BYTES + RUN_BLOCK_RECORDS * RUN_RECORD_BYTES;
/// Bytes of pairs the writer holds before it writes them as a run: a flush of more writes
/// several runs, and the merge joins them. A pair takes 8 bytes and its app 32 once per
/// flush: 36 MiB is 1M pairs of apps with one address each, and 1.8M of a flood of new apps
/// with 2.4 addresses each (the runs of a flush of a million of them need no merge).
pub const MAX_PENDING_BYTES: usize = 36 << 20;
const PENDING_PAIR_BYTES: usize = std::mem::size_of::<u64>();
const PENDING_APP_BYTES: usize = std::mem::size_of::<AppSha>();
/// Times a reader lists a writer's runs again when one it listed was merged away before it
/// could open it; after that it reads every app of the writer.
const READ_ATTEMPTS: usize = 3;

/// One record: the address (big-endian) then the app, so byte order is (address, app) order.
type Pair = [u8; RUN_RECORD_BYTES];

fn pair(ip: u32, app: &AppSha) -> Pair {
    let mut out = [0; RUN_RECORD_BYTES];
    out[..4].copy_from_slice(&ip.to_be_bytes());
    out[4..].copy_from_slice(&app.0);
    out
}

fn pair_ip(record: &[u8]) -> u32 {
    u32::from_be_bytes(record[..4].try_into().expect("4 bytes"))
}

fn pair_app(record: &[u8]) -> AppSha {
    AppSha(record[4..RUN_RECORD_BYTES].try_into().expect("32 bytes"))
}

/// `<data-dir>/events/addr/<writer-id>`.
pub fn writer_addr_dir(data: &DataDir, writer_id: &str) -> PathBuf {
    data.events_dir().join(ADDR_DIR).join(writer_id)
}

fn run_path(dir: &Path, sequence: u64) -> PathBuf {
    dir.join(format!("{sequence:020}.run"))
}

/// The runs in `dir`, oldest first. `Ok(None)` when `dir` does not exist.
fn list_runs(dir: &Path) -> Result<Option<Vec<(u64, PathBuf)>>, StoreError> {
    if !plain_dir(dir)? {
        return Ok(None);
    }
    let mut runs = Vec::new();
    for_each_entry(dir, |entry| {
        let name = entry.file_name();
        if let Some(seq) = name
            .to_str()
            .and_then(|n| n.strip_suffix(".run"))
            .and_then(|n| n.parse::<u64>().ok())
        {
            runs.push((seq, entry.path()));
        }
        Ok(())
    })?;
    runs.sort_unstable();
    Ok(Some(runs))
}

/// Why a run cannot be trusted.
#[derive(Debug, thiserror::Error)]
#[error("block {block} does not verify")]
pub struct BadRun {
    block: usize,
}

/// The verified records of block `b` of the run `bytes`.
fn block_records(bytes: &[u8], b: usize) -> Result<&[u8], BadRun> {
    let bad = BadRun { block: b };
    let start = b * RUN_BLOCK_BYTES;
    let header = bytes
        .get(start..start + RUN_HEADER_BYTES)
        .ok_or(BadRun { block: b })?;
    let u32_at = |at: usize| u32::from_le_bytes(header[at..at + 4].try_into().expect("4 bytes"));
    if header[..4] != RUN_MAGIC || header[4..6] != RUN_VERSION.to_le_bytes() {
        return Err(bad);
    }
    let records = u32_at(8) as usize;
    let end = start + RUN_HEADER_BYTES + records * RUN_RECORD_BYTES;
    let is_last = end == bytes.len();
    if records == 0 || records > RUN_BLOCK_RECORDS || (!is_last && records != RUN_BLOCK_RECORDS) {
        return Err(bad);
    }
    let body = bytes.get(start + RUN_HEADER_BYTES..end).ok_or(bad)?;
    let crc = crc32c::crc32c_append(crc32c::crc32c(&header[..12]), body);
    if crc != u32_at(12) {
        return Err(BadRun { block: b });
    }
    Ok(body)
}

fn block_count(bytes: &[u8]) -> usize {
    bytes.len().div_ceil(RUN_BLOCK_BYTES)
}

/// Verifies every block of a run and that its records are sorted without duplicates.
pub fn verify_run(bytes: &[u8]) -> Result<u64, BadRun> {
    let mut last: Option<&[u8]> = None;
    let mut records = 0;
    for b in 0..block_count(bytes) {
        for record in block_records(bytes, b)?.chunks_exact(RUN_RECORD_BYTES) {
            if last.is_some_and(|l| l >= record) {
                return Err(BadRun { block: b });
            }
            last = Some(record);
            records += 1;
        }
    }
    Ok(records)
}

/// Appends to `out` the apps of the run `bytes` with an address in `lo..=hi`: a binary
/// search for the first block that may hold `lo`, then every block from there verified and
/// read until an address above `hi`.
fn search_run(bytes: &[u8], lo: u32, hi: u32, out: &mut Vec<AppSha>) -> Result<(), BadRun> {
    let blocks = block_count(bytes);
    // The first address of each block, read without verifying: it only guides the search,
    // and the blocks read are verified below.
    let first_ip = |b: usize| {
        let at = b * RUN_BLOCK_BYTES + RUN_HEADER_BYTES;
        bytes.get(at..at + 4).map(pair_ip)
    };
    // The number of leading blocks whose first address is below `lo`.
    let (mut below, mut above) = (0, blocks);
    while below < above {
        let mid = below + (above - below) / 2;
        if first_ip(mid).is_some_and(|ip| ip < lo) {
            below = mid + 1;
        } else {
            above = mid;
        }
    }
    let start = below.saturating_sub(1);
    let mut previous: Option<&[u8]> = None;
    for b in start..blocks {
        let records = block_records(bytes, b)?;
        if b == start && b > 0 && pair_ip(records) >= lo {
            // Something before this block may hold the range: the search was misled.
            return Err(BadRun { block: b });
        }
        for record in records.chunks_exact(RUN_RECORD_BYTES) {
            if previous.is_some_and(|p| p >= record) {
                return Err(BadRun { block: b });
            }
            previous = Some(record);
            let ip = pair_ip(record);
            if ip > hi {
                return Ok(());
            }
            if ip >= lo {
                out.push(pair_app(record));
            }
        }
    }
    Ok(())
}

/// What a reader found in one writer's address index.
enum WriterRuns {
    /// Every run verified where it was read; the apps are in the output.
    Read,
    /// No index (yet), or one that cannot be trusted: read every app of the writer.
    Unusable,
}

/// Appends to `out` the apps of `writer_id`'s runs with an address in `cidr`.
fn read_writer_runs(
    data: &DataDir,
    writer_id: &str,
    cidr: Cidr,
    out: &mut Vec<AppSha>,
) -> WriterRuns {
    let dir = writer_addr_dir(data, writer_id);
    let (lo, hi) = cidr.range();
    let mark = out.len();
    for _ in 0..READ_ATTEMPTS {
        out.truncate(mark);
        let runs = match list_runs(&dir) {
            Ok(Some(runs)) => runs,
            Ok(None) => return WriterRuns::Unusable,
            Err(e) => {
                log::warn!("address index of writer {writer_id}: {e}; reading its every app");
                return WriterRuns::Unusable;
            }
        };
        let mut vanished = false;
        for (_, path) in runs {
            let map = match map_read(&path) {
                Ok(Some(map)) => map,
                Ok(None) => {
                    vanished = true;
                    break;
                }
                Err(e) => {
                    log::warn!("{e}; reading every app of writer {writer_id}");
                    out.truncate(mark);
                    return WriterRuns::Unusable;
                }
            };
            if let Err(e) = search_run(map.as_ref(), lo, hi, out) {
                log::warn!(
                    "address index run {}: {e}; reading every app of writer {writer_id}",
                    path.display()
                );
                out.truncate(mark);
                return WriterRuns::Unusable;
            }
        }
        if !vanished {
            return WriterRuns::Read;
        }
    }
    out.truncate(mark);
    WriterRuns::Unusable
}

/// The apps of the file tree that may hold an address in `cidr` (the store's
/// [`Store::apps_with_address`](super::Store::apps_with_address)): from each writer's
/// address index, the apps its app index leaves unsettled (read directly), every app of a
/// writer whose address index is missing or does not verify, and the apps with a matching
/// record in a stopped writer's journal. `Ok(None)` when some writer has no app index
/// either (logs of an older version): the caller reads every app.
pub fn candidates(data: &DataDir, cidr: Cidr) -> Result<Option<Vec<AppSha>>, StoreError> {
    data.check_layout()?;
    let mut writers = data.writer_ids()?;
    for id in indexed_writers(data)? {
        if !writers.contains(&id) {
            writers.push(id);
        }
    }
    let mut out = Vec::new();
    for writer_id in &writers {
        // The app index first: an app it shows settled had its pairs written to a run
        // before its counts, so the runs listed after it hold them.
        let path = index_path(data, writer_id);
        let Some(file) = open_read(&path)? else {
            return Ok(None);
        };
        let map = crate::sys::map_read_only(&file).map_err(io_err("mapping", &path))?;
        let unsettled = unsettled_apps(map.as_ref());
        match read_writer_runs(data, writer_id, cidr, &mut out) {
            WriterRuns::Read => out.extend(unsettled),
            WriterRuns::Unusable => {
                let (view, _) = read_index(map.as_ref());
                out.extend(view.counts.into_keys());
                out.extend(view.unsettled);
            }
        }
    }
    out.extend(StoppedJournals::read(data).apps_with(|ip| cidr.contains(ip)));
    out.sort_unstable();
    out.dedup();
    Ok(Some(out))
}

/// Writes one run, block after block, to a temporary file renamed into place.
struct RunWriter {
    tmp: PathBuf,
    file: BufWriter<fs::File>,
    block: Vec<u8>,
    in_block: usize,
    last: Option<Pair>,
    bytes: u64,
}

impl RunWriter {
    fn create(dir: &Path, sequence: u64) -> Result<RunWriter, StoreError> {
        let tmp = dir.join(format!("{sequence:020}.tmp"));
        let file = open_new(&tmp)?;
        Ok(RunWriter {
            tmp,
            file: BufWriter::with_capacity(1 << 20, file),
            block: Vec::with_capacity(RUN_BLOCK_BYTES),
            in_block: 0,
            last: None,
            bytes: 0,
        })
    }

    /// Adds `record`, which must not sort before the previous one; a duplicate is dropped.
    fn push(&mut self, record: &Pair) -> Result<(), StoreError> {
        if let Some(last) = &self.last {
            assert!(last <= record, "address index run out of order");
            if last == record {
                return Ok(());
            }
        }
        self.last = Some(*record);
        if self.in_block == 0 {
            self.block.clear();
            self.block.extend_from_slice(&[0; RUN_HEADER_BYTES]);
        }
        self.block.extend_from_slice(record);
        self.in_block += 1;
        if self.in_block == RUN_BLOCK_RECORDS {
            self.end_block()?;
        }
        Ok(())
    }

    fn end_block(&mut self) -> Result<(), StoreError> {
        if self.in_block == 0 {
            return Ok(());
        }
        self.block[..4].copy_from_slice(&RUN_MAGIC);
        self.block[4..6].copy_from_slice(&RUN_VERSION.to_le_bytes());
        self.block[6..8].copy_from_slice(&[0, 0]);
        self.block[8..12].copy_from_slice(&(self.in_block as u32).to_le_bytes());
        let crc = crc32c::crc32c_append(
            crc32c::crc32c(&self.block[..12]),
            &self.block[RUN_HEADER_BYTES..],
        );
        self.block[12..16].copy_from_slice(&crc.to_le_bytes());
        debug_assert!(block_records(&self.block, 0).is_ok());
        self.file
            .write_all(&self.block)
            .map_err(io_err("writing", &self.tmp))?;
        self.bytes += self.block.len() as u64;
        self.in_block = 0;
        Ok(())
    }

    /// Ends the run and renames it to `path`; returns its size in bytes.
    fn finish(mut self, path: &Path, fsync: bool) -> Result<u64, StoreError> {
        let result = (|| {
            self.end_block()?;
            self.file.flush().map_err(io_err("writing", &self.tmp))?;
            if fsync {
                self.file
                    .get_ref()
                    .sync_data()
                    .map_err(io_err("syncing", &self.tmp))?;
            }
            fs::rename(&self.tmp, path).map_err(io_err("renaming into place", path))
        })();
        if result.is_err() {
            let _ = fs::remove_file(&self.tmp);
        }
        result.map(|()| self.bytes)
    }

    fn abandon(self) {
        let _ = fs::remove_file(&self.tmp);
    }
}

/// One run the writer knows of.
#[derive(Debug, Clone)]
struct Run {
    sequence: u64,
    bytes: u64,
}

/// One writer's side of its address index: the pairs of the flush in progress, and the runs.
#[derive(Debug)]
pub(crate) struct AddrIndexWriter {
    dir: PathBuf,
    fsync: bool,
    runs: Vec<Run>,
    next_sequence: u64,
    /// The pairs not yet written, each `(address << 32) | ordinal`, the ordinal an index in
    /// `pending_apps`: 8 bytes a pair, sorted as integers.
    pending: Vec<u64>,
    /// The apps of `pending`, once per [`AddrIndexWriter::add`].
    pending_apps: Vec<AppSha>,
    /// [`MAX_PENDING_BYTES`], lower in tests.
    max_pending_bytes: usize,
    /// The runs were listed and verified (or built) since the writer opened or forgot them.
    ready: bool,
    /// Writing pairs failed during this flush: its counts must not be written.
    failed: Option<StoreError>,
}

impl AddrIndexWriter {
    pub(crate) fn new(data: &DataDir, writer_id: &str, fsync: bool) -> AddrIndexWriter {
        AddrIndexWriter {
            dir: writer_addr_dir(data, writer_id),
            fsync,
            runs: Vec::new(),
            next_sequence: 1,
            pending: Vec::new(),
            pending_apps: Vec::new(),
            max_pending_bytes: MAX_PENDING_BYTES,
            ready: false,
            failed: None,
        }
    }

    /// True when the runs are known and verified; otherwise [`AddrIndexWriter::open`] first.
    pub(crate) fn ready(&self) -> bool {
        self.ready
    }

    /// Lists and verifies the runs; when there are none (no index yet) or one fails, builds
    /// the index from the writer's logs. True when it was built (it then holds every pair
    /// of the logs).
    pub(crate) fn open(&mut self, data: &DataDir, writer_id: &str) -> Result<bool, StoreError> {
        self.clear_pending();
        self.failed = None;
        self.runs.clear();
        match self.verified_runs() {
            Ok(Some(runs)) => {
                self.next_sequence = runs.last().map_or(1, |r| r.sequence + 1);
                self.runs = runs;
                self.ready = true;
                return Ok(false);
            }
            Ok(None) => log::info!(
                "building the address index of writer {writer_id} from its logs (none yet)"
            ),
            Err(e) => {
                log::warn!("rebuilding the address index of writer {writer_id} from its logs: {e}")
            }
        }
        self.build(data, writer_id, &mut |_, _| {})?;
        Ok(true)
    }

    /// The runs of the index, each verified; `Ok(None)` when there is no index. Removes
    /// temporary files a stop left.
    fn verified_runs(&self) -> Result<Option<Vec<Run>>, StoreError> {
        let Some(listed) = list_runs(&self.dir)? else {
            return Ok(None);
        };
        for_each_entry(&self.dir, |entry| {
            if entry.path().extension().is_some_and(|e| e == "tmp") {
                let _ = fs::remove_file(entry.path());
            }
            Ok(())
        })?;
        let mut runs = Vec::new();
        for (sequence, path) in listed {
            let Some(map) = map_read(&path)? else {
                continue;
            };
            verify_run(map.as_ref()).map_err(|e| StoreError::Io {
                action: "verifying",
                path: path.clone(),
                source: std::io::Error::other(e.to_string()),
            })?;
            runs.push(Run {
                sequence,
                bytes: map.as_ref().len() as u64,
            });
        }
        Ok(Some(runs))
    }

    /// Builds the index from every log of the writer, beside the old one (`<id>.build`),
    /// then puts it in place: readers read every app of the writer until it is there.
    /// Calls `each_log` with every app whose log it read and the log's events.
    pub(crate) fn build(
        &mut self,
        data: &DataDir,
        writer_id: &str,
        each_log: &mut dyn FnMut(AppSha, u64),
    ) -> Result<(), StoreError> {
        let parent = self.dir.parent().expect("under events/addr").to_path_buf();
        create_dir_all(&parent)?;
        if !plain_dir(&parent)? {
            return Err(StoreError::NotADirectory(parent));
        }
        let build = parent.join(format!("{writer_id}.build"));
        super::trash::remove(&build);
        create_dir_all(&build)?;
        let final_dir = std::mem::replace(&mut self.dir, build.clone());
        self.runs.clear();
        self.next_sequence = 1;
        let name = format!("{writer_id}.log");
        let mut pairs = 0u64;
        let walked = for_each_app_dir(data, |entry| {
            let Some(app) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
                return Ok(());
            };
            if !matches!(plain_dir(&entry.path()), Ok(true)) {
                return Ok(());
            }
            let log = entry.path().join(&name);
            let mut ips = Vec::new();
            match scan_log_file(&log, |ip, _| ips.push(ip))? {
                Some(summary) => each_log(app, summary.events),
                None => return Ok(()),
            }
            pairs += ips.len() as u64;
            self.add(&app, ips.into_iter())?;
            Ok(())
        })
        .and_then(|()| self.finish());
        if let Err(e) = walked {
            self.dir = final_dir;
            super::trash::remove(&build);
            self.ready = false;
            return Err(e);
        }
        super::trash::remove(&final_dir);
        fs::rename(&build, &final_dir).map_err(io_err("renaming into place", &final_dir))?;
        if self.fsync {
            sync_dir(&parent)?;
        }
        self.dir = final_dir;
        self.ready = true;
        if let Err(e) = self.merge() {
            log::warn!("merging the address index of writer {writer_id}: {e}");
        }
        log::info!(
            "address index of writer {writer_id}: {pairs} (address, app) pairs from its logs"
        );
        Ok(())
    }

    /// After a reset moved the tree away: the next flush opens (builds) the index again.
    pub(crate) fn forget(&mut self) {
        self.ready = false;
        self.clear_pending();
        self.failed = None;
        self.runs.clear();
    }

    /// Adds `app`'s addresses `ips` (written to its log in this flush).
    pub(crate) fn add(
        &mut self,
        app: &AppSha,
        ips: impl Iterator<Item = u32>,
    ) -> Result<(), StoreError> {
        let mut ordinal = None;
        for ip in ips {
            let at = *ordinal.get_or_insert_with(|| {
                self.pending_apps.push(*app);
                (self.pending_apps.len() - 1) as u64
            });
            self.pending.push((u64::from(ip) << 32) | at);
            if self.pending_bytes() >= self.max_pending_bytes {
                if let Err(e) = self.write_pending() {
                    self.clear_pending();
                    self.ready = false;
                    return Err(e);
                }
                // The rest of this app's addresses go with the next run.
                ordinal = None;
            }
        }
        Ok(())
    }

    /// [`AddrIndexWriter::add`] during a flush: a failure is kept for
    /// [`AddrIndexWriter::finish`], which the flush's counts wait on.
    pub(crate) fn add_in_flush(&mut self, app: &AppSha, ips: impl Iterator<Item = u32>) {
        if self.failed.is_some() {
            return;
        }
        if let Err(e) = self.add(app, ips) {
            self.failed = Some(e);
        }
    }

    fn pending_bytes(&self) -> usize {
        self.pending.len() * PENDING_PAIR_BYTES + self.pending_apps.len() * PENDING_APP_BYTES
    }

    fn clear_pending(&mut self) {
        self.pending.clear();
        self.pending_apps.clear();
    }

    /// Writes the pending pairs as one run.
    fn write_pending(&mut self) -> Result<(), StoreError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        // By address, then by app: the ordinals order the apps of one address by arrival,
        // so each group of one address is put in app order.
        self.pending.sort_unstable();
        let apps = &self.pending_apps;
        let app_of = |key: &u64| &apps[(*key as u32) as usize];
        for same_ip in self.pending.chunk_by_mut(|a, b| a >> 32 == b >> 32) {
            if same_ip.len() > 1 {
                same_ip.sort_unstable_by(|a, b| app_of(a).cmp(app_of(b)));
            }
        }
        let sequence = self.next_sequence;
        let mut run = RunWriter::create(&self.dir, sequence)?;
        for key in &self.pending {
            if let Err(e) = run.push(&pair((key >> 32) as u32, app_of(key))) {
                run.abandon();
                return Err(e);
            }
        }
        let bytes = run.finish(&run_path(&self.dir, sequence), self.fsync)?;
        self.next_sequence += 1;
        self.clear_pending();
        if self.pending.capacity() * PENDING_PAIR_BYTES > self.max_pending_bytes / 16 {
            // A large flush: do not hold its buffers until the next one.
            self.pending = Vec::new();
            self.pending_apps = Vec::new();
        }
        self.runs.push(Run { sequence, bytes });
        Ok(())
    }

    /// Writes the flush's pairs as a run (before the flush's counts block). An error means
    /// some pair is not in the index: the caller must not write the counts, so that the
    /// flush's apps stay unsettled until a settle adds them.
    pub(crate) fn finish(&mut self) -> Result<(), StoreError> {
        if let Some(e) = self.failed.take() {
            self.clear_pending();
            self.ready = false;
            return Err(e);
        }
        if let Err(e) = self.write_pending() {
            self.clear_pending();
            self.ready = false;
            return Err(e);
        }
        if self.fsync && !self.runs.is_empty() {
            sync_dir(&self.dir)?;
        }
        Ok(())
    }

    /// Merges runs while the newest ones together hold at least as many bytes as the one
    /// before them. A failure leaves the runs as they were (still a complete index).
    pub(crate) fn merge(&mut self) -> Result<(), StoreError> {
        while let Some(from) = merge_from(&self.runs) {
            self.merge_tail(from)?;
        }
        Ok(())
    }

    /// Merges `runs[from..]` into one run, put in place before the inputs are removed.
    fn merge_tail(&mut self, from: usize) -> Result<(), StoreError> {
        let inputs: Vec<Run> = self.runs[from..].to_vec();
        let mut maps = Vec::with_capacity(inputs.len());
        for run in &inputs {
            let path = run_path(&self.dir, run.sequence);
            match map_read(&path)? {
                Some(map) => maps.push((path, map)),
                None => return Err(StoreError::NotAFile(path)),
            }
        }
        let sequence = self.next_sequence;
        let mut out = RunWriter::create(&self.dir, sequence)?;
        if let Err(e) = merge_into(&maps, &mut out) {
            out.abandon();
            return Err(e);
        }
        let bytes = out.finish(&run_path(&self.dir, sequence), self.fsync)?;
        self.next_sequence += 1;
        if self.fsync {
            sync_dir(&self.dir)?;
        }
        for (path, _) in &maps {
            let _ = fs::remove_file(path);
        }
        self.runs.truncate(from);
        self.runs.push(Run { sequence, bytes });
        Ok(())
    }
}

/// The first run of the suffix to merge: the oldest `i` whose later runs hold at least as
/// many bytes as it does (`None`: every run is larger than all the later ones together).
fn merge_from(runs: &[Run]) -> Option<usize> {
    let mut later = 0u64;
    let mut from = None;
    for (i, run) in runs.iter().enumerate().rev() {
        if i + 1 < runs.len() && later >= run.bytes {
            from = Some(i);
        }
        later += run.bytes;
    }
    from
}

/// Streams the records of every run in `maps`, merged and without duplicates, into `out`,
/// verifying each block as it is read.
fn merge_into(
    maps: &[(PathBuf, crate::sys::Mapped)],
    out: &mut RunWriter,
) -> Result<(), StoreError> {
    struct Cursor<'a> {
        bytes: &'a [u8],
        block: usize,
        records: &'a [u8],
    }
    let bad = |path: &Path, e: BadRun| StoreError::Io {
        action: "merging",
        path: path.to_path_buf(),
        source: std::io::Error::other(e.to_string()),
    };
    let mut cursors = Vec::with_capacity(maps.len());
    let mut heap = BinaryHeap::new();
    for (i, (path, map)) in maps.iter().enumerate() {
        let bytes = map.as_ref();
        let mut cursor = Cursor {
            bytes,
            block: 0,
            records: &[],
        };
        if block_count(bytes) > 0 {
            cursor.records = block_records(bytes, 0).map_err(|e| bad(path, e))?;
            heap.push(Reverse((pair_of(cursor.records), i)));
        }
        cursors.push(cursor);
    }
    while let Some(Reverse((record, i))) = heap.pop() {
        out.push(&record)?;
        let cursor = &mut cursors[i];
        cursor.records = &cursor.records[RUN_RECORD_BYTES..];
        if cursor.records.is_empty() {
            cursor.block += 1;
            if cursor.block >= block_count(cursor.bytes) {
                continue;
            }
            cursor.records =
                block_records(cursor.bytes, cursor.block).map_err(|e| bad(&maps[i].0, e))?;
        }
        let next = pair_of(cursor.records);
        if next <= record {
            return Err(bad(
                &maps[i].0,
                BadRun {
                    block: cursor.block,
                },
            ));
        }
        heap.push(Reverse((next, i)));
    }
    Ok(())
}

fn pair_of(records: &[u8]) -> Pair {
    records[..RUN_RECORD_BYTES].try_into().expect("a record")
}

/// Every address of `writer_id`'s log of `app` and its events (`None`: no log).
pub(crate) fn log_addresses(
    data: &DataDir,
    writer_id: &str,
    app: &AppSha,
    ips: &mut Vec<u32>,
) -> Result<Option<u64>, StoreError> {
    ips.clear();
    if !plain_dir(&data.app_dir(app))? {
        return Ok(None);
    }
    Ok(scan_log_file(&data.log_path(app, writer_id), |ip, _| ips.push(ip))?.map(|s| s.events))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn app(n: u8) -> AppSha {
        AppSha([n; 32])
    }

    fn run_bytes(pairs: &[(u32, u8)]) -> Vec<u8> {
        let dir = tempfile::tempdir().unwrap();
        let mut sorted: Vec<Pair> = pairs.iter().map(|(ip, a)| pair(*ip, &app(*a))).collect();
        sorted.sort_unstable();
        let mut w = RunWriter::create(dir.path(), 1).unwrap();
        for p in &sorted {
            w.push(p).unwrap();
        }
        let path = dir.path().join("r");
        w.finish(&path, false).unwrap();
        fs::read(&path).unwrap()
    }

    #[test]
    fn a_run_is_searched_by_block_and_verified() {
        // Three and a bit blocks: every address i*7 for app i%5, and address 500 for all.
        let mut pairs: Vec<(u32, u8)> = (0..(RUN_BLOCK_RECORDS as u32 * 3 + 100))
            .map(|i| (i * 7, (i % 5) as u8))
            .collect();
        pairs.extend((0..5).map(|a| (500, a)));
        pairs.push((500, 0));
        let bytes = run_bytes(&pairs);
        // The repeated pair is written once.
        assert_eq!(verify_run(&bytes).unwrap() as usize, pairs.len() - 1);
        let find = |lo, hi| {
            let mut out = Vec::new();
            search_run(&bytes, lo, hi, &mut out).unwrap();
            out.sort_unstable();
            out.dedup();
            out
        };
        assert_eq!(find(500, 500), (0..5).map(app).collect::<Vec<_>>());
        let ip = RUN_BLOCK_RECORDS as u32 * 2 * 7;
        assert_eq!(find(ip, ip), vec![app((RUN_BLOCK_RECORDS * 2 % 5) as u8)]);
        assert_eq!(find(ip + 1, ip + 6), vec![]);
        assert_eq!(find(u32::MAX, u32::MAX), vec![]);
        assert_eq!(find(0, u32::MAX).len(), 5);
        // A flipped byte in a block the search reads: refused, never a wrong answer.
        let mut bad = bytes.clone();
        bad[RUN_BLOCK_BYTES * 2 + RUN_HEADER_BYTES + 40] ^= 1;
        assert!(verify_run(&bad).is_err());
        assert!(search_run(&bad, ip, ip, &mut Vec::new()).is_err());
    }

    /// The bytes of every run of `w`, oldest first.
    fn runs_of(w: &AddrIndexWriter) -> Vec<Vec<u8>> {
        let runs = list_runs(&w.dir).unwrap().unwrap();
        runs.iter()
            .map(|(_, path)| fs::read(path).unwrap())
            .collect()
    }

    fn index_writer(dir: &Path) -> AddrIndexWriter {
        let data = DataDir::new(dir);
        let w = AddrIndexWriter::new(&data, "w", false);
        create_dir_all(&w.dir).unwrap();
        w
    }

    #[test]
    fn pending_pairs_are_written_in_address_then_app_order() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = index_writer(dir.path());
        // Apps arrive in descending order, share addresses, and one comes twice.
        let mut pairs = Vec::new();
        for a in (0..40u8).rev() {
            let ips: Vec<u32> = vec![7, 1000 + u32::from(a), u32::MAX, u32::from(a % 3)];
            pairs.extend(ips.iter().map(|ip| (*ip, a)));
            w.add(&app(a), ips.into_iter()).unwrap();
        }
        w.add(&app(5), [7, 5000].into_iter()).unwrap();
        pairs.extend([(7, 5), (5000, 5)]);
        w.finish().unwrap();
        assert_eq!(runs_of(&w), vec![run_bytes(&pairs)]);
    }

    #[test]
    fn an_app_cut_by_a_full_buffer_keeps_its_addresses() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = index_writer(dir.path());
        w.max_pending_bytes = 1 << 20;
        let first = ((w.max_pending_bytes - PENDING_APP_BYTES * 2) / PENDING_PAIR_BYTES) as u32 - 2;
        w.add(&app(1), 0..first).unwrap();
        // Two of these fill the buffer (a run is written), three go to the next run.
        w.add(&app(9), [3, 1, u32::MAX, 2, 5].into_iter()).unwrap();
        w.finish().unwrap();
        let runs = runs_of(&w);
        assert_eq!(runs.len(), 2);
        let find = |lo, hi| {
            let mut out = Vec::new();
            for run in &runs {
                search_run(run, lo, hi, &mut out).unwrap();
            }
            out.sort_unstable();
            out
        };
        assert_eq!(find(u32::MAX, u32::MAX), vec![app(9)]);
        assert_eq!(find(1, 1), vec![app(1), app(9)]);
        assert_eq!(find(5, 5), vec![app(1), app(9)]);
        assert_eq!(find(first, first + 10), vec![]);
        let total: u64 = runs.iter().map(|r| verify_run(r).unwrap()).sum();
        assert_eq!(total, u64::from(first) + 5);
    }

    #[test]
    fn merging_keeps_runs_logarithmic() {
        let runs = |sizes: &[u64]| -> Vec<Run> {
            sizes
                .iter()
                .enumerate()
                .map(|(i, &bytes)| Run {
                    sequence: i as u64,
                    bytes,
                })
                .collect()
        };
        assert_eq!(merge_from(&runs(&[100])), None);
        assert_eq!(merge_from(&runs(&[100, 60, 30, 5])), None);
        // Each run larger than every later one together: at most log2(size) runs.
        assert_eq!(merge_from(&runs(&[1000, 60, 30, 30])), Some(1));
        assert_eq!(merge_from(&runs(&[100, 60, 30, 30])), Some(0));
        assert_eq!(merge_from(&runs(&[100, 60, 30, 80])), Some(0));
    }
}
