//! The file tree's [`ChangeFeed`]: which apps each flush wrote, read from the writers' app
//! indexes ([`super::index`]) as they grow, so that `watch` re-reads only those apps.
//!
//! Every flush already appends to its writer's index a *begin* block naming the apps it is
//! about to write and, once their logs are written, a *counts* block naming them again. The
//! feed keeps each index open and reads only what was appended since its last look; the
//! apps of each counts (and check) block are the changed ones, in flush order. Nothing is
//! added to the flush path.
//!
//! An index is replaced whole (renamed over) when its writer settles it at start or after
//! it doubled, and moves away with `events/` on a reset. The feed notices the new file by
//! its inode, first reads what the old one still held through its open handle, then reads
//! the new one from its start. A settled index starts with a *snapshot*: counts (and check)
//! blocks of the writer's last sequence naming every app. When the feed has read that
//! sequence already, the snapshot holds nothing new and is skipped; otherwise (flushes the
//! feed never saw, or a writer it never followed) every app of the snapshot is named, which
//! costs a read of each but misses nothing. Apps of a begin that no counts followed (a crash
//! in the middle of a flush) are named when the index is replaced.

use rustc_hash::FxHashSet;
use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::MetadataExt;

use super::backend::ChangeFeed;
use super::fsio::{for_each_entry, io_err, open_read, StoreError};
use super::index::{index_dir, index_path, next_block, BlockKind};
use super::layout::{validate_writer_id, DataDir};
use crate::wire::AppSha;

/// Follows every writer's app index under `events/index/`.
#[derive(Debug)]
pub struct IndexFeed {
    data: DataDir,
    /// Per writer id, where its index was read up to.
    tails: BTreeMap<String, Tail>,
    /// Apps named in the current call (each once).
    named: FxHashSet<AppSha>,
}

/// One writer's index as far as the feed has read it.
#[derive(Debug, Default)]
struct Tail {
    /// The file read (kept open, so that what was appended before a rename is not lost).
    file: Option<File>,
    /// Its device and inode.
    id: Option<(u64, u64)>,
    /// Bytes of it read: the verified blocks.
    offset: u64,
    /// Highest sequence read from this writer's index (over every file of it).
    last_sequence: Option<u64>,
    /// Apps of the last begin that no counts block has followed yet, and its sequence.
    open: Vec<AppSha>,
    open_sequence: Option<u64>,
}

/// How a replacing file's leading snapshot is taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Snapshot {
    /// The file is read from where the feed left it: no snapshot.
    None,
    /// A new file of a writer: its snapshot names every app unless the feed has read its
    /// sequence already.
    Lead,
}

impl IndexFeed {
    /// Starts at the current end of every writer's index: only flushes that finish from now
    /// on are reported. An index that appears later (a new writer) is read from its start.
    pub fn start(data: &DataDir) -> Result<IndexFeed, StoreError> {
        data.check_layout()?;
        let mut feed = IndexFeed {
            data: data.clone(),
            tails: BTreeMap::new(),
            named: FxHashSet::default(),
        };
        for writer_id in feed.writer_ids()? {
            let mut tail = Tail::default();
            tail.follow(&index_path(data, &writer_id), &mut |_| {})?;
            feed.tails.insert(writer_id, tail);
        }
        Ok(feed)
    }

    /// The writer ids that have an index now, sorted.
    fn writer_ids(&self) -> Result<Vec<String>, StoreError> {
        let mut ids = Vec::new();
        for_each_entry(&index_dir(&self.data), |entry| {
            let name = entry.file_name();
            if let Some(id) = name.to_str().and_then(|n| n.strip_suffix(".idx")) {
                if validate_writer_id(id).is_ok() {
                    ids.push(id.to_string());
                }
            }
            Ok(())
        })?;
        ids.sort_unstable();
        Ok(ids)
    }
}

impl ChangeFeed for IndexFeed {
    fn changed(&mut self, out: &mut Vec<AppSha>) -> Result<(), StoreError> {
        self.named.clear();
        for writer_id in self.writer_ids()? {
            self.tails.entry(writer_id).or_default();
        }
        let named = &mut self.named;
        let mut name = |app: AppSha| {
            if named.insert(app) {
                out.push(app);
            }
        };
        for (writer_id, tail) in &mut self.tails {
            tail.follow(&index_path(&self.data, writer_id), &mut name)?;
        }
        Ok(())
    }
}

impl Tail {
    /// Reads what was appended to the file held, and the file that replaced it if one did,
    /// naming the apps they say were written.
    fn follow(
        &mut self,
        path: &std::path::Path,
        name: &mut impl FnMut(AppSha),
    ) -> Result<(), StoreError> {
        self.read_more(path, Snapshot::None, name)?;
        let there = match fs::symlink_metadata(path) {
            Ok(meta) if meta.is_file() => (meta.dev(), meta.ino()),
            // Moved away with the tree by a reset, not made yet, or not a file (which the
            // writers refuse too): keep what is held until a file is there.
            Ok(_) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io_err("inspecting", path)(e)),
        };
        if self.id == Some(there) {
            return Ok(());
        }
        // Replaced: what the old file got before the rename, then the new one from its start.
        self.read_more(path, Snapshot::None, name)?;
        for app in self.open.drain(..) {
            name(app);
        }
        self.open_sequence = None;
        let Some(file) = open_read(path)? else {
            return Ok(());
        };
        let meta = file.metadata().map_err(io_err("inspecting", path))?;
        self.id = Some((meta.dev(), meta.ino()));
        self.file = Some(file);
        self.offset = 0;
        self.read_more(path, Snapshot::Lead, name)
    }

    /// Reads the verified blocks appended to the file held since the last read.
    fn read_more(
        &mut self,
        path: &std::path::Path,
        snapshot: Snapshot,
        name: &mut impl FnMut(AppSha),
    ) -> Result<(), StoreError> {
        let Some(file) = &self.file else {
            return Ok(());
        };
        let map = crate::sys::map_read_only(file).map_err(io_err("mapping", path))?;
        let bytes = map.as_ref();
        let Some(new) = usize::try_from(self.offset)
            .ok()
            .and_then(|offset| bytes.get(offset..))
        else {
            return Ok(());
        };
        let read = self.consume(new, snapshot, name);
        self.offset += read as u64;
        Ok(())
    }

    /// Takes the blocks at the start of `bytes` until one does not verify; returns the bytes
    /// taken.
    fn consume(
        &mut self,
        bytes: &[u8],
        snapshot: Snapshot,
        name: &mut impl FnMut(AppSha),
    ) -> usize {
        let mut pos = 0;
        // The leading snapshot of a new file: its sequence, and whether to name its apps.
        let mut lead: Option<(u64, bool)> = None;
        let mut in_lead = snapshot == Snapshot::Lead;
        while let Some((kind, sequence, apps, len)) = next_block(&bytes[pos..]) {
            pos += len;
            if in_lead && kind != BlockKind::Begin {
                let (lead_sequence, naming) =
                    *lead.get_or_insert_with(|| (sequence, self.last_sequence != Some(sequence)));
                if sequence == lead_sequence {
                    if naming {
                        apps.for_each(&mut *name);
                    }
                    self.seen(sequence);
                    continue;
                }
            }
            in_lead = false;
            match kind {
                BlockKind::Begin => {
                    if self.open_sequence != Some(sequence) {
                        // A flush begun and never counted (it failed to end): its apps may
                        // have changed.
                        for app in self.open.drain(..) {
                            name(app);
                        }
                        self.open_sequence = Some(sequence);
                    }
                    self.open.extend(apps);
                }
                BlockKind::Counts | BlockKind::Check => {
                    if self.open_sequence == Some(sequence) {
                        self.open.clear();
                        self.open_sequence = None;
                    }
                    apps.for_each(&mut *name);
                }
            }
            self.seen(sequence);
        }
        pos
    }

    fn seen(&mut self, sequence: u64) {
        self.last_sequence = Some(self.last_sequence.map_or(sequence, |s| s.max(sequence)));
    }
}
