//! The log block: the unit the store appends and the only thing a reader trusts.
//!
//! A log file is a sequence of blocks. All integers are little-endian.
//!
//! ```text
//! header, 32 bytes
//!   0  magic         4  "IPEB"
//!   4  version       2  1
//!   6  record_bytes  2  16
//!   8  record_count  4  1 ..= MAX_RECORDS_PER_BLOCK
//!  12  flags         4  bit 0: FLAG_CONTINUES_RUN; other bits 0 (reserved)
//!  16  epoch         8  the writer's flush epoch
//!  24  reserved      4  0
//!  28  crc32c        4  CRC-32C of header bytes 0..28 followed by the records
//! records, 16 bytes each, sorted by ip
//!   0  ip            4  IPv4 address, host order (1.2.3.4 = 0x01020304)
//!   4  count         4  events for this address in this block
//!   8  first_seen    4  unix seconds of the first of them
//!  12  last_seen     4  unix seconds of the last of them
//! ```
//!
//! A reader verifies each block's header and checksum before it counts a single record, and
//! stops at the first block that fails: a torn or corrupted tail is never counted.
//!
//! Blocks group into *runs*: a run is a block without [`FLAG_CONTINUES_RUN`] and the blocks
//! with that flag that follow it; the records of a run are sorted by ip across its blocks.
//! Counting needs no run boundaries (every record counts), so logs written before the flag
//! existed (all flags 0: every block its own run) read the same; the writer uses runs to
//! decide when to compact (`store::compact`).

/// First four bytes of every block.
pub const BLOCK_MAGIC: [u8; 4] = *b"IPEB";
/// Block format version this code writes and reads.
pub const BLOCK_VERSION: u16 = 1;
/// Size of a block header.
pub const BLOCK_HEADER_BYTES: usize = 32;
/// Size of one record.
pub const BLOCK_RECORD_BYTES: usize = 16;
/// Largest record count in one block (16 MiB of records); bounds what a corrupt header can
/// make a reader look at, and what the writer builds in memory at once.
pub const MAX_RECORDS_PER_BLOCK: usize = 1 << 20;

/// Flags bit: this block continues the sorted run of the block before it (a run too large
/// for one block).
pub const FLAG_CONTINUES_RUN: u32 = 1;

const CRC_OFFSET: usize = 28;

/// Events seen for one address: how many, and the first and last arrival (unix seconds).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct AddrStats {
    /// Number of events.
    pub count: u64,
    /// Arrival of the first, unix seconds.
    pub first_seen: u32,
    /// Arrival of the last, unix seconds.
    pub last_seen: u32,
}

impl AddrStats {
    /// One event that arrived at `unix_secs`.
    #[inline]
    pub fn one(unix_secs: u32) -> AddrStats {
        AddrStats {
            count: 1,
            first_seen: unix_secs,
            last_seen: unix_secs,
        }
    }

    /// Folds `other` into `self`.
    #[inline]
    pub fn merge(&mut self, other: &AddrStats) {
        if self.count == 0 {
            *self = *other;
            return;
        }
        self.count += other.count;
        self.first_seen = self.first_seen.min(other.first_seen);
        self.last_seen = self.last_seen.max(other.last_seen);
    }
}

/// Builds one block in a reusable buffer.
#[derive(Debug, Default)]
pub struct BlockBuilder {
    buf: Vec<u8>,
    records: usize,
}

impl BlockBuilder {
    /// Starts a block for `epoch`, discarding any previous content.
    pub fn begin(&mut self, epoch: u64) {
        self.buf.clear();
        self.buf.resize(BLOCK_HEADER_BYTES, 0);
        self.buf[0..4].copy_from_slice(&BLOCK_MAGIC);
        self.buf[4..6].copy_from_slice(&BLOCK_VERSION.to_le_bytes());
        self.buf[6..8].copy_from_slice(&(BLOCK_RECORD_BYTES as u16).to_le_bytes());
        self.buf[16..24].copy_from_slice(&epoch.to_le_bytes());
        self.records = 0;
    }

    /// Starts a block for `epoch` that continues the run of the block written before it.
    pub fn begin_continuing(&mut self, epoch: u64) {
        self.begin(epoch);
        self.buf[12..16].copy_from_slice(&FLAG_CONTINUES_RUN.to_le_bytes());
    }

    /// Records in the block so far.
    pub fn records(&self) -> usize {
        self.records
    }

    /// True when the block cannot take another record.
    pub fn is_full(&self) -> bool {
        self.records >= MAX_RECORDS_PER_BLOCK
    }

    /// Adds one address. A count above `u32::MAX` is split over several records of the same
    /// address, which readers add up, so no count is ever clipped.
    pub fn push(&mut self, ip: u32, stats: &AddrStats) {
        let mut left = stats.count;
        while left > 0 {
            assert!(!self.is_full(), "block record limit");
            let part = left.min(u64::from(u32::MAX)) as u32;
            self.buf.extend_from_slice(&ip.to_le_bytes());
            self.buf.extend_from_slice(&part.to_le_bytes());
            self.buf.extend_from_slice(&stats.first_seen.to_le_bytes());
            self.buf.extend_from_slice(&stats.last_seen.to_le_bytes());
            self.records += 1;
            left -= u64::from(part);
        }
    }

    /// Seals the block (count and checksum) and returns its bytes.
    pub fn finish(&mut self) -> &[u8] {
        assert!(self.records > 0, "an empty block is never written");
        self.buf[8..12].copy_from_slice(&(self.records as u32).to_le_bytes());
        let crc = block_crc(&self.buf);
        self.buf[CRC_OFFSET..BLOCK_HEADER_BYTES].copy_from_slice(&crc.to_le_bytes());
        debug_assert!(matches!(parse_block(&self.buf), BlockParse::Ok { .. }));
        &self.buf
    }
}

fn block_crc(block: &[u8]) -> u32 {
    let crc = crc32c::crc32c(&block[..CRC_OFFSET]);
    crc32c::crc32c_append(crc, &block[BLOCK_HEADER_BYTES..])
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

/// The outcome of looking at the bytes where a block should start.
#[derive(Debug, PartialEq, Eq)]
pub enum BlockParse {
    /// A whole, verified block of `len` bytes.
    Ok {
        /// Bytes in the block, header included.
        len: usize,
        /// The writer's flush epoch.
        epoch: u64,
        /// Records in it.
        records: usize,
        /// Its flags ([`FLAG_CONTINUES_RUN`]).
        flags: u32,
    },
    /// Fewer bytes than the header announces: a write in progress or a torn tail.
    Incomplete,
    /// Bytes that are no valid block.
    Corrupt(&'static str),
}

/// Verifies the block at the start of `bytes`.
pub fn parse_block(bytes: &[u8]) -> BlockParse {
    if bytes.len() < BLOCK_HEADER_BYTES {
        return BlockParse::Incomplete;
    }
    if bytes[0..4] != BLOCK_MAGIC {
        return BlockParse::Corrupt("bad magic");
    }
    if u16::from_le_bytes([bytes[4], bytes[5]]) != BLOCK_VERSION {
        return BlockParse::Corrupt("unknown block version");
    }
    if u16::from_le_bytes([bytes[6], bytes[7]]) as usize != BLOCK_RECORD_BYTES {
        return BlockParse::Corrupt("unknown record size");
    }
    let records = u32_at(bytes, 8) as usize;
    if records == 0 || records > MAX_RECORDS_PER_BLOCK {
        return BlockParse::Corrupt("record count out of range");
    }
    let len = BLOCK_HEADER_BYTES + records * BLOCK_RECORD_BYTES;
    if bytes.len() < len {
        return BlockParse::Incomplete;
    }
    let block = &bytes[..len];
    if block_crc(block) != u32_at(block, CRC_OFFSET) {
        return BlockParse::Corrupt("checksum mismatch");
    }
    let mut epoch = [0u8; 8];
    epoch.copy_from_slice(&block[16..24]);
    BlockParse::Ok {
        len,
        epoch: u64::from_le_bytes(epoch),
        records,
        flags: u32_at(block, 12),
    }
}

/// How a scan of a log ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tail {
    /// Every byte belonged to a verified block.
    Clean,
    /// The bytes from `offset` on were not counted.
    Torn {
        /// Offset of the first byte not counted.
        offset: u64,
        /// Why the block there was refused.
        reason: &'static str,
    },
}

/// What a scan of one log found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScanSummary {
    /// Verified blocks.
    pub blocks: u64,
    /// Records in them.
    pub records: u64,
    /// Events in them (sum of record counts).
    pub events: u64,
    /// Bytes covered by verified blocks: the length a repaired file keeps.
    pub good_bytes: u64,
    /// Highest epoch among the verified blocks (0 when none).
    pub max_epoch: u64,
    /// How the scan ended.
    pub tail: Tail,
}

/// Walks the blocks in `bytes`, calling `on_record(ip, stats)` for each record of each
/// verified block, and stops at the first block that does not verify.
pub fn scan_log(bytes: &[u8], mut on_record: impl FnMut(u32, AddrStats)) -> ScanSummary {
    let mut summary = ScanSummary {
        blocks: 0,
        records: 0,
        events: 0,
        good_bytes: 0,
        max_epoch: 0,
        tail: Tail::Clean,
    };
    let mut pos = 0usize;
    while pos < bytes.len() {
        let (len, epoch, records) = match parse_block(&bytes[pos..]) {
            BlockParse::Ok {
                len,
                epoch,
                records,
                ..
            } => (len, epoch, records),
            BlockParse::Incomplete => {
                summary.tail = Tail::Torn {
                    offset: pos as u64,
                    reason: "incomplete block",
                };
                break;
            }
            BlockParse::Corrupt(reason) => {
                summary.tail = Tail::Torn {
                    offset: pos as u64,
                    reason,
                };
                break;
            }
        };
        for record in bytes[pos + BLOCK_HEADER_BYTES..pos + len].chunks_exact(BLOCK_RECORD_BYTES) {
            let stats = AddrStats {
                count: u64::from(u32_at(record, 4)),
                first_seen: u32_at(record, 8),
                last_seen: u32_at(record, 12),
            };
            summary.events += stats.count;
            on_record(u32_at(record, 0), stats);
        }
        summary.blocks += 1;
        summary.records += records as u64;
        summary.max_epoch = summary.max_epoch.max(epoch);
        pos += len;
        summary.good_bytes = pos as u64;
    }
    summary
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(count: u64) -> AddrStats {
        AddrStats {
            count,
            first_seen: 100,
            last_seen: 200,
        }
    }

    fn two_blocks() -> Vec<u8> {
        let mut builder = BlockBuilder::default();
        let mut log = Vec::new();
        builder.begin(1);
        builder.push(7, &stats(3));
        builder.push(9, &stats(4));
        log.extend_from_slice(builder.finish());
        builder.begin(2);
        builder.push(7, &stats(5));
        log.extend_from_slice(builder.finish());
        log
    }

    #[test]
    fn scan_counts_every_verified_record() {
        let log = two_blocks();
        let mut seen = Vec::new();
        let summary = scan_log(&log, |ip, s| seen.push((ip, s.count)));
        assert_eq!(seen, vec![(7, 3), (9, 4), (7, 5)]);
        assert_eq!(summary.events, 12);
        assert_eq!(summary.max_epoch, 2);
        assert_eq!(summary.tail, Tail::Clean);
        assert_eq!(summary.good_bytes, log.len() as u64);
    }

    #[test]
    fn every_truncation_counts_only_whole_blocks() {
        let log = two_blocks();
        let first_len = BLOCK_HEADER_BYTES + 2 * BLOCK_RECORD_BYTES;
        for cut in 0..log.len() {
            let summary = scan_log(&log[..cut], |_, _| {});
            let expect = if cut >= first_len { 7 } else { 0 };
            assert_eq!(summary.events, expect, "cut at {cut}");
            let at_boundary = cut == 0 || cut == first_len;
            assert_eq!(summary.tail == Tail::Clean, at_boundary, "cut at {cut}");
        }
    }

    #[test]
    fn every_flipped_byte_is_caught() {
        let log = two_blocks();
        let first_len = BLOCK_HEADER_BYTES + 2 * BLOCK_RECORD_BYTES;
        for at in 0..log.len() {
            let mut bad = log.clone();
            bad[at] ^= 0x10;
            let summary = scan_log(&bad, |_, _| {});
            let expect = if at >= first_len { 7 } else { 0 };
            assert_eq!(summary.events, expect, "flip at {at}");
        }
    }

    #[test]
    fn huge_counts_are_split_not_clipped() {
        let mut builder = BlockBuilder::default();
        builder.begin(1);
        builder.push(1, &stats(u64::from(u32::MAX) * 2 + 5));
        let block = builder.finish().to_vec();
        let summary = scan_log(&block, |_, _| {});
        assert_eq!(summary.records, 3);
        assert_eq!(summary.events, u64::from(u32::MAX) * 2 + 5);
    }
}
