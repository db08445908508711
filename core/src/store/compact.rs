//! Compaction of one log: how its blocks group into sorted runs, when the writer rewrites it,
//! and the streaming merge that does it in bounded memory.
//!
//! A log is a *base* run (what the last rewrite produced: every address once, sorted, over one
//! or more blocks linked by [`block::FLAG_CONTINUES_RUN`]) followed by a *tail* of runs, one
//! per append. The writer rewrites the log (base and tail merged into a new base, written
//! beside the log and renamed over it) only when the tail holds as many runs as the app's
//! compaction limit (between half of [`COMPACT_AFTER_BLOCKS`] and one less than all of
//! it, spread by the SHA so that apps which started together do not compact in the same
//! flush) *and* at least as many bytes as the base.
//! Each rewrite therefore writes at most twice the bytes appended since the previous one:
//! over a log's life the bytes rewritten stay within twice the bytes appended, whatever its
//! size, and a record is rewritten O(log n) times (the base at least doubles between two
//! rewrites that copy it, unless the tail repeated its addresses, and then the tail pays).
//! A query reads at most the base, a tail no larger than the base, and the block being
//! appended.
//!
//! The merge walks every run of the mapped log and the new records at once (a k-way merge on
//! a heap of cursors), so it holds one block of output and one cursor per run, never the
//! log's addresses.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use crate::block::AddrStats;
use crate::block::{self, BlockParse, BLOCK_HEADER_BYTES, BLOCK_RECORD_BYTES};
use crate::wire::AppSha;

/// Bounds the runs appended after a log's base before it is compacted: an app's limit is
/// between half of this and one less than all of it ([`compact_limit`]), and the log is
/// rewritten once its tail has that many runs and at least as many bytes as its base.
pub const COMPACT_AFTER_BLOCKS: u32 = 64;

/// Runs after the base at which `app`'s log may be compacted: between half of
/// [`COMPACT_AFTER_BLOCKS`] and one less than all of it (32 to 63), spread by the SHA, so that apps which started together do not all compact in the
/// same flush.
pub(super) fn compact_limit(app: &AppSha) -> u32 {
    let half = COMPACT_AFTER_BLOCKS / 2;
    half + u32::from(app.0[31]) % half
}

/// Where the verified blocks of a log are, and how they group into runs.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RunLayout {
    /// Bytes of the base run (0: no base).
    pub base_bytes: u64,
    /// Runs after the base.
    pub tail_runs: u32,
    /// Bytes of those runs.
    pub tail_bytes: u64,
    /// Records in the whole log: an upper bound on its distinct addresses.
    pub records: u64,
    /// Highest epoch of its blocks.
    pub max_epoch: u64,
}

/// One verified block: the byte range of its records in the log.
#[derive(Debug, Clone, Copy)]
struct Span {
    start: usize,
    end: usize,
}

/// The verified blocks of `bytes`, in order, with the run layout; stops at the first block
/// that does not verify, exactly where [`block::scan_log`] stops.
fn spans(bytes: &[u8]) -> (Vec<Span>, RunLayout) {
    let mut out = Vec::new();
    let mut layout = RunLayout::default();
    let mut in_base = true;
    let mut pos = 0usize;
    while let BlockParse::Ok {
        len,
        records,
        flags,
        epoch,
    } = block::parse_block(&bytes[pos..])
    {
        layout.max_epoch = layout.max_epoch.max(epoch);

        let continues = flags & block::FLAG_CONTINUES_RUN != 0;
        if pos > 0 && !continues {
            in_base = false;
        }
        if in_base {
            layout.base_bytes += len as u64;
        } else {
            if !continues {
                layout.tail_runs += 1;
            }
            layout.tail_bytes += len as u64;
        }
        layout.records += records as u64;
        out.push(Span {
            start: pos + BLOCK_HEADER_BYTES,
            end: pos + len,
        });
        pos += len;
    }
    (out, layout)
}

/// The run layout of a log's verified blocks.
pub fn run_layout(bytes: &[u8]) -> RunLayout {
    spans(bytes).1
}

fn record_at(bytes: &[u8], at: usize) -> (u32, AddrStats) {
    let word = |i: usize| {
        u32::from_le_bytes([
            bytes[at + i],
            bytes[at + i + 1],
            bytes[at + i + 2],
            bytes[at + i + 3],
        ])
    };
    (
        word(0),
        AddrStats {
            count: u64::from(word(4)),
            first_seen: word(8),
            last_seen: word(12),
        },
    )
}

/// A sorted source for the merge: the records of one block of the log, or the new records.
enum Cursor<'a> {
    Block {
        bytes: &'a [u8],
        at: usize,
        end: usize,
    },
    Slice(&'a [(u32, AddrStats)]),
}

impl Cursor<'_> {
    fn next(&mut self) -> Option<(u32, AddrStats)> {
        match self {
            Cursor::Block { bytes, at, end } => {
                if at >= end {
                    return None;
                }
                let record = record_at(bytes, *at);
                *at += BLOCK_RECORD_BYTES;
                Some(record)
            }
            Cursor::Slice(rest) => {
                let (first, others) = rest.split_first()?;
                *rest = others;
                Some(*first)
            }
        }
    }
}

/// Merges the verified blocks of `log` with `extra` (sorted by address) and calls `sink` once
/// per distinct address, in ascending order, with its merged counts. Returns how many
/// addresses it passed on, or the sink's first error.
pub fn merge<E>(
    log: &[u8],
    extra: &[(u32, AddrStats)],
    mut sink: impl FnMut(u32, &AddrStats) -> Result<(), E>,
) -> Result<u64, E> {
    let (spans, _) = spans(log);
    let mut cursors: Vec<Cursor<'_>> = spans
        .iter()
        .map(|s| Cursor::Block {
            bytes: log,
            at: s.start,
            end: s.end,
        })
        .collect();
    cursors.push(Cursor::Slice(extra));
    let mut heap: BinaryHeap<Reverse<(u32, usize)>> = BinaryHeap::with_capacity(cursors.len());
    let mut heads: Vec<AddrStats> = vec![AddrStats::default(); cursors.len()];
    for (i, cursor) in cursors.iter_mut().enumerate() {
        if let Some((ip, stats)) = cursor.next() {
            heads[i] = stats;
            heap.push(Reverse((ip, i)));
        }
    }
    let mut distinct = 0u64;
    while let Some(Reverse((ip, i))) = heap.pop() {
        let mut merged = heads[i];
        advance(&mut cursors, &mut heads, &mut heap, i);
        while let Some(&Reverse((next_ip, j))) = heap.peek() {
            if next_ip != ip {
                break;
            }
            heap.pop();
            merged.merge(&heads[j]);
            advance(&mut cursors, &mut heads, &mut heap, j);
        }
        sink(ip, &merged)?;
        distinct += 1;
    }
    Ok(distinct)
}

fn advance(
    cursors: &mut [Cursor<'_>],
    heads: &mut [AddrStats],
    heap: &mut BinaryHeap<Reverse<(u32, usize)>>,
    i: usize,
) {
    if let Some((ip, stats)) = cursors[i].next() {
        heads[i] = stats;
        heap.push(Reverse((ip, i)));
    }
}

/// Marks in `known` which of `ips` (sorted, ascending) the verified blocks of `log` hold.
/// Each block is searched from whichever side is smaller, so a lookup costs about
/// `min(block, ips) × log(max)` per block.
pub fn mark_known(log: &[u8], ips: &[u32], known: &mut [bool]) {
    debug_assert_eq!(ips.len(), known.len());
    let (spans, _) = spans(log);
    for span in spans {
        let block = &log[span.start..span.end];
        let n = block.len() / BLOCK_RECORD_BYTES;
        let ip_at = |k: usize| record_at(block, k * BLOCK_RECORD_BYTES).0;
        if n >= ips.len() {
            for (i, ip) in ips.iter().enumerate() {
                if !known[i] && search(n, ip_at, *ip) {
                    known[i] = true;
                }
            }
        } else {
            for k in 0..n {
                if let Ok(i) = ips.binary_search(&ip_at(k)) {
                    known[i] = true;
                }
            }
        }
    }
}

/// Binary search over `n` ascending values given by `at`.
fn search(n: usize, at: impl Fn(usize) -> u32, want: u32) -> bool {
    let (mut lo, mut hi) = (0usize, n);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        match at(mid).cmp(&want) {
            std::cmp::Ordering::Less => lo = mid + 1,
            std::cmp::Ordering::Greater => hi = mid,
            std::cmp::Ordering::Equal => return true,
        }
    }
    false
}
