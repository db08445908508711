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
//! batches, from offset 4096
//!   0  epoch      8  the flush epoch the records were accepted for
//!   8  count      4  records
//!  12  crc32c     4  of the records
//!  16  records    count x 40: app SHA (32), ip (4), arrival unix seconds (4)
//! ```
//!
//! On start the writer replays the batches below `committed` whose checksum holds, skipping for
//! each app the records of epochs its log already holds (blocks carry their epoch), so a record
//! is never lost and never counted twice. After a flush that leaves nothing pending the journal
//! is rewound to empty.

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::atomic::{fence, Ordering};

use crate::aggregate::Record;
use crate::store::{io_err, StoreError, FILE_MODE};
use crate::wire::AppSha;

const MAGIC: [u8; 4] = *b"IPEJ";
const VERSION: u32 = 1;
/// Bytes before the first batch: one page, so batches start page-aligned.
pub const JOURNAL_HEADER_BYTES: usize = 4096;
const BATCH_HEADER_BYTES: usize = 16;
/// Bytes of one journaled record.
pub const JOURNAL_RECORD_BYTES: usize = 40;
/// Smallest journal accepted: the header and one full batch of a thousand records.
pub const MIN_JOURNAL_BYTES: u64 =
    (JOURNAL_HEADER_BYTES + BATCH_HEADER_BYTES + 1024 * JOURNAL_RECORD_BYTES) as u64;

/// Records recovered from a journal, with the epoch they were accepted for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplayBatch {
    /// The flush epoch the records were accepted for.
    pub epoch: u64,
    /// The records.
    pub records: Vec<Record>,
}

/// A journal file mapped for appending.
pub struct Journal {
    map: memmap2::MmapMut,
    committed: usize,
}

impl Journal {
    /// Opens (creating or resizing as needed) the journal at `path` with room for `bytes`, and
    /// returns it with the batches the previous run left in it.
    pub fn open(path: &Path, bytes: u64) -> Result<(Journal, Vec<ReplayBatch>), StoreError> {
        let bytes = bytes.max(MIN_JOURNAL_BYTES);
        let replay = match OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)
        {
            Ok(mut file) => {
                let mut content = Vec::new();
                file.read_to_end(&mut content)
                    .map_err(io_err("reading journal", path))?;
                parse(&content)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(io_err("opening journal", path)(e)),
        };
        let file: File = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(FILE_MODE)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)
            .map_err(io_err("opening journal", path))?;
        let current = file
            .metadata()
            .map_err(io_err("inspecting journal", path))?
            .len();
        let resized = current != bytes;
        if resized {
            // What it held is in `replay` and is written back below.
            file.set_len(0).map_err(io_err("resizing journal", path))?;
        }
        crate::sys::reserve(&file, bytes)
            .map_err(io_err("reserving disk space for journal", path))?;
        let map = crate::sys::map_read_write(&file).map_err(io_err("mapping journal", path))?;
        let mut journal = Journal { map, committed: 0 };
        journal.map[0..4].copy_from_slice(&MAGIC);
        journal.map[4..8].copy_from_slice(&VERSION.to_le_bytes());
        // The batches stay in the file until the caller has flushed them and rewinds.
        journal.committed = committed_of(&journal.map).unwrap_or(0);
        if replay.is_empty() || resized {
            journal.rewind();
        }
        if resized {
            // Until they are flushed, the replayed records must stay journaled.
            for batch in &replay {
                if !journal.append(batch.epoch, &batch.records) {
                    return Err(StoreError::Io {
                        action: "resizing journal",
                        path: path.to_path_buf(),
                        source: io::Error::other(
                            "the new size cannot hold the records still in it",
                        ),
                    });
                }
            }
        }
        Ok((journal, replay))
    }

    /// Bytes of batches held.
    pub fn used_bytes(&self) -> u64 {
        self.committed as u64
    }

    /// Bytes batches may use in all.
    pub fn capacity_bytes(&self) -> u64 {
        (self.map.len() - JOURNAL_HEADER_BYTES) as u64
    }

    /// Appends one batch. False when it does not fit (the caller flushes and rewinds first).
    pub fn append(&mut self, epoch: u64, records: &[Record]) -> bool {
        if records.is_empty() {
            return true;
        }
        let len = BATCH_HEADER_BYTES + records.len() * JOURNAL_RECORD_BYTES;
        let start = JOURNAL_HEADER_BYTES + self.committed;
        if start + len > self.map.len() {
            return false;
        }
        let body = &mut self.map[start + BATCH_HEADER_BYTES..start + len];
        for (slot, r) in body.chunks_exact_mut(JOURNAL_RECORD_BYTES).zip(records) {
            slot[..32].copy_from_slice(&r.app.0);
            slot[32..36].copy_from_slice(&r.ip.to_le_bytes());
            slot[36..40].copy_from_slice(&r.unix_secs.to_le_bytes());
        }
        let crc = crc32c::crc32c(body);
        let head = &mut self.map[start..start + BATCH_HEADER_BYTES];
        head[0..8].copy_from_slice(&epoch.to_le_bytes());
        head[8..12].copy_from_slice(&(records.len() as u32).to_le_bytes());
        head[12..16].copy_from_slice(&crc.to_le_bytes());
        // The batch must be in place before `committed` says so.
        fence(Ordering::SeqCst);
        self.committed += len;
        self.map[8..16].copy_from_slice(&(self.committed as u64).to_le_bytes());
        true
    }

    /// Forgets every batch: they are all in the store (or were discarded by a reset).
    pub fn rewind(&mut self) {
        self.committed = 0;
        self.map[8..16].copy_from_slice(&0u64.to_le_bytes());
    }
}

fn committed_of(content: &[u8]) -> Option<usize> {
    if content.len() < JOURNAL_HEADER_BYTES || content[0..4] != MAGIC {
        return None;
    }
    if u32::from_le_bytes(content[4..8].try_into().ok()?) != VERSION {
        return None;
    }
    let committed = u64::from_le_bytes(content[8..16].try_into().ok()?);
    usize::try_from(committed)
        .ok()
        .filter(|c| JOURNAL_HEADER_BYTES + c <= content.len())
}

/// The verified batches of a journal's bytes, stopping at the first that does not verify.
pub fn parse(content: &[u8]) -> Vec<ReplayBatch> {
    let Some(committed) = committed_of(content) else {
        return Vec::new();
    };
    let batches = &content[JOURNAL_HEADER_BYTES..JOURNAL_HEADER_BYTES + committed];
    let mut out = Vec::new();
    let mut pos = 0;
    while pos + BATCH_HEADER_BYTES <= batches.len() {
        let head = &batches[pos..pos + BATCH_HEADER_BYTES];
        let epoch = u64::from_le_bytes(head[0..8].try_into().expect("8 bytes"));
        let count = u32::from_le_bytes(head[8..12].try_into().expect("4 bytes")) as usize;
        let crc = u32::from_le_bytes(head[12..16].try_into().expect("4 bytes"));
        let end = pos + BATCH_HEADER_BYTES + count.saturating_mul(JOURNAL_RECORD_BYTES);
        if count == 0 || end > batches.len() {
            break;
        }
        let body = &batches[pos + BATCH_HEADER_BYTES..end];
        if crc32c::crc32c(body) != crc {
            break;
        }
        let records = body
            .chunks_exact(JOURNAL_RECORD_BYTES)
            .map(|slot| {
                let mut app = [0u8; 32];
                app.copy_from_slice(&slot[..32]);
                Record {
                    app: AppSha(app),
                    ip: u32::from_le_bytes(slot[32..36].try_into().expect("4 bytes")),
                    unix_secs: u32::from_le_bytes(slot[36..40].try_into().expect("4 bytes")),
                }
            })
            .collect();
        out.push(ReplayBatch { epoch, records });
        pos = end;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn records(n: u32) -> Vec<Record> {
        (0..n)
            .map(|i| Record {
                app: AppSha([i as u8; 32]),
                ip: i,
                unix_secs: 100 + i,
            })
            .collect()
    }

    #[test]
    fn batches_survive_a_reopen_until_rewound() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal");
        let (mut journal, replay) = Journal::open(&path, MIN_JOURNAL_BYTES).unwrap();
        assert!(replay.is_empty());
        assert!(journal.append(3, &records(5)));
        assert!(journal.append(4, &records(2)));
        drop(journal);
        let (mut journal, replay) = Journal::open(&path, MIN_JOURNAL_BYTES).unwrap();
        assert_eq!(replay.len(), 2);
        assert_eq!(
            (replay[0].epoch, replay[0].records.clone()),
            (3, records(5))
        );
        assert_eq!(replay[1].records, records(2));
        // Until rewound, new batches go after the old ones.
        assert!(journal.append(5, &records(1)));
        drop(journal);
        let (mut journal, replay) = Journal::open(&path, MIN_JOURNAL_BYTES).unwrap();
        assert_eq!(replay.len(), 3);
        journal.rewind();
        drop(journal);
        let (_, replay) = Journal::open(&path, MIN_JOURNAL_BYTES).unwrap();
        assert!(replay.is_empty());
    }

    #[test]
    fn a_full_journal_refuses_and_a_bad_batch_ends_replay() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal");
        let (mut journal, _) = Journal::open(&path, MIN_JOURNAL_BYTES).unwrap();
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
        let replay = parse(&bytes);
        assert_eq!(replay.len(), 1);
        assert_eq!(replay[0].records.len(), 1000);
    }
}
