//! The receiver's outbox: the flushes not yet shipped to the bucket, on local disk.
//!
//! `receivers/<writer-id>/outbox/<epoch, 20 digits>.ob`, one file per flush epoch, written
//! through a temporary file and a rename so it is whole or absent. A file is a sequence of
//! entries, one per app: the app's 32-byte SHA followed by one block of the log format
//! ([`ipevent_core::block`]: header with the epoch and a CRC-32C, then the records). The
//! shipper verifies every block before it ships; a file that does not verify is kept and
//! reported, never shipped in part.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use ipevent_core::block::{parse_block, BlockBuilder, BlockParse, BLOCK_RECORD_BYTES};
use ipevent_core::store::{self, DataDir, StoreError};
use ipevent_core::{AddrStats, AppSha};

/// File name suffix of an outbox entry.
const SUFFIX: &str = ".ob";

/// The outbox directory of `writer_id`.
pub fn dir(data: &DataDir, writer_id: &str) -> PathBuf {
    data.receiver_dir(writer_id).join("outbox")
}

/// The entry file of `epoch`.
pub fn entry_path(outbox: &Path, epoch: u64) -> PathBuf {
    outbox.join(format!("{epoch:020}{SUFFIX}"))
}

fn io_err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StoreError + 'a {
    move |source| StoreError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// The entries in `outbox`, oldest epoch first, with their sizes in bytes.
pub fn entries(outbox: &Path) -> Result<Vec<(u64, u64)>, StoreError> {
    let listing = match fs::read_dir(outbox) {
        Ok(listing) => listing,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err("listing", outbox)(e)),
    };
    let mut out = Vec::new();
    for entry in listing {
        let entry = entry.map_err(io_err("listing", outbox))?;
        let name = entry.file_name();
        let Some(epoch) = name
            .to_str()
            .and_then(|n| n.strip_suffix(SUFFIX))
            .filter(|n| n.len() == 20)
            .and_then(|n| n.parse::<u64>().ok())
        else {
            continue;
        };
        let bytes = entry.metadata().map_or(0, |m| m.len());
        out.push((epoch, bytes));
    }
    out.sort_unstable();
    Ok(out)
}

/// Builds one entry in memory as a flush goes through its apps.
#[derive(Debug, Default)]
pub struct EntryBuilder {
    epoch: u64,
    bytes: Vec<u8>,
    block: BlockBuilder,
    apps: usize,
}

impl EntryBuilder {
    /// Starts the entry of `epoch`, discarding what was there.
    pub fn begin(&mut self, epoch: u64) {
        self.epoch = epoch;
        self.bytes.clear();
        self.apps = 0;
    }

    /// Adds one app's addresses (sorted or not; never empty).
    pub fn add(&mut self, app: &AppSha, addrs: &[(u32, AddrStats)]) {
        for chunk in addrs.chunks(ipevent_core::block::MAX_RECORDS_PER_BLOCK / 2) {
            self.block.begin(self.epoch);
            for (ip, stats) in chunk {
                self.block.push(*ip, stats);
            }
            self.bytes.extend_from_slice(&app.0);
            self.bytes.extend_from_slice(self.block.finish());
        }
        self.apps += 1;
    }

    /// The entry's epoch.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// What the entry holds so far (to keep it when it could not be written).
    pub fn decode(&self) -> EntryApps {
        parse_entry(&self.bytes, self.epoch).expect("an entry this builder made parses")
    }

    /// Apps added since [`EntryBuilder::begin`].
    pub fn apps(&self) -> usize {
        self.apps
    }

    /// Writes the entry into `outbox` (whole or not at all); `fsync` makes it survive a
    /// power loss. Returns its size in bytes. Does nothing for an entry without apps.
    pub fn write(&self, outbox: &Path, fsync: bool) -> Result<u64, StoreError> {
        if self.apps == 0 {
            return Ok(0);
        }
        store::create_dir_all(outbox)?;
        let path = entry_path(outbox, self.epoch);
        store::write_atomic(&path, &self.bytes)?;
        if fsync {
            if let Some(file) = store::open_read(&path)? {
                file.sync_all().map_err(io_err("syncing", &path))?;
            }
            store::sync_dir(outbox)?;
        }
        Ok(self.bytes.len() as u64)
    }
}

/// What an entry holds, per app (an app split over several blocks appears once per block).
pub type EntryApps = Vec<(AppSha, Vec<(u32, AddrStats)>)>;

/// Reads and verifies the entry of `epoch`. An error names the file and what is wrong with it.
pub fn read_entry(outbox: &Path, epoch: u64) -> Result<EntryApps, String> {
    let path = entry_path(outbox, epoch);
    let bytes = store::read_file(&path)
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("{}: no such entry", path.display()))?;
    parse_entry(&bytes, epoch).map_err(|what| format!("{}: {what}", path.display()))
}

fn parse_entry(bytes: &[u8], epoch: u64) -> Result<EntryApps, String> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let Some(sha) = bytes.get(at..at + 32) else {
            return Err(format!("truncated at byte {at}"));
        };
        let mut app = [0u8; 32];
        app.copy_from_slice(sha);
        at += 32;
        let block = &bytes[at..];
        let (len, block_epoch, records) = match parse_block(block) {
            BlockParse::Ok {
                len,
                epoch,
                records,
                ..
            } => (len, epoch, records),
            BlockParse::Incomplete => return Err(format!("truncated block at byte {at}")),
            BlockParse::Corrupt(why) => return Err(format!("block at byte {at}: {why}")),
        };
        if block_epoch != epoch {
            return Err(format!(
                "block at byte {at} has epoch {block_epoch}, not {epoch}"
            ));
        }
        let mut addrs: Vec<(u32, AddrStats)> = Vec::with_capacity(records);
        let body = &block[len - records * BLOCK_RECORD_BYTES..len];
        for record in body.chunks_exact(BLOCK_RECORD_BYTES) {
            let word = |i: usize| {
                u32::from_le_bytes([record[i], record[i + 1], record[i + 2], record[i + 3]])
            };
            let stats = AddrStats {
                count: u64::from(word(4)),
                first_seen: word(8),
                last_seen: word(12),
            };
            // A count above u32::MAX comes as consecutive records of the same address.
            match addrs.last_mut() {
                Some((ip, acc)) if *ip == word(0) => acc.merge(&stats),
                _ => addrs.push((word(0), stats)),
            }
        }
        out.push((AppSha(app), addrs));
        at += len;
    }
    Ok(out)
}

/// Removes `app`'s records from every entry of `outbox` (a forget of the app): an entry left
/// without apps is removed, any other that held the app rewritten without it (whole or not at
/// all, synced). An entry that does not verify is left as it is: it is never shipped. Returns
/// how many entries were removed and how many bytes the outbox lost.
pub fn strip_app(outbox: &Path, app: &AppSha) -> Result<(u64, u64), StoreError> {
    let mut removed = 0u64;
    let mut freed = 0u64;
    let mut builder = EntryBuilder::default();
    for (epoch, bytes) in entries(outbox)? {
        let Ok(apps) = read_entry(outbox, epoch) else {
            continue;
        };
        if apps.iter().all(|(a, _)| a != app) {
            continue;
        }
        builder.begin(epoch);
        for (kept, addrs) in apps.iter().filter(|(a, _)| a != app) {
            builder.add(kept, addrs);
        }
        if builder.apps() == 0 {
            remove_entry(outbox, epoch)?;
            removed += 1;
            freed += bytes;
        } else {
            let written = builder.write(outbox, true)?;
            freed += bytes.saturating_sub(written);
        }
    }
    Ok((removed, freed))
}

/// Removes the entry of `epoch` (shipped, or already in the database).
pub fn remove_entry(outbox: &Path, epoch: u64) -> Result<(), StoreError> {
    let path = entry_path(outbox, epoch);
    match fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err("removing", &path)(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(count: u64, first: u32, last: u32) -> AddrStats {
        AddrStats {
            count,
            first_seen: first,
            last_seen: last,
        }
    }

    #[test]
    fn entries_round_trip_and_list_in_epoch_order() {
        let tmp = tempfile::tempdir().unwrap();
        let outbox = tmp.path().join("outbox");
        let a = AppSha([1; 32]);
        let b = AppSha([2; 32]);
        let mut builder = EntryBuilder::default();
        for epoch in [12u64, 3, 100] {
            builder.begin(epoch);
            builder.add(&a, &[(1, stats(2, 10, 20)), (7, stats(1, 15, 15))]);
            builder.add(&b, &[(9, stats(u64::from(u32::MAX) + 5, 1, 2))]);
            assert!(builder.write(&outbox, true).unwrap() > 0);
        }
        let listed: Vec<u64> = entries(&outbox).unwrap().iter().map(|e| e.0).collect();
        assert_eq!(listed, [3, 12, 100]);
        let apps = read_entry(&outbox, 12).unwrap();
        assert_eq!(
            apps,
            vec![
                (a, vec![(1, stats(2, 10, 20)), (7, stats(1, 15, 15))]),
                (b, vec![(9, stats(u64::from(u32::MAX) + 5, 1, 2))]),
            ]
        );
        remove_entry(&outbox, 12).unwrap();
        remove_entry(&outbox, 12).unwrap();
        assert_eq!(entries(&outbox).unwrap().len(), 2);
    }

    #[test]
    fn stripping_an_app_rewrites_or_removes_the_entries_that_held_it() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, b) = (AppSha([1; 32]), AppSha([2; 32]));
        let mut builder = EntryBuilder::default();
        builder.begin(1);
        builder.add(&a, &[(1, stats(2, 10, 20))]);
        builder.add(&b, &[(9, stats(1, 5, 5))]);
        builder.write(tmp.path(), false).unwrap();
        builder.begin(2);
        builder.add(&a, &[(3, stats(1, 30, 30))]);
        builder.write(tmp.path(), false).unwrap();
        builder.begin(3);
        builder.add(&b, &[(4, stats(1, 40, 40))]);
        builder.write(tmp.path(), false).unwrap();
        let before: u64 = entries(tmp.path()).unwrap().iter().map(|e| e.1).sum();
        let (removed, freed) = strip_app(tmp.path(), &a).unwrap();
        let after: u64 = entries(tmp.path()).unwrap().iter().map(|e| e.1).sum();
        assert_eq!((removed, freed), (1, before - after));
        let listed: Vec<u64> = entries(tmp.path()).unwrap().iter().map(|e| e.0).collect();
        assert_eq!(listed, [1, 3]);
        assert_eq!(
            read_entry(tmp.path(), 1).unwrap(),
            vec![(b, vec![(9, stats(1, 5, 5))])]
        );
        assert_eq!(
            read_entry(tmp.path(), 3).unwrap(),
            vec![(b, vec![(4, stats(1, 40, 40))])]
        );
        assert_eq!(strip_app(tmp.path(), &a).unwrap(), (0, 0));
    }

    #[test]
    fn a_damaged_entry_is_refused_whole() {
        let tmp = tempfile::tempdir().unwrap();
        let mut builder = EntryBuilder::default();
        builder.begin(5);
        builder.add(&AppSha([3; 32]), &[(1, stats(1, 1, 1))]);
        builder.write(tmp.path(), false).unwrap();
        let path = entry_path(tmp.path(), 5);
        let mut bytes = fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        fs::write(&path, &bytes).unwrap();
        assert!(read_entry(tmp.path(), 5).unwrap_err().contains("checksum"));
        bytes.truncate(40);
        fs::write(&path, &bytes).unwrap();
        assert!(read_entry(tmp.path(), 5).is_err());
        // An entry under another epoch's name is refused too.
        builder.write(tmp.path(), false).unwrap();
        fs::rename(&path, entry_path(tmp.path(), 6)).unwrap();
        assert!(read_entry(tmp.path(), 6).unwrap_err().contains("epoch"));
    }
}
