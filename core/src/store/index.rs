//! The app index: one append-only file per writer, `events/index/<writer-id>.idx`, that says
//! which apps the writer's logs hold and how many events each, so that `list` reads one file
//! per writer instead of every log in the tree.
//!
//! ```text
//! block header, 24 bytes, little-endian
//!   0  magic         4  "IPEX"
//!   4  version       2  1
//!   6  kind          2  1 = begin, 2 = counts, 3 = check
//!   8  record_count  4  1 ..= MAX_INDEX_RECORDS
//!  12  sequence      8  the writer's index sequence: a flush's begin and counts share it
//!  20  crc32c        4  CRC-32C of header bytes 0..20 followed by the records
//! records
//!   begin:  32 bytes each, an app's SHA-256
//!   check:  32 bytes each, an app whose log the writer could not write (something not a
//!           plain directory or file stands in its place): readers read it themselves
//!   counts: 40 bytes each, an app's SHA-256, then u64: events in the writer's log of that app
//! ```
//!
//! A flush first appends *begin* blocks naming every app it is about to write, then the
//! logs, then *counts* blocks (same sequence) with each written app's total. A reader takes,
//! per app, the last count it finds. A begin that no counts block of its sequence follows (a
//! flush in progress, or a crash in the middle of one) names the only apps whose logs may
//! disagree with the index: the reader reads those logs themselves, and a writer that opens
//! its index with such apps reads their logs and rewrites the index settled. Readers verify every block and stop at the first
//! that fails, so a torn tail costs nothing but those apps' logs being read directly. The
//! writer rewrites the file (beside it, renamed over) with one count per app when it has
//! grown to twice its size after the last rewrite.
//!
//! The index moves with `events/` (a reset renames the whole tree away), and its directory
//! holds no two-hex-digit name, so no reader takes it for a fan-out directory.

use rustc_hash::FxHashMap;
use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::DirBuilderExt;
use std::path::PathBuf;

use super::addr_index::{log_addresses, AddrIndexWriter};
use super::backend::AppCount;
use super::fsio::{
    for_each_entry, io_err, open_append, open_read, plain_dir, write_atomic, StoreError, DIR_MODE,
};
use super::layout::{validate_writer_id, DataDir};
use super::walk::scan_log_file;
use crate::wire::AppSha;

/// First four bytes of every index block.
pub const INDEX_MAGIC: [u8; 4] = *b"IPEX";
/// Index format version.
pub const INDEX_VERSION: u16 = 1;
/// Size of an index block header.
pub const INDEX_HEADER_BYTES: usize = 24;
/// Most records in one index block (64 Ki apps: 2.5 MiB of counts); a flush of more apps
/// writes several blocks.
pub const MAX_INDEX_RECORDS: usize = 1 << 16;

const KIND_BEGIN: u16 = 1;
const KIND_COUNTS: u16 = 2;
const KIND_CHECK: u16 = 3;
const BEGIN_RECORD_BYTES: usize = 32;
const COUNTS_RECORD_BYTES: usize = 40;

/// What a reader learns from one writer's index.
#[derive(Debug, Default)]
pub struct IndexView {
    /// Events per app, as the last counts block says.
    pub counts: FxHashMap<AppSha, u64>,
    /// Apps of begin blocks no counts block of the same sequence followed: their logs must
    /// be read directly.
    pub unsettled: Vec<AppSha>,
    /// Apps the writer could not write: readers read (and report) their logs themselves.
    pub check: Vec<AppSha>,
    /// Highest sequence in the index (0 when empty).
    pub last_sequence: u64,
}

/// Appends to `out` the blocks of `kind` holding one record per item (`put` writes it,
/// `record_bytes` long), at most [`MAX_INDEX_RECORDS`] per block.
fn encode<T>(
    out: &mut Vec<u8>,
    kind: u16,
    sequence: u64,
    items: &[T],
    record_bytes: usize,
    put: impl Fn(&mut Vec<u8>, &T),
) {
    for chunk in items.chunks(MAX_INDEX_RECORDS) {
        let start = out.len();
        out.extend_from_slice(&[0; INDEX_HEADER_BYTES]);
        for item in chunk {
            put(out, item);
        }
        debug_assert_eq!(
            out.len() - start,
            INDEX_HEADER_BYTES + chunk.len() * record_bytes
        );
        seal_block(&mut out[start..], kind, sequence, chunk.len());
    }
}

/// Fills in the header of `block`, whose `records` records follow the header's room.
fn seal_block(block: &mut [u8], kind: u16, sequence: u64, records: usize) {
    let (header, body) = block.split_at_mut(INDEX_HEADER_BYTES);
    header[0..4].copy_from_slice(&INDEX_MAGIC);
    header[4..6].copy_from_slice(&INDEX_VERSION.to_le_bytes());
    header[6..8].copy_from_slice(&kind.to_le_bytes());
    header[8..12].copy_from_slice(&(records as u32).to_le_bytes());
    header[12..20].copy_from_slice(&sequence.to_le_bytes());
    let crc = crc32c::crc32c_append(crc32c::crc32c(&header[..20]), body);
    header[20..24].copy_from_slice(&crc.to_le_bytes());
}

/// The counts blocks of a flush, built as its apps are written: each count is put in place
/// as it comes, with room for a header before every [`MAX_INDEX_RECORDS`] of them, and
/// [`CountsBlocks::seal`] fills the headers in. The flush holds its counts once, as the bytes
/// it writes.
#[derive(Debug, Default)]
struct CountsBlocks {
    bytes: Vec<u8>,
    records: usize,
}

impl CountsBlocks {
    fn push(&mut self, app: &AppSha, events: u64) {
        if self.records.is_multiple_of(MAX_INDEX_RECORDS) {
            self.bytes.extend_from_slice(&[0; INDEX_HEADER_BYTES]);
        }
        self.bytes.extend_from_slice(&app.0);
        self.bytes.extend_from_slice(&events.to_le_bytes());
        self.records += 1;
    }

    fn is_empty(&self) -> bool {
        self.records == 0
    }

    fn clear(&mut self) {
        self.bytes.clear();
        self.records = 0;
        if self.bytes.capacity() > INDEX_BUF_KEEP_BYTES {
            self.bytes = Vec::new();
        }
    }

    /// Fills in every block's header: the bytes are then what [`encode_counts`] gives.
    fn seal(&mut self, sequence: u64) {
        let full = INDEX_HEADER_BYTES + MAX_INDEX_RECORDS * COUNTS_RECORD_BYTES;
        for (i, block) in self.bytes.chunks_mut(full).enumerate() {
            let records = (self.records - i * MAX_INDEX_RECORDS).min(MAX_INDEX_RECORDS);
            seal_block(block, KIND_COUNTS, sequence, records);
        }
    }
}

fn put_app(out: &mut Vec<u8>, app: &AppSha) {
    out.extend_from_slice(&app.0);
}

/// The bytes of a begin block (or blocks) naming `apps`.
pub fn encode_begin(out: &mut Vec<u8>, sequence: u64, apps: &[AppSha]) {
    encode(out, KIND_BEGIN, sequence, apps, BEGIN_RECORD_BYTES, put_app);
}

/// The bytes of a check block (or blocks) naming `apps`.
pub fn encode_check(out: &mut Vec<u8>, sequence: u64, apps: &[AppSha]) {
    encode(out, KIND_CHECK, sequence, apps, BEGIN_RECORD_BYTES, put_app);
}

/// The bytes of a counts block (or blocks) for `counts`.
pub fn encode_counts(out: &mut Vec<u8>, sequence: u64, counts: &[(AppSha, u64)]) {
    encode(
        out,
        KIND_COUNTS,
        sequence,
        counts,
        COUNTS_RECORD_BYTES,
        |out, (app, events)| {
            out.extend_from_slice(&app.0);
            out.extend_from_slice(&events.to_le_bytes());
        },
    );
}

/// One verified index block at the start of `bytes`: (kind, records, length).
fn parse(bytes: &[u8]) -> Option<(u16, u64, &[u8], usize)> {
    if bytes.len() < INDEX_HEADER_BYTES || bytes[0..4] != INDEX_MAGIC {
        return None;
    }
    let u16_at = |at: usize| u16::from_le_bytes([bytes[at], bytes[at + 1]]);
    let u32_at = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"));
    if u16_at(4) != INDEX_VERSION {
        return None;
    }
    let kind = u16_at(6);
    let record_bytes = match kind {
        KIND_BEGIN | KIND_CHECK => BEGIN_RECORD_BYTES,
        KIND_COUNTS => COUNTS_RECORD_BYTES,
        _ => return None,
    };
    let records = u32_at(8) as usize;
    if records == 0 || records > MAX_INDEX_RECORDS {
        return None;
    }
    let len = INDEX_HEADER_BYTES + records * record_bytes;
    if bytes.len() < len {
        return None;
    }
    let crc = crc32c::crc32c_append(
        crc32c::crc32c(&bytes[..20]),
        &bytes[INDEX_HEADER_BYTES..len],
    );
    if crc != u32_at(20) {
        return None;
    }
    let sequence = u64::from_le_bytes(bytes[12..20].try_into().expect("8 bytes"));
    Some((kind, sequence, &bytes[INDEX_HEADER_BYTES..len], len))
}

/// What an index block says, for readers that follow an index as it grows
/// ([`super::changes`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum BlockKind {
    /// A flush is about to write the logs of these apps.
    Begin,
    /// A flush wrote the logs of these apps (with their totals).
    Counts,
    /// The writer could not write the logs of these apps.
    Check,
}

/// One verified index block at the start of `bytes`: its kind, sequence, the apps it names
/// (in order) and its length in bytes. `None` when no whole verified block is there.
pub(crate) fn next_block(
    bytes: &[u8],
) -> Option<(BlockKind, u64, impl Iterator<Item = AppSha> + '_, usize)> {
    let (kind, sequence, records, len) = parse(bytes)?;
    let (kind, record_bytes) = match kind {
        KIND_BEGIN => (BlockKind::Begin, BEGIN_RECORD_BYTES),
        KIND_CHECK => (BlockKind::Check, BEGIN_RECORD_BYTES),
        _ => (BlockKind::Counts, COUNTS_RECORD_BYTES),
    };
    let apps = records
        .chunks_exact(record_bytes)
        .map(|record| AppSha(record[..32].try_into().expect("32 bytes")));
    Some((kind, sequence, apps, len))
}

/// Reads an index: per app the last count, and the apps of begins that no counts block
/// followed. Stops at the first block that does not verify. Also returns the bytes verified.
pub fn read_index(bytes: &[u8]) -> (IndexView, u64) {
    walk_index(bytes, true)
}

/// The apps an index leaves unsettled ([`IndexView::unsettled`], checks included), without
/// collecting its counts.
pub fn unsettled_apps(bytes: &[u8]) -> Vec<AppSha> {
    walk_index(bytes, false).0.unsettled
}

fn walk_index(bytes: &[u8], keep_counts: bool) -> (IndexView, u64) {
    let mut view = IndexView::default();
    let mut open: Vec<AppSha> = Vec::new();
    let mut open_sequence = None;
    let mut pos = 0;
    while let Some((kind, sequence, records, len)) = parse(&bytes[pos..]) {
        view.last_sequence = view.last_sequence.max(sequence);
        if kind == KIND_BEGIN {
            if open_sequence != Some(sequence) {
                // A new flush: what the previous one began and never counted stays unsettled.
                view.unsettled.append(&mut open);
                open_sequence = Some(sequence);
            }
            for sha in records.chunks_exact(BEGIN_RECORD_BYTES) {
                open.push(AppSha(sha.try_into().expect("32 bytes")));
            }
        } else if kind == KIND_CHECK {
            for sha in records.chunks_exact(BEGIN_RECORD_BYTES) {
                view.check.push(AppSha(sha.try_into().expect("32 bytes")));
            }
        } else {
            if open_sequence == Some(sequence) {
                open.clear();
            }
            if keep_counts {
                for record in records.chunks_exact(COUNTS_RECORD_BYTES) {
                    let app = AppSha(record[..32].try_into().expect("32 bytes"));
                    let events = u64::from_le_bytes(record[32..].try_into().expect("8 bytes"));
                    view.counts.insert(app, events);
                }
            }
        }
        pos += len;
    }
    view.unsettled.append(&mut open);
    // An app checked once stays checked: its log is read directly from then on.
    view.unsettled.extend_from_slice(&view.check);
    view.unsettled.sort_unstable();
    view.unsettled.dedup();
    view.check.sort_unstable();
    view.check.dedup();
    (view, pos as u64)
}

/// `<data-dir>/events/index`: where every writer's index lives.
pub fn index_dir(data: &DataDir) -> PathBuf {
    data.events_dir().join(INDEX_DIR)
}

/// The name of the index directory inside `events/`.
pub const INDEX_DIR: &str = "index";

/// `<data-dir>/events/index/<writer-id>.idx`.
pub fn index_path(data: &DataDir, writer_id: &str) -> PathBuf {
    index_dir(data).join(format!("{writer_id}.idx"))
}

/// The index grows by appends until it is this many times the size of its last rewrite
/// (and at least [`INDEX_REWRITE_MIN_BYTES`]), then it is rewritten with one count per app:
/// its size stays within a constant of one record per app, and the cost of the rewrites
/// within a constant of the bytes appended.
const INDEX_GROWTH: u64 = 2;
/// The writer keeps a buffer of index blocks up to this size between flushes.
const INDEX_BUF_KEEP_BYTES: usize = 4 << 20;
/// Smallest index that gets rewritten.
const INDEX_REWRITE_MIN_BYTES: u64 = 1 << 20;

/// Events in `writer_id`'s log of `app` (`None`: no log).
/// The app's directory must be a plain one: readers follow no link.
fn log_events(data: &DataDir, writer_id: &str, app: &AppSha) -> Result<Option<u64>, StoreError> {
    if !plain_dir(&data.app_dir(app))? {
        return Ok(None);
    }
    Ok(scan_log_file(&data.log_path(app, writer_id), |_, _| {})?.map(|s| s.events))
}

/// One writer's side of its index.
#[derive(Debug)]
pub(crate) struct IndexWriter {
    path: PathBuf,
    file: Option<File>,
    fsync: bool,
    /// Bytes in the file (all verified).
    len: u64,
    /// Size right after the last rewrite.
    rewritten_len: u64,
    sequence: u64,
    /// A begin was written and its counts were not yet.
    in_flush: bool,
    /// The file may not be what we think (a failed write, a reset moved the tree away):
    /// read it again, settle it and rewrite it before the next flush.
    stale: bool,
    counts: CountsBlocks,
    checks: Vec<AppSha>,
    buf: Vec<u8>,
    /// The writer's address index ([`super::addr_index`]), written before each counts
    /// block.
    addrs: AddrIndexWriter,
}

impl IndexWriter {
    /// Opens `writer_id`'s index, settling what a crash left unsettled, or builds it from the
    /// writer's logs when there is none.
    pub(crate) fn open(
        data: &DataDir,
        writer_id: &str,
        fsync: bool,
    ) -> Result<IndexWriter, StoreError> {
        let mut index = IndexWriter {
            path: index_path(data, writer_id),
            file: None,
            fsync,
            len: 0,
            rewritten_len: 0,
            sequence: 0,
            in_flush: false,
            stale: true,
            counts: CountsBlocks::default(),
            checks: Vec::new(),
            buf: Vec::new(),
            addrs: AddrIndexWriter::new(data, writer_id, fsync),
        };
        index.settle(data, writer_id)?;
        Ok(index)
    }

    /// Reads the index (or the writer's logs, when there is none), reads the logs of every
    /// unsettled app, and rewrites the index with one count per app.
    fn settle(&mut self, data: &DataDir, writer_id: &str) -> Result<(), StoreError> {
        self.file = None;
        let dir = index_dir(data);
        match fs::DirBuilder::new().mode(DIR_MODE).create(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io_err("creating directory", &dir)(e)),
        }
        let meta = fs::symlink_metadata(&dir).map_err(io_err("inspecting", &dir))?;
        if !meta.is_dir() {
            return Err(StoreError::NotADirectory(dir));
        }
        let mut counts: FxHashMap<AppSha, u64> = FxHashMap::default();
        match open_read(&self.path)? {
            Some(file) => {
                // The address index holds every pair of the logs except those of apps this
                // index leaves unsettled: opened (or rebuilt) once, then kept up by flushes.
                let addrs_built = !self.addrs.ready() && self.addrs.open(data, writer_id)?;
                let map =
                    crate::sys::map_read_only(&file).map_err(io_err("mapping", &self.path))?;
                let (view, _) = read_index(map.as_ref());
                self.sequence = view.last_sequence;
                counts = view.counts;
                let mut ips = Vec::new();
                for app in view.unsettled {
                    match log_addresses(data, writer_id, &app, &mut ips) {
                        Ok(Some(events)) if events > 0 => {
                            if !addrs_built {
                                self.addrs.add(&app, ips.iter().copied())?;
                            }
                            counts.insert(app, events)
                        }
                        Ok(_) => counts.remove(&app),
                        Err(_) => {
                            self.checks.push(app);
                            counts.remove(&app)
                        }
                    };
                }
                // Their pairs are in the address index before the index calls them settled.
                self.addrs.finish()?;
            }
            None => {
                // No app index: both are built from the writer's logs, in one walk.
                self.addrs.forget();
                self.addrs.build(data, writer_id, &mut |app, events| {
                    if events > 0 {
                        counts.insert(app, events);
                    }
                })?;
            }
        }
        let mut sorted: Vec<(AppSha, u64)> = counts.into_iter().collect();
        sorted.sort_unstable();
        self.buf.clear();
        encode_counts(&mut self.buf, self.sequence, &sorted);
        encode_check(&mut self.buf, self.sequence, &self.checks);
        self.checks.clear();
        write_atomic(&self.path, &self.buf)?;
        self.len = self.buf.len() as u64;
        self.rewritten_len = self.len;
        self.stale = false;
        Ok(())
    }

    /// True between [`IndexWriter::begin`] and [`IndexWriter::end`].
    pub(crate) fn in_flush(&self) -> bool {
        self.in_flush
    }

    /// After a reset moved the tree away: the next flush starts a new index.
    pub(crate) fn forget(&mut self) {
        self.stale = true;
        self.in_flush = false;
        self.file = None;
        self.addrs.forget();
    }

    /// Appends the buffer's blocks to the index, then syncs it (with `fsync`).
    fn write(&mut self) -> Result<(), StoreError> {
        self.append_buf(self.fsync)
    }

    /// Appends the buffer's blocks to the index; syncs it when `sync`.
    fn append_buf(&mut self, sync: bool) -> Result<(), StoreError> {
        if self.file.is_none() {
            let file = open_append(&self.path)?;
            self.file = Some(file);
        }
        let file = self.file.as_mut().expect("opened above");
        let written = self.buf.len() as u64;
        let result =
            file.write_all(&self.buf)
                .and_then(|()| if sync { file.sync_data() } else { Ok(()) });
        if self.buf.capacity() > INDEX_BUF_KEEP_BYTES {
            // A flush of very many apps: do not hold its buffer until the next one.
            self.buf = Vec::new();
        }
        match result {
            Ok(()) => {
                self.len += written;
                Ok(())
            }
            Err(e) => {
                // Part of a block may be there: settle and rewrite before the next flush.
                self.stale = true;
                Err(io_err("appending to", &self.path)(e))
            }
        }
    }

    /// Records that a flush is about to write the logs of `apps`.
    pub(crate) fn begin(
        &mut self,
        data: &DataDir,
        writer_id: &str,
        apps: &[AppSha],
    ) -> Result<(), StoreError> {
        if !self.stale && !self.still_in_place() {
            self.stale = true;
        }
        if self.stale || self.len >= INDEX_REWRITE_MIN_BYTES.max(self.rewritten_len * INDEX_GROWTH)
        {
            self.settle(data, writer_id)?;
        }
        self.sequence += 1;
        self.counts.clear();
        // One block per write, so the buffer holds one block and not a name per app of a
        // large flush. A crash between two writes leaves apps named that the flush has not
        // touched yet: their logs are read directly, and are as the index says.
        let mut blocks = apps.chunks(MAX_INDEX_RECORDS).peekable();
        while let Some(chunk) = blocks.next() {
            self.buf.clear();
            encode_begin(&mut self.buf, self.sequence, chunk);
            let last = blocks.peek().is_none();
            self.append_buf(self.fsync && last)?;
        }
        self.in_flush = true;
        Ok(())
    }

    /// The file at the index's path is the one this writer has open (a reset did not move
    /// the tree away).
    fn still_in_place(&self) -> bool {
        use std::os::unix::fs::MetadataExt;
        let Some(file) = &self.file else {
            return fs::symlink_metadata(&self.path).is_ok();
        };
        match (file.metadata(), fs::symlink_metadata(&self.path)) {
            (Ok(open), Ok(there)) => open.ino() == there.ino() && open.dev() == there.dev(),
            _ => false,
        }
    }

    /// Records `app`'s total events after this flush wrote its log.
    pub(crate) fn count(&mut self, app: &AppSha, events: u64) {
        self.counts.push(app, events);
    }

    /// Records that `app`'s log could not be written because something other than a plain
    /// directory or file stands in its place: readers then read it themselves (and report
    /// it).
    pub(crate) fn check(&mut self, app: &AppSha) {
        self.checks.push(*app);
    }

    /// Records the totals of every app the flush wrote, and the apps it could not write.
    pub(crate) fn end(&mut self) -> Result<(), StoreError> {
        self.in_flush = false;
        if let Err(e) = self.addrs.finish() {
            // Without the counts the flush's apps stay unsettled (readers read them
            // directly); the next flush settles the index, adding their pairs.
            self.stale = true;
            self.counts.clear();
            self.checks.clear();
            return Err(e);
        }
        if self.counts.is_empty() && self.checks.is_empty() {
            return Ok(());
        }
        // The counts are written from where they were built, the checks after them, in
        // one write.
        self.counts.seal(self.sequence);
        std::mem::swap(&mut self.buf, &mut self.counts.bytes);
        encode_check(&mut self.buf, self.sequence, &self.checks);
        self.counts.clear();
        self.checks.clear();
        self.write()?;
        if let Err(e) = self.addrs.merge() {
            // The runs stay as they were: a complete index, merged at a later flush.
            log::warn!("merging the address index: {e}");
        }
        Ok(())
    }

    /// Records that this flush wrote `ips` to `app`'s log, for the address index.
    pub(crate) fn addresses(&mut self, app: &AppSha, ips: impl Iterator<Item = u32>) {
        self.addrs.add_in_flush(app, ips);
    }
}

/// The writer ids that have an app index in `data`.
pub fn indexed_writers(data: &DataDir) -> Result<Vec<String>, StoreError> {
    let mut indexed = Vec::new();
    for_each_entry(&index_dir(data), |entry| {
        let name = entry.file_name();
        if let Some(id) = name.to_str().and_then(|n| n.strip_suffix(".idx")) {
            if validate_writer_id(id).is_ok() {
                indexed.push(id.to_string());
            }
        }
        Ok(())
    })?;
    Ok(indexed)
}

/// Makes readers of `writer_id`'s index read that writer's log of `app` themselves instead of
/// trusting the count the index holds (one app forgotten: its log is about to be removed),
/// for a writer that is not running (the caller holds its lock; a running writer does the
/// same through its [`AppendBlocks`](super::AppendBlocks)). It appends a begin block naming
/// the app and no counts after it, as a flush cut short would leave; the writer settles it
/// when it next opens its index. The file is rewritten beside itself (its verified blocks and
/// the new one) and renamed over, so a torn tail cannot hide the new block.
pub fn mark_unsettled(data: &DataDir, writer_id: &str, app: &AppSha) -> Result<(), StoreError> {
    let path = index_path(data, writer_id);
    let Some(bytes) = super::fsio::read_file(&path)? else {
        return Ok(());
    };
    let (view, verified) = read_index(&bytes);
    if !view.counts.contains_key(app) || view.unsettled.binary_search(app).is_ok() {
        // Readers already read that log themselves, or know nothing of the app.
        return Ok(());
    }
    let mut out = bytes[..verified as usize].to_vec();
    encode_begin(&mut out, view.last_sequence + 1, std::slice::from_ref(app));
    write_atomic(&path, &out)
}

/// Every app with its count from the writers' indexes: `Ok(None)` when there is no index,
/// or some writer under `receivers/` has none (logs written by an older version), and the
/// caller must read every log instead. Every writer registers under `receivers/` (its lock)
/// before it writes a log, so no writer's logs are missed.
pub fn list_from_indexes(data: &DataDir) -> Result<Option<Vec<AppCount>>, StoreError> {
    let indexed = indexed_writers(data)?;
    if indexed.is_empty() || data.writer_ids()?.iter().any(|id| !indexed.contains(id)) {
        return Ok(None);
    }
    let mut totals: FxHashMap<AppSha, u64> = FxHashMap::default();
    let mut unreadable: FxHashMap<AppSha, String> = FxHashMap::default();
    for writer_id in &indexed {
        let path = index_path(data, writer_id);
        let Some(file) = open_read(&path)? else {
            return Ok(None);
        };
        let map = crate::sys::map_read_only(&file).map_err(io_err("mapping", &path))?;
        let (mut view, _) = read_index(map.as_ref());
        for app in std::mem::take(&mut view.unsettled) {
            match log_events(data, writer_id, &app) {
                Ok(Some(events)) if events > 0 => view.counts.insert(app, events),
                Ok(_) => view.counts.remove(&app),
                Err(e) => {
                    unreadable.insert(app, e.to_string());
                    view.counts.remove(&app)
                }
            };
        }
        for (app, events) in view.counts {
            *totals.entry(app).or_default() += events;
        }
    }
    for app in unreadable.keys() {
        totals.entry(*app).or_default();
    }
    let mut out: Vec<AppCount> = totals
        .into_iter()
        .map(|(app, count)| AppCount {
            unreadable: unreadable.remove(&app),
            ..AppCount::new(app, count)
        })
        .collect();
    out.sort_unstable_by(|a, b| b.count.cmp(&a.count).then(a.app.cmp(&b.app)));
    Ok(Some(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_built_as_a_flush_goes_are_the_blocks_encoded_at_once() {
        let counts: Vec<(AppSha, u64)> = (0..MAX_INDEX_RECORDS as u64 + 1000)
            .map(|i| {
                let mut sha = [7; 32];
                sha[..8].copy_from_slice(&i.to_be_bytes());
                (AppSha(sha), i * 3 + 1)
            })
            .collect();
        for n in [1, 10, MAX_INDEX_RECORDS, counts.len()] {
            let mut built = CountsBlocks::default();
            for (app, events) in &counts[..n] {
                built.push(app, *events);
            }
            built.seal(42);
            let mut encoded = Vec::new();
            encode_counts(&mut encoded, 42, &counts[..n]);
            assert_eq!(built.bytes, encoded, "{n} counts");
            let (view, verified) = read_index(&built.bytes);
            assert_eq!(verified as usize, encoded.len());
            assert_eq!(view.counts.len(), n);
        }
    }
}
