//! The journal: every accepted record is copied into a memory-mapped file before it is
//! aggregated, so a receiver that dies between flushes (SIGKILL, OOM kill, panic) loses nothing
//! it had accepted. Pages stored through a shared mapping belong to the page cache, not to the
//! process, and survive its death.
//!
//! ```text
//! header, 4096 bytes
//!   0  magic      4  "IPEJ"
//!   4  version    4  1
//!   8  committed  8  bytes of whole batches after the header
//!  16  epoch      8  the highest flush epoch the writer has begun (0: not recorded)
//! batches, from offset 4096
//!   0  epoch      8  the flush epoch the records were accepted for
//!   8  count      4  records, 1 ..= MAX_BATCH_RECORDS
//!  12  crc32c     4  of the records
//!  16  records    count x 40: app SHA (32), ip (4), arrival unix seconds (4)
//! ```
//!
//! On start the writer replays the batches below `committed` whose checksum holds, skipping for
//! each app the records of epochs its log already holds (blocks carry their epoch), so a record
//! is never lost and never counted twice. After a flush that leaves nothing pending the journal
//! is rewound to empty.
//!
//! That rule needs every new epoch to be higher than every epoch already in the store. The
//! header's `epoch` is written before the first block of a flush (write-ahead), through the
//! mapping, which cannot fail for lack of space; so it is at least the highest epoch in this
//! writer's logs whatever happened to `state.json`. Replay streams the batches through one small
//! buffer, so starting on a full journal costs no more memory than starting on an empty one.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{fence, Ordering};

use crate::aggregate::Record;
use crate::store::fsio::{io_err, open_read_write, StoreError};
use crate::wire::AppSha;

mod forget;
mod stopped;
pub use forget::{drop_all, drop_app};
pub use stopped::{for_each_stopped_record, read};

const MAGIC: [u8; 4] = *b"IPEJ";
/// Journal format version this build writes and reads.
pub const VERSION: u32 = 1;
/// Bytes before the first batch: one page, so batches start page-aligned.
pub const JOURNAL_HEADER_BYTES: usize = 4096;
const BATCH_HEADER_BYTES: usize = 16;
/// Bytes of one journaled record.
pub const JOURNAL_RECORD_BYTES: usize = 40;
/// Most records in one batch: bounds the buffer replay reads a batch into (640 KiB), whatever
/// a damaged header claims. Longer appends are split.
pub const MAX_BATCH_RECORDS: usize = 1 << 14;
/// Smallest journal accepted: the header and one full batch of a thousand records.
pub const MIN_JOURNAL_BYTES: u64 =
    (JOURNAL_HEADER_BYTES + BATCH_HEADER_BYTES + 1024 * JOURNAL_RECORD_BYTES) as u64;

/// Why a journal cannot be used. Each message names the file and what to do.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// Reading, creating or mapping it failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Written by a build with another journal format: its records cannot be read here, and
    /// throwing them away would lose accepted events.
    #[error(
        "journal {path} has format version {found}, this build reads version {VERSION}; it may \
         hold accepted events not yet in the store: run the build that wrote it and stop it \
         with SIGTERM to flush them, or move the file away to discard them"
    )]
    Version {
        /// The journal.
        path: PathBuf,
        /// The version it holds.
        found: u32,
    },
    /// Not a journal at all.
    #[error(
        "{path} is not an ipevent journal (it starts with {found:02x?}); move it away if it \
         is not needed"
    )]
    Foreign {
        /// The file.
        path: PathBuf,
        /// Its first bytes.
        found: [u8; 4],
    },
}

/// What a journal's header says.
#[derive(Debug, Clone, Copy, Default)]
struct Header {
    committed: usize,
    epoch: u64,
}

impl Header {
    /// Reads the header of a journal `len` bytes long. `Ok(None)`: an empty or never-written
    /// file (all zeros), which holds nothing.
    fn read(file: &File, len: u64, path: &Path) -> Result<Option<Header>, JournalError> {
        if len == 0 {
            return Ok(None);
        }
        let mut head = [0u8; 24];
        let got = read_at_most(file, &mut head, 0).map_err(io_err("reading journal", path))?;
        if got < head.len() {
            if head[..got].iter().all(|b| *b == 0) {
                return Ok(None);
            }
            return Err(JournalError::Foreign {
                path: path.to_path_buf(),
                found: head[0..4].try_into().expect("4 bytes"),
            });
        }
        if head.iter().all(|b| *b == 0) {
            return Ok(None);
        }
        if head[0..4] != MAGIC {
            return Err(JournalError::Foreign {
                path: path.to_path_buf(),
                found: head[0..4].try_into().expect("4 bytes"),
            });
        }
        let version = u32::from_le_bytes(head[4..8].try_into().expect("4 bytes"));
        if version != VERSION {
            return Err(JournalError::Version {
                path: path.to_path_buf(),
                found: version,
            });
        }
        let committed = u64::from_le_bytes(head[8..16].try_into().expect("8 bytes"));
        let epoch = u64::from_le_bytes(head[16..24].try_into().expect("8 bytes"));
        let room = len.saturating_sub(JOURNAL_HEADER_BYTES as u64);
        if committed > room {
            log::warn!(
                "journal {}: header says {committed} bytes of batches but the file holds {room}; \
                 replaying what verifies",
                path.display()
            );
        }
        Ok(Some(Header {
            committed: usize::try_from(committed.min(room)).unwrap_or(usize::MAX),
            epoch,
        }))
    }
}

/// Reads into `buf` from `offset` until it is full or the file ends; returns the bytes read.
fn read_at_most(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// What a replay found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Replayed {
    /// Verified batches.
    pub batches: u64,
    /// Records in them.
    pub records: u64,
    /// The highest epoch among them (0 when there were none).
    pub max_epoch: u64,
    /// Bytes below `committed` after the last verified batch (a damaged batch ended replay).
    pub unverified_bytes: u64,
}

/// Calls `each` with every verified batch below `committed`, in order, stopping at the first
/// that does not verify. Reads through one buffer of at most one batch.
fn stream(
    file: &File,
    committed: usize,
    path: &Path,
    mut each: impl FnMut(u64, &[Record]),
) -> Result<Replayed, JournalError> {
    let mut out = Replayed::default();
    let mut body = Vec::new();
    let mut records = Vec::new();
    let mut pos = 0usize;
    while pos + BATCH_HEADER_BYTES <= committed {
        let mut head = [0u8; BATCH_HEADER_BYTES];
        let at = (JOURNAL_HEADER_BYTES + pos) as u64;
        let got = read_at_most(file, &mut head, at).map_err(io_err("reading journal", path))?;
        if got < head.len() {
            break;
        }
        let epoch = u64::from_le_bytes(head[0..8].try_into().expect("8 bytes"));
        let count = u32::from_le_bytes(head[8..12].try_into().expect("4 bytes")) as usize;
        let crc = u32::from_le_bytes(head[12..16].try_into().expect("4 bytes"));
        let len = count * JOURNAL_RECORD_BYTES;
        if count == 0 || count > MAX_BATCH_RECORDS || pos + BATCH_HEADER_BYTES + len > committed {
            break;
        }
        body.resize(len, 0);
        let got = read_at_most(file, &mut body, at + BATCH_HEADER_BYTES as u64)
            .map_err(io_err("reading journal", path))?;
        if got < len || crc32c::crc32c(&body) != crc {
            break;
        }
        records.clear();
        records.extend(body.chunks_exact(JOURNAL_RECORD_BYTES).map(decode_record));
        each(epoch, &records);
        out.batches += 1;
        out.records += count as u64;
        out.max_epoch = out.max_epoch.max(epoch);
        pos += BATCH_HEADER_BYTES + len;
    }
    out.unverified_bytes = (committed - pos.min(committed)) as u64;
    Ok(out)
}

fn decode_record(slot: &[u8]) -> Record {
    let mut app = [0u8; 32];
    app.copy_from_slice(&slot[..32]);
    Record {
        app: AppSha(app),
        ip: u32::from_le_bytes(slot[32..36].try_into().expect("4 bytes")),
        unix_secs: u32::from_le_bytes(slot[36..40].try_into().expect("4 bytes")),
    }
}

/// A journal file mapped for appending.
pub struct Journal {
    path: PathBuf,
    file: File,
    map: memmap2::MmapMut,
    committed: usize,
    epoch: u64,
}

impl Journal {
    /// Opens the journal at `path` with room for `bytes`, creating it or resizing it as needed.
    /// The batches the previous run left stay in it until the caller has replayed them
    /// ([`Journal::replay`]), flushed them and [`rewind`](Journal::rewind)s. A journal of
    /// another format version, or a file that is no journal, is refused and left untouched.
    pub fn open(path: &Path, bytes: u64) -> Result<Journal, JournalError> {
        let bytes = bytes.max(MIN_JOURNAL_BYTES);
        let file = open_read_write(path)?;
        let len = file
            .metadata()
            .map_err(io_err("inspecting journal", path))?
            .len();
        let header = Header::read(&file, len, path)?;
        let held = header.map_or(0, |h| (JOURNAL_HEADER_BYTES + h.committed) as u64);
        let size = if len > bytes && held > bytes {
            log::warn!(
                "journal {} holds {held} bytes of accepted events, more than --journal-bytes \
                 {bytes}; it keeps its size of {len} bytes until they are flushed",
                path.display()
            );
            len
        } else {
            bytes
        };
        if len > size {
            // Only batches past everything held are cut.
            file.set_len(size)
                .map_err(io_err("resizing journal", path))?;
        }
        crate::sys::reserve(&file, size)
            .map_err(io_err("reserving disk space for journal", path))?;
        let map = crate::sys::map_read_write(&file).map_err(io_err("mapping journal", path))?;
        let mut journal = Journal {
            path: path.to_path_buf(),
            file,
            map,
            committed: 0,
            epoch: 0,
        };
        match header {
            Some(header) => {
                journal.committed = header.committed;
                journal.epoch = header.epoch;
            }
            None => {
                encode_header(&mut journal.map[..JOURNAL_HEADER_BYTES], 0, 0);
            }
        }
        Ok(journal)
    }

    /// The path of the file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The highest flush epoch the header records (0: none recorded: a new journal, or one an
    /// earlier build wrote). Every epoch in this writer's logs is at most this, unless it is 0.
    pub fn recorded_epoch(&self) -> u64 {
        self.epoch
    }

    /// Calls `each` with every batch the previous run left, in order. The batches stay in the
    /// journal until it is rewound.
    pub fn replay(&self, each: impl FnMut(u64, &[Record])) -> Result<Replayed, JournalError> {
        stream(&self.file, self.committed, &self.path, each)
    }

    /// Records that the writer begins flush `epoch` (or starts at it), before any block of it
    /// is written. Epochs only grow. With `durable`, the header page is written to disk first,
    /// for writers that `fdatasync` their logs.
    pub fn begin_epoch(&mut self, epoch: u64, durable: bool) -> Result<(), StoreError> {
        assert!(
            epoch >= self.epoch,
            "flush epochs only grow: {epoch} after {}",
            self.epoch
        );
        self.epoch = epoch;
        self.write_header();
        if durable {
            self.map
                .flush_range(0, JOURNAL_HEADER_BYTES)
                .map_err(io_err("syncing journal", &self.path))?;
        }
        Ok(())
    }

    /// Bytes of batches held.
    pub fn used_bytes(&self) -> u64 {
        self.committed as u64
    }

    /// Bytes batches may use in all.
    pub fn capacity_bytes(&self) -> u64 {
        (self.map.len() - JOURNAL_HEADER_BYTES) as u64
    }

    /// Appends `records`, accepted for `epoch`, which must be the one after the last begun
    /// ([`Journal::begin_epoch`]): the next flush's. False when they do not fit (the caller
    /// flushes and rewinds first).
    pub fn append(&mut self, epoch: u64, records: &[Record]) -> bool {
        assert_eq!(
            epoch,
            self.epoch + 1,
            "a journaled batch belongs to the next flush"
        );
        if records.is_empty() {
            return true;
        }
        let batches = records.len().div_ceil(MAX_BATCH_RECORDS);
        let len = batches * BATCH_HEADER_BYTES + records.len() * JOURNAL_RECORD_BYTES;
        if JOURNAL_HEADER_BYTES + self.committed + len > self.map.len() {
            return false;
        }
        for chunk in records.chunks(MAX_BATCH_RECORDS) {
            self.append_batch(epoch, chunk);
        }
        true
    }

    fn append_batch(&mut self, epoch: u64, records: &[Record]) {
        let len = batch_bytes(records.len());
        let start = JOURNAL_HEADER_BYTES + self.committed;
        encode_batch(&mut self.map[start..start + len], epoch, records);
        // The batch must be in place before `committed` says so.
        fence(Ordering::SeqCst);
        self.committed += len;
        self.write_header();
    }

    /// Forgets every batch: they are all in the store (or were discarded by a reset).
    pub fn rewind(&mut self) {
        self.committed = 0;
        self.write_header();
    }

    fn write_header(&mut self) {
        self.map[8..16].copy_from_slice(&(self.committed as u64).to_le_bytes());
        self.map[16..24].copy_from_slice(&self.epoch.to_le_bytes());
    }
}

/// Bytes of one batch of `records` records: its header and the records.
fn batch_bytes(records: usize) -> usize {
    BATCH_HEADER_BYTES + records * JOURNAL_RECORD_BYTES
}

/// Writes one batch of `records` of `epoch` into `batch`, which is exactly
/// [`batch_bytes`]`(records.len())` long: the format [`stream`] reads.
fn encode_batch(batch: &mut [u8], epoch: u64, records: &[Record]) {
    let (head, body) = batch.split_at_mut(BATCH_HEADER_BYTES);
    for (slot, r) in body.chunks_exact_mut(JOURNAL_RECORD_BYTES).zip(records) {
        slot[..32].copy_from_slice(&r.app.0);
        slot[32..36].copy_from_slice(&r.ip.to_le_bytes());
        slot[36..40].copy_from_slice(&r.unix_secs.to_le_bytes());
    }
    let crc = crc32c::crc32c(body);
    head[0..8].copy_from_slice(&epoch.to_le_bytes());
    head[8..12].copy_from_slice(&(records.len() as u32).to_le_bytes());
    head[12..16].copy_from_slice(&crc.to_le_bytes());
}

/// Writes a journal header into `head`: magic, version, `committed` bytes of batches and the
/// flush `epoch` begun.
fn encode_header(head: &mut [u8], committed: u64, epoch: u64) {
    head[0..4].copy_from_slice(&MAGIC);
    head[4..8].copy_from_slice(&VERSION.to_le_bytes());
    head[8..16].copy_from_slice(&committed.to_le_bytes());
    head[16..24].copy_from_slice(&epoch.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn records(n: u32) -> Vec<Record> {
        (0..n)
            .map(|i| Record {
                app: AppSha([i as u8; 32]),
                ip: i,
                unix_secs: 100 + i,
            })
            .collect()
    }

    pub(super) fn replayed(journal: &Journal) -> Vec<(u64, Vec<Record>)> {
        let mut out = Vec::new();
        journal
            .replay(|epoch, records| out.push((epoch, records.to_vec())))
            .unwrap();
        out
    }

    #[test]
    fn batches_survive_a_reopen_until_rewound() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal");
        let mut journal = Journal::open(&path, MIN_JOURNAL_BYTES).unwrap();
        assert!(replayed(&journal).is_empty());
        assert_eq!(journal.recorded_epoch(), 0);
        journal.begin_epoch(2, false).unwrap();
        assert!(journal.append(3, &records(5)));
        assert!(journal.append(3, &records(2)));
        drop(journal);
        let mut journal = Journal::open(&path, MIN_JOURNAL_BYTES).unwrap();
        assert_eq!(journal.recorded_epoch(), 2);
        let replay = replayed(&journal);
        assert_eq!(replay, vec![(3, records(5)), (3, records(2))]);
        // Until rewound, new batches go after the old ones.
        journal.begin_epoch(3, false).unwrap();
        assert!(journal.append(4, &records(1)));
        drop(journal);
        let mut journal = Journal::open(&path, MIN_JOURNAL_BYTES).unwrap();
        assert_eq!(replayed(&journal).len(), 3);
        journal.rewind();
        drop(journal);
        let journal = Journal::open(&path, MIN_JOURNAL_BYTES).unwrap();
        assert!(replayed(&journal).is_empty());
        assert_eq!(journal.recorded_epoch(), 3, "the epoch outlives a rewind");
    }

    #[test]
    fn a_full_journal_refuses_and_a_bad_batch_ends_replay() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal");
        let mut journal = Journal::open(&path, MIN_JOURNAL_BYTES).unwrap();
        assert!(journal.append(1, &records(1000)));
        assert!(!journal.append(1, &records(100)), "over capacity");
        assert!(journal.append(1, &records(2)));
        drop(journal);
        let mut bytes = std::fs::read(&path).unwrap();
        // Corrupt the second batch's records: only the first is replayed.
        let second = JOURNAL_HEADER_BYTES
            + BATCH_HEADER_BYTES
            + 1000 * JOURNAL_RECORD_BYTES
            + BATCH_HEADER_BYTES;
        bytes[second] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        let mut seen = Vec::new();
        let replay = read(&path, |_, records| seen.push(records.len()))
            .unwrap()
            .unwrap();
        assert_eq!(seen, vec![1000]);
        assert_eq!(
            replay.unverified_bytes,
            (BATCH_HEADER_BYTES + 2 * JOURNAL_RECORD_BYTES) as u64
        );
        assert_eq!(
            std::fs::read(&path).unwrap(),
            bytes,
            "reading changes nothing"
        );
    }

    #[test]
    fn a_resize_keeps_what_is_held() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal");
        let mut journal = Journal::open(&path, MIN_JOURNAL_BYTES * 4).unwrap();
        for _ in 0..3 {
            assert!(journal.append(1, &records(1000)));
        }
        drop(journal);
        // Larger: everything stays.
        let journal = Journal::open(&path, MIN_JOURNAL_BYTES * 8).unwrap();
        assert_eq!(replayed(&journal).len(), 3);
        assert_eq!(
            journal.capacity_bytes(),
            MIN_JOURNAL_BYTES * 8 - JOURNAL_HEADER_BYTES as u64
        );
        drop(journal);
        // Too small for what it holds: it keeps its size until that is flushed.
        let mut journal = Journal::open(&path, MIN_JOURNAL_BYTES).unwrap();
        assert_eq!(replayed(&journal).len(), 3);
        assert_eq!(
            journal.capacity_bytes(),
            MIN_JOURNAL_BYTES * 8 - JOURNAL_HEADER_BYTES as u64
        );
        journal.rewind();
        drop(journal);
        let journal = Journal::open(&path, MIN_JOURNAL_BYTES).unwrap();
        assert_eq!(
            journal.capacity_bytes(),
            MIN_JOURNAL_BYTES - JOURNAL_HEADER_BYTES as u64
        );
    }

    #[test]
    fn a_journal_of_another_version_or_no_journal_is_refused_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal");
        let mut bytes = vec![0u8; MIN_JOURNAL_BYTES as usize];
        bytes[0..4].copy_from_slice(&MAGIC);
        bytes[4..8].copy_from_slice(&2u32.to_le_bytes());
        std::fs::write(&path, &bytes).unwrap();
        let err = Journal::open(&path, MIN_JOURNAL_BYTES).err().unwrap();
        assert!(
            matches!(err, JournalError::Version { found: 2, .. }),
            "{err}"
        );
        let message = err.to_string();
        assert!(message.contains(&path.display().to_string()), "{message}");
        assert!(!message.contains('\n'));
        assert_eq!(std::fs::read(&path).unwrap(), bytes);

        bytes[0..4].copy_from_slice(b"junk");
        std::fs::write(&path, &bytes).unwrap();
        let err = Journal::open(&path, MIN_JOURNAL_BYTES).err().unwrap();
        assert!(matches!(err, JournalError::Foreign { .. }), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), bytes);
    }

    #[test]
    #[should_panic(expected = "belongs to the next flush")]
    fn a_batch_for_another_epoch_is_a_bug() {
        let dir = tempfile::tempdir().unwrap();
        let mut journal = Journal::open(&dir.path().join("journal"), MIN_JOURNAL_BYTES).unwrap();
        journal.begin_epoch(5, false).unwrap();
        journal.append(5, &records(1));
    }
}
