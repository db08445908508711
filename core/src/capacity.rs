//! Capacity planning: disk, inodes, memory, network and write load for a given traffic, from
//! the store's real record sizes, its layout and its compaction rule.
//!
//! The model, which every figure of [`CapacityEstimate`] follows:
//!
//! - `writers` receivers share one data dir, and DNS round robin gives each the same share
//!   of the traffic. (Receivers that keep a tree each: estimate one with `writers` 1 and its
//!   share of `events_per_sec`.)
//! - Events are spread evenly over the apps, and each app's events evenly over its
//!   `addresses_per_app` addresses. For a given number of events this maximises the distinct
//!   (app, address) pairs, so memory, appends and block sizes are upper bounds: skewed
//!   traffic (a few busy apps) needs less. The expected number of distinct values hit by `n`
//!   uniform draws over `k` values is `k (1 - e^(-n/k))`.
//! - Every flush interval, each writer appends one block (a [`BLOCK_HEADER_BYTES`] header and
//!   one [`BLOCK_RECORD_BYTES`] record per address seen in the interval) to the log of every app
//!   it saw.
//!   A log that reaches [`COMPACT_AFTER_BLOCKS`] blocks is rewritten as one merged block with
//!   one record per address: after that, a log holds one merged block and at most
//!   `COMPACT_AFTER_BLOCKS - 2` appended ones.
//! - Disk space counts files in whole [`FS_BLOCK_BYTES`] blocks and directories as ext4 and
//!   XFS lay them out by default.
//!
//! Use it through `ipevent-query capacity`, which prints [`CapacityEstimate`]'s table or its
//! JSON.

use std::fmt;

use serde::Serialize;

use crate::aggregate;
use crate::block::{BLOCK_HEADER_BYTES, BLOCK_RECORD_BYTES, MAX_RECORDS_PER_BLOCK};
use crate::journal;
use crate::store::{AddrStats, COMPACT_AFTER_BLOCKS};
use crate::wire::{AppSha, ENCODED_MAX_BYTES};

/// Seconds in a day.
const SECS_PER_DAY: f64 = 86_400.0;

/// Allocation unit of the file system holding the data dir (the ext4 and XFS default): a
/// file or directory takes whole blocks of this size.
pub const FS_BLOCK_BYTES: u64 = 4096;

/// Fan-out directories under `events/`: one per value of the SHA's first two hex digits.
pub const FANOUT_DIRS: u64 = 256;

/// Length of an app directory's name (the SHA in hex).
const APP_DIR_NAME_CHARS: u64 = 64;

/// Length assumed for a log's name, `<writer-id>.log`; a host name of about 16 characters.
const LOG_NAME_CHARS: u64 = 20;

/// An ext4 directory block is about this full once entries are spread over it by hash.
const DIR_FILL_RATIO: f64 = 0.75;

/// Inodes of the data dir's fixed part: the root, `LAYOUT`, `events/`, `receivers/`, `trash/`.
const FIXED_INODES: u64 = 5;

/// Inodes under `receivers/<writer-id>/` per writer: the directory, `lock`,
/// `control.sock`, `stats.json`, `state.json` and `journal`.
const INODES_PER_WRITER: u64 = 6;

/// IPv4 header (20 bytes) and UDP header (8 bytes) around each datagram; IPv6 adds 20.
pub const IPV4_UDP_HEADER_BYTES: u64 = 28;

/// What Ethernet adds to each IP packet on the wire: header 14, frame check 4, preamble 8 and
/// the gap between frames 12.
pub const ETHERNET_OVERHEAD_BYTES: u64 = 38;

/// Control bytes a `hashbrown` table allocates beyond one per bucket (one SIMD group).
const TABLE_GROUP_BYTES: u64 = 16;

/// What the allocator adds to each allocation (glibc: an 8-byte chunk header, 16-byte
/// alignment).
const MALLOC_OVERHEAD_BYTES: u64 = 16;

/// What to size: the traffic and the receivers' settings.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CapacityInput {
    /// Distinct apps sending events.
    pub apps: u64,
    /// Distinct addresses each app connects to (an app on one /28 has up to 14).
    pub addresses_per_app: u64,
    /// Events per second, all apps and all receivers together.
    pub events_per_sec: f64,
    /// How long the traffic runs, in days.
    pub days: f64,
    /// The receivers' flush interval (`--flush-interval-ms`).
    pub flush_interval_ms: u64,
    /// Receivers writing to the data dir, each taking an equal share of the traffic.
    pub writers: u64,
}

/// Why a [`CapacityInput`] cannot be estimated.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CapacityError {
    /// A count that must be at least one is zero.
    #[error("{0} must be at least 1")]
    Zero(&'static str),
    /// A rate or duration that is negative, infinite or not a number.
    #[error("{0} must be a finite number of at least 0")]
    NotFinite(&'static str),
}

impl CapacityInput {
    /// Checks what [`estimate`] would otherwise have to clamp: at least one app, address,
    /// writer and millisecond of flush interval; finite, non-negative rate and days.
    pub fn validate(&self) -> Result<(), CapacityError> {
        if self.apps == 0 {
            return Err(CapacityError::Zero("apps"));
        }
        if self.addresses_per_app == 0 {
            return Err(CapacityError::Zero("addresses per app"));
        }
        if self.writers == 0 {
            return Err(CapacityError::Zero("writers"));
        }
        if self.flush_interval_ms == 0 {
            return Err(CapacityError::Zero("flush interval (ms)"));
        }
        if !(self.events_per_sec.is_finite() && self.events_per_sec >= 0.0) {
            return Err(CapacityError::NotFinite("events per second"));
        }
        if !(self.days.is_finite() && self.days >= 0.0) {
            return Err(CapacityError::NotFinite("days"));
        }
        Ok(())
    }
}

/// What a traffic needs. Byte counts are rounded up; rates are per second.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CapacityEstimate {
    /// The input it was computed from (after clamping, see [`estimate`]).
    pub input: CapacityInput,
    /// Events over the whole period: `events_per_sec × days × 86400`.
    pub events_total: f64,
    /// Apps with at least one event in the period: `apps (1 - e^(-events_total / apps))`.
    pub apps_seen: u64,
    /// Logs in the store, one per app and writer that saw it: with `n = events_total /
    /// (apps × writers)` events per app and writer, `apps × writers × (1 - e^(-n))`.
    pub logs: u64,
    /// Distinct addresses in an average log at the end of the period:
    /// `addresses_per_app (1 - e^(-n / addresses_per_app))`, over the logs that exist.
    pub addresses_per_log: f64,
    /// Records in one appended block: distinct addresses an app sends to one writer within one
    /// flush interval, given it sent any (from `e = events_per_sec × flush interval /
    /// (apps × writers)` events per app, writer and interval).
    pub records_per_append: f64,
    /// Bytes of a freshly compacted log: one header per [`MAX_RECORDS_PER_BLOCK`]` / 2`
    /// records (the rewrite's chunk) and one record per address.
    pub log_bytes_compacted: u64,
    /// Bytes of an average log: the compacted part and half of the longest tail
    /// (`(COMPACT_AFTER_BLOCKS - 2) / 2` appended blocks of `records_per_append` records); a
    /// log that has not yet been compacted once holds every block appended so far instead.
    pub log_bytes_steady: u64,
    /// Bytes of a log just before its compaction: the compacted part and
    /// `COMPACT_AFTER_BLOCKS - 2` appended blocks (or every block appended so far).
    pub log_bytes_worst: u64,
    /// Sum of the logs' sizes, every log average (`du --apparent-size` of `events/`).
    pub data_bytes_steady: u64,
    /// Sum of the logs' sizes, every log just before compaction.
    pub data_bytes_worst: u64,
    /// Disk space of the data dir, every log average: each log rounded up to
    /// [`FS_BLOCK_BYTES`], plus the directories (fan-out dirs sized by their 64-character
    /// entries at three quarters full, one block per app dir) and the receivers' small files.
    /// Each receiver's journal comes on top: it reserves its `--journal-bytes` in full.
    pub disk_bytes_steady: u64,
    /// Disk space with every log just before compaction, and each writer's compaction
    /// writing a merged copy beside one log.
    pub disk_bytes_worst: u64,
    /// Inodes: the fixed directories, [`FANOUT_DIRS`] fan-out dirs (fewer for fewer apps), one
    /// directory per app seen, one file per log, and the files under `receivers/`.
    pub inodes: u64,
    /// Inodes while every writer compacts a log (one temporary file each).
    pub inodes_worst: u64,
    /// Apps a writer holds in memory before a flush: apps seen by that writer within one
    /// flush interval.
    pub pending_apps_per_writer: u64,
    /// (app, address) pairs a writer holds before a flush: `apps × addresses_per_app (1 -
    /// e^(-events per interval / (apps × addresses_per_app)))`. The receiver flushes early
    /// when this passes its `--max-pending-entries`.
    pub pending_entries_per_writer: u64,
    /// Peak memory of a writer's pending aggregation ([`crate::aggregate::Pending`]): one flat
    /// table of (app index, address) entries, a table mapping each app to its index, and the
    /// list of apps (table slots as `hashbrown` sizes them for that many entries, plus
    /// allocator overhead; the entries sorted into a vector at flush), plus the buffers of a
    /// flush (one app's sorted records, one block) or of a compaction (the merged log in a map,
    /// sorted, and as blocks), whichever is larger. The journal pages one
    /// flush fills ([`CapacityEstimate::journal_bytes_per_flush_per_writer`]) and the
    /// receiver's fixed buffers (batch pool, socket buffers in the kernel) come on top.
    pub memory_bytes_per_writer: u64,
    /// Journal bytes one flush interval fills per writer: [`journal::JOURNAL_HEADER_BYTES`] and
    /// [`journal::JOURNAL_RECORD_BYTES`] per event received in the interval (plus 16 bytes per
    /// ingest batch). The receiver's `--journal-bytes` must exceed it, or the full journal forces
    /// flushes early; these pages of the mapped journal are also resident memory.
    pub journal_bytes_per_flush_per_writer: u64,
    /// Datagrams per second each writer receives: `events_per_sec / writers`.
    pub packets_per_sec_per_writer: f64,
    /// IP traffic into each writer, bits per second: datagrams of at most
    /// [`ENCODED_MAX_BYTES`] payload plus [`IPV4_UDP_HEADER_BYTES`].
    pub ip_bits_per_sec_per_writer: f64,
    /// The same on an Ethernet link, with [`ETHERNET_OVERHEAD_BYTES`] per frame: what a NIC
    /// and a switch port carry.
    pub wire_bits_per_sec_per_writer: f64,
    /// IP traffic into all writers together, bits per second.
    pub ip_bits_per_sec_total: f64,
    /// Blocks a writer appends in one flush: one per app it saw in the interval. Each is one
    /// `write` (and, with `--fsync`, one `fdatasync`).
    pub appends_per_flush_per_writer: u64,
    /// Appends per second, all writers together.
    pub appends_per_sec: f64,
    /// Compactions per second, all writers together: one write in every
    /// `COMPACT_AFTER_BLOCKS - 1` to a log rewrites it (read, write, `fdatasync`, rename).
    pub compactions_per_sec: f64,
    /// Bytes written to the data dir per second, all writers together: appended blocks and
    /// rewritten logs.
    pub disk_write_bytes_per_sec: f64,
    /// Journal bytes written per second, all writers together, at most: every event's
    /// [`journal::JOURNAL_RECORD_BYTES`]. The kernel writes the mapped pages back in the
    /// background, and a page rewritten before its write-back is written once.
    pub journal_write_bytes_per_sec: f64,
    /// Compactions one flush of one writer may have to do: every log it writes in that
    /// flush, when their apps reached the threshold together (apps that started sending
    /// together, e.g. after a reset, stay in step). Each compaction ends with an
    /// `fdatasync`, so this many syncs delay that flush; the socket buffer must absorb the
    /// traffic meanwhile.
    pub compactions_per_flush_worst: u64,
}

/// Expected distinct values among `draws` uniform draws over `values` values.
fn expected_distinct(draws: f64, values: f64) -> f64 {
    if values <= 0.0 || draws <= 0.0 {
        return 0.0;
    }
    values * -(-draws / values).exp_m1()
}

/// Expected distinct values among `draws` (a Poisson mean) uniform draws over `values`
/// values, given there was at least one draw.
fn expected_distinct_given_any(draws: f64, values: f64) -> f64 {
    if values <= 0.0 {
        return 0.0;
    }
    let any = -(-draws).exp_m1();
    if any <= f64::MIN_POSITIVE || draws <= 0.0 {
        // The limit for draws -> 0: the one draw there is.
        return 1.0;
    }
    (expected_distinct(draws, values) / any).max(1.0)
}

/// Buckets a `hashbrown` table grows to for `items` entries (7/8 load, a power of two).
fn table_buckets(items: u64) -> u64 {
    match items {
        0 => 0,
        1..=3 => 4,
        4..=7 => 8,
        _ => (items.saturating_mul(8) / 7)
            .checked_next_power_of_two()
            .unwrap_or(u64::MAX),
    }
}

/// Heap bytes of a `hashbrown` table of `items` slots of `slot_bytes`.
fn table_heap_bytes(items: u64, slot_bytes: u64) -> u64 {
    let buckets = table_buckets(items);
    if buckets == 0 {
        return 0;
    }
    buckets
        .saturating_mul(slot_bytes)
        .saturating_add(buckets)
        .saturating_add(TABLE_GROUP_BYTES + MALLOC_OVERHEAD_BYTES)
}

/// Bytes of a sorted vector of `records` records and of the block built from them.
fn records_buffers_bytes(records: u64, slot_bytes: u64) -> u64 {
    if records == 0 {
        return 0;
    }
    records
        .saturating_mul(slot_bytes + BLOCK_RECORD_BYTES as u64)
        .saturating_add(BLOCK_HEADER_BYTES as u64 + 2 * MALLOC_OVERHEAD_BYTES)
}

/// Bytes of a log holding `records` records merged by a compaction.
fn compacted_log_bytes(records: f64) -> f64 {
    if records <= 0.0 {
        return 0.0;
    }
    let chunk_records = (MAX_RECORDS_PER_BLOCK / 2) as f64;
    (records / chunk_records).ceil() * BLOCK_HEADER_BYTES as f64
        + records * BLOCK_RECORD_BYTES as f64
}

/// Bytes of an ext4 directory entry for a name of `chars` characters.
fn dir_entry_bytes(chars: u64) -> u64 {
    8 + chars.next_multiple_of(4)
}

/// Disk space of a directory holding `entries` entries of `name_chars` characters.
fn dir_bytes(entries: f64, name_chars: u64) -> f64 {
    let used = entries * dir_entry_bytes(name_chars) as f64 / DIR_FILL_RATIO;
    let blocks = (used / FS_BLOCK_BYTES as f64).ceil().max(1.0);
    blocks * FS_BLOCK_BYTES as f64
}

/// `bytes` rounded up to whole file system blocks.
fn allocated(bytes: f64) -> f64 {
    (bytes / FS_BLOCK_BYTES as f64).ceil() * FS_BLOCK_BYTES as f64
}

fn finite_or_zero(value: f64) -> f64 {
    if value.is_finite() && value > 0.0 {
        value
    } else {
        0.0
    }
}

/// Estimates what `input` needs. Never panics: out-of-range values are clamped (counts to at
/// least 1, rates and days to finite values of at least 0), so call
/// [`CapacityInput::validate`] first to reject them instead.
pub fn estimate(input: &CapacityInput) -> CapacityEstimate {
    let input = clamped(input);
    let traffic = Traffic::of(&input);
    let logs = LogSizes::of(&input, &traffic);
    let tree = TreeSizes::of(&traffic, &logs);
    let memory = memory_bytes_per_writer(&traffic);
    let writes = WriteLoad::of(&traffic, &logs);
    let journal_per_flush = journal::JOURNAL_HEADER_BYTES as f64
        + traffic.events_per_flush * journal::JOURNAL_RECORD_BYTES as f64;

    // Network.
    let packets = input.events_per_sec / traffic.writers;
    let ip_packet_bits = ((ENCODED_MAX_BYTES as u64 + IPV4_UDP_HEADER_BYTES) * 8) as f64;
    let wire_packet_bits = ip_packet_bits + (ETHERNET_OVERHEAD_BYTES * 8) as f64;

    let pending_apps_count = traffic.pending_apps.ceil() as u64;
    CapacityEstimate {
        events_total: traffic.events_total,
        apps_seen: traffic.apps_seen.ceil() as u64,
        logs: traffic.logs.ceil() as u64,
        addresses_per_log: traffic.addresses_per_log,
        records_per_append: traffic.records_per_append,
        log_bytes_compacted: logs.compacted.ceil() as u64,
        log_bytes_steady: logs.steady.ceil() as u64,
        log_bytes_worst: logs.worst.ceil() as u64,
        data_bytes_steady: (traffic.logs * logs.steady).ceil() as u64,
        data_bytes_worst: (traffic.logs * logs.worst).ceil() as u64,
        disk_bytes_steady: tree.disk_steady.ceil() as u64,
        disk_bytes_worst: tree.disk_worst.ceil() as u64,
        inodes: tree.inodes as u64,
        inodes_worst: tree.inodes_worst as u64,
        pending_apps_per_writer: pending_apps_count,
        pending_entries_per_writer: traffic.pending_entries.ceil() as u64,
        memory_bytes_per_writer: memory,
        journal_bytes_per_flush_per_writer: journal_per_flush.ceil() as u64,
        packets_per_sec_per_writer: packets,
        ip_bits_per_sec_per_writer: packets * ip_packet_bits,
        wire_bits_per_sec_per_writer: packets * wire_packet_bits,
        ip_bits_per_sec_total: input.events_per_sec * ip_packet_bits,
        appends_per_flush_per_writer: pending_apps_count,
        appends_per_sec: writes.appends_per_sec,
        compactions_per_sec: writes.compactions_per_sec,
        disk_write_bytes_per_sec: writes.disk_write_bytes_per_sec,
        journal_write_bytes_per_sec: input.events_per_sec * journal::JOURNAL_RECORD_BYTES as f64,
        compactions_per_flush_worst: if writes.compactions_per_sec > 0.0 {
            pending_apps_count
        } else {
            0
        },
        input,
    }
}

/// `input` with every count at least 1 and every rate and duration finite and at least 0.
fn clamped(input: &CapacityInput) -> CapacityInput {
    CapacityInput {
        apps: input.apps.max(1),
        addresses_per_app: input.addresses_per_app.max(1),
        events_per_sec: finite_or_zero(input.events_per_sec),
        days: finite_or_zero(input.days),
        flush_interval_ms: input.flush_interval_ms.max(1),
        writers: input.writers.max(1),
    }
}

/// What the traffic puts in the store over the period, and into one writer in one flush
/// interval.
struct Traffic {
    apps: f64,
    writers: f64,
    flush_secs: f64,
    /// The period.
    events_total: f64,
    apps_seen: f64,
    logs: f64,
    addresses_per_log: f64,
    /// One flush interval of one writer.
    events_per_flush: f64,
    events_per_log_flush: f64,
    records_per_append: f64,
    block_bytes: f64,
    pending_apps: f64,
    pending_entries: f64,
}

impl Traffic {
    fn of(input: &CapacityInput) -> Traffic {
        let apps = input.apps as f64;
        let addresses = input.addresses_per_app as f64;
        let writers = input.writers as f64;
        let flush_secs = input.flush_interval_ms as f64 / 1000.0;

        let events_total = input.events_per_sec * input.days * SECS_PER_DAY;
        let events_per_log_period = events_total / (apps * writers);
        let logs = apps * writers * -(-events_per_log_period).exp_m1();
        let addresses_per_log = if logs > 0.0 {
            expected_distinct_given_any(events_per_log_period, addresses)
        } else {
            0.0
        };

        let events_per_flush = input.events_per_sec * flush_secs / writers;
        let events_per_log_flush = events_per_flush / apps;
        let records_per_append = if events_per_flush > 0.0 {
            expected_distinct_given_any(events_per_log_flush, addresses)
        } else {
            0.0
        };
        Traffic {
            apps,
            writers,
            flush_secs,
            events_total,
            apps_seen: expected_distinct(events_total, apps),
            logs,
            addresses_per_log,
            events_per_flush,
            events_per_log_flush,
            records_per_append,
            block_bytes: BLOCK_HEADER_BYTES as f64 + records_per_append * BLOCK_RECORD_BYTES as f64,
            pending_apps: expected_distinct(events_per_flush, apps),
            pending_entries: expected_distinct(events_per_flush, apps * addresses),
        }
    }
}

/// Bytes of one log: appended blocks until the compaction rule folds them into one.
struct LogSizes {
    /// Blocks appended to a log over the period.
    appends_per_log_period: f64,
    compacted: f64,
    steady: f64,
    worst: f64,
}

impl LogSizes {
    fn of(input: &CapacityInput, t: &Traffic) -> LogSizes {
        // Appended blocks a log holds at most beside its compacted block.
        let tail_blocks = f64::from(COMPACT_AFTER_BLOCKS - 2);
        let flushes_in_period = input.days * SECS_PER_DAY / t.flush_secs;
        let appends_per_log_period = flushes_in_period * -(-t.events_per_log_flush).exp_m1();
        let compacted = compacted_log_bytes(t.addresses_per_log);
        let (steady, worst) = if t.logs <= 0.0 {
            (0.0, 0.0)
        } else if appends_per_log_period <= f64::from(COMPACT_AFTER_BLOCKS - 1) {
            // Never compacted yet: every block appended so far (at least the first).
            let bytes = appends_per_log_period.max(1.0) * t.block_bytes;
            (bytes, bytes)
        } else {
            (
                compacted + tail_blocks / 2.0 * t.block_bytes,
                compacted + tail_blocks * t.block_bytes,
            )
        };
        LogSizes {
            appends_per_log_period,
            compacted,
            steady,
            worst,
        }
    }
}

/// Disk space and inodes of the whole data dir: directories, logs and the receivers' files.
struct TreeSizes {
    disk_steady: f64,
    disk_worst: f64,
    inodes: f64,
    inodes_worst: f64,
}

impl TreeSizes {
    fn of(t: &Traffic, logs: &LogSizes) -> TreeSizes {
        let fanout_dirs = FANOUT_DIRS.min(t.apps_seen.ceil() as u64) as f64;
        let apps_per_fanout = if fanout_dirs > 0.0 {
            t.apps_seen / fanout_dirs
        } else {
            0.0
        };
        let logs_per_app = if t.apps_seen > 0.0 {
            t.logs / t.apps_seen
        } else {
            0.0
        };
        let fixed_bytes = (FIXED_INODES as f64 + INODES_PER_WRITER as f64 * t.writers)
            * FS_BLOCK_BYTES as f64
            + dir_bytes(fanout_dirs, 2);
        let dirs_bytes = fanout_dirs * dir_bytes(apps_per_fanout, APP_DIR_NAME_CHARS)
            + t.apps_seen * dir_bytes(logs_per_app + 1.0, LOG_NAME_CHARS);
        let compaction_copies = if t.logs > 0.0 {
            t.writers * allocated(logs.compacted)
        } else {
            0.0
        };
        let inodes = FIXED_INODES as f64
            + INODES_PER_WRITER as f64 * t.writers
            + fanout_dirs
            + t.apps_seen.ceil()
            + t.logs.ceil();
        TreeSizes {
            disk_steady: fixed_bytes + dirs_bytes + t.logs * allocated(logs.steady),
            disk_worst: fixed_bytes
                + dirs_bytes
                + t.logs * allocated(logs.worst)
                + compaction_copies,
            inodes,
            inodes_worst: inodes + if t.logs > 0.0 { t.writers } else { 0.0 },
        }
    }
}

/// Peak memory of one writer: the pending maps, and the larger of a flush's and a
/// compaction's buffers, from the sizes of the receiver's own map entries
/// ([`crate::aggregate`]).
fn memory_bytes_per_writer(t: &Traffic) -> u64 {
    let app_slot_bytes = aggregate::APP_SLOT_BYTES as u64;
    let entry_slot_bytes = aggregate::ENTRY_SLOT_BYTES as u64;
    let addr_slot_bytes = std::mem::size_of::<(u32, AddrStats)>() as u64;
    let pending_apps_count = t.pending_apps.ceil() as u64;
    let pending_entries_count = t.pending_entries.ceil() as u64;
    // The app table, the app list, the entry table; a flush sorts the entries into a vector.
    let pending_bytes = table_heap_bytes(pending_apps_count, app_slot_bytes)
        .saturating_add(pending_apps_count.saturating_mul(std::mem::size_of::<AppSha>() as u64))
        .saturating_add(table_heap_bytes(pending_entries_count, entry_slot_bytes))
        .saturating_add(pending_entries_count.saturating_mul(entry_slot_bytes));
    // A flush sorts one app's records into a vector and builds its block.
    let flush_records = t.records_per_append.ceil() as u64;
    let flush_bytes = records_buffers_bytes(flush_records, addr_slot_bytes);
    // A compaction merges a whole log in a map, then sorts it and builds its blocks.
    let merged_records = t.addresses_per_log.ceil() as u64;
    let compaction_bytes = table_heap_bytes(merged_records, addr_slot_bytes)
        .saturating_add(records_buffers_bytes(merged_records, addr_slot_bytes));
    pending_bytes.saturating_add(flush_bytes.max(compaction_bytes))
}

/// Writes per second, all writers together: each log is written in the flushes where its app
/// sent to its writer.
struct WriteLoad {
    appends_per_sec: f64,
    compactions_per_sec: f64,
    disk_write_bytes_per_sec: f64,
}

impl WriteLoad {
    fn of(t: &Traffic, logs: &LogSizes) -> WriteLoad {
        let log_writes_per_sec =
            t.apps * t.writers * -(-t.events_per_log_flush).exp_m1() / t.flush_secs;
        let compactions_per_sec =
            if logs.appends_per_log_period > f64::from(COMPACT_AFTER_BLOCKS - 1) {
                log_writes_per_sec / f64::from(COMPACT_AFTER_BLOCKS - 1)
            } else {
                0.0
            };
        let appends_per_sec = log_writes_per_sec - compactions_per_sec;
        WriteLoad {
            appends_per_sec,
            compactions_per_sec,
            disk_write_bytes_per_sec: appends_per_sec * t.block_bytes
                + compactions_per_sec * logs.compacted,
        }
    }
}

/// `bytes` in binary units with three significant digits: `512 B`, `1.50 KiB`, `12.3 GiB`.
fn human_bytes(bytes: f64) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut value = bytes;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{value:.0} B")
    } else {
        format!("{} {}", three_digits(value), UNITS[unit])
    }
}

/// `value` in decimal units with three significant digits: `950`, `12.5 k`, `1.20 M`.
fn human_count(value: f64) -> String {
    const UNITS: [&str; 6] = ["", " k", " M", " G", " T", " P"];
    let mut value = value;
    let mut unit = 0;
    while value >= 1000.0 && unit < UNITS.len() - 1 {
        value /= 1000.0;
        unit += 1;
    }
    if unit == 0 && value == value.trunc() {
        format!("{value:.0}")
    } else {
        format!("{}{}", three_digits(value), UNITS[unit])
    }
}

fn three_digits(value: f64) -> String {
    if value >= 99.95 {
        format!("{value:.0}")
    } else if value >= 9.995 {
        format!("{value:.1}")
    } else {
        format!("{value:.2}")
    }
}

/// Name column width of the table.
const NAME_CHARS: usize = 36;

/// One row of the table: a name, one or two right-aligned values and a note.
fn row(f: &mut fmt::Formatter<'_>, name: &str, values: &[String], note: &str) -> fmt::Result {
    write!(f, "  {name:<NAME_CHARS$}")?;
    for value in values {
        write!(f, "  {value:>10}")?;
    }
    if note.is_empty() {
        writeln!(f)
    } else {
        writeln!(f, "  {note}")
    }
}

impl fmt::Display for CapacityEstimate {
    /// A table for operators: the input, then the store, one writer, and all writers.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.fmt_input(f)?;
        writeln!(f)?;
        self.fmt_store(f)?;
        writeln!(f)?;
        self.fmt_per_writer(f)?;
        writeln!(f)?;
        self.fmt_all_writers(f)
    }
}

/// Bytes in binary units, for the table.
fn bytes(n: u64) -> String {
    human_bytes(n as f64)
}

/// A count in decimal units, for the table.
fn count(n: u64) -> String {
    human_count(n as f64)
}

impl CapacityEstimate {
    /// The first line: what was sized.
    fn fmt_input(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let i = &self.input;
        writeln!(
            f,
            "{} apps x {} addresses, {} events/s for {} day(s) ({} events), \
             {} writer(s) flushing every {} ms",
            count(i.apps),
            i.addresses_per_app,
            human_count(i.events_per_sec),
            i.days,
            human_count(self.events_total),
            i.writers,
            i.flush_interval_ms
        )
    }

    /// The data dir, steady and worst case.
    fn fmt_store(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{:<width$}  {:>10}  {:>10}",
            "store (one data dir)",
            "steady",
            "worst case",
            width = NAME_CHARS + 2
        )?;
        let both = |a: u64, b: u64, show: fn(u64) -> String| [show(a), show(b)];
        row(
            f,
            "disk space",
            &both(self.disk_bytes_steady, self.disk_bytes_worst, bytes),
            "and each receiver's --journal-bytes",
        )?;
        row(
            f,
            "log data (apparent size)",
            &both(self.data_bytes_steady, self.data_bytes_worst, bytes),
            "",
        )?;
        row(
            f,
            "inodes",
            &both(self.inodes, self.inodes_worst, count),
            "",
        )?;
        row(
            f,
            "one log",
            &both(self.log_bytes_steady, self.log_bytes_worst, bytes),
            "",
        )?;
        row(
            f,
            "logs",
            &[count(self.logs)],
            &format!(
                "in {} app dirs; {:.1} addresses per log, {:.1} records per appended block",
                count(self.apps_seen),
                self.addresses_per_log,
                self.records_per_append
            ),
        )
    }

    /// One writer: memory, journal, traffic in, appends and compactions.
    fn fmt_per_writer(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "per writer")?;
        row(
            f,
            "memory for pending events",
            &[bytes(self.memory_bytes_per_writer)],
            &format!(
                "{} apps, {} app/address pairs per flush",
                count(self.pending_apps_per_writer),
                count(self.pending_entries_per_writer)
            ),
        )?;
        row(
            f,
            "journal filled per flush",
            &[bytes(self.journal_bytes_per_flush_per_writer)],
            "--journal-bytes must be larger; also resident memory",
        )?;
        row(
            f,
            "datagrams in",
            &[human_count(self.packets_per_sec_per_writer)],
            "per second",
        )?;
        row(
            f,
            "network in",
            &[human_count(self.ip_bits_per_sec_per_writer)],
            &format!(
                "bit/s IP, {} bit/s on Ethernet",
                human_count(self.wire_bits_per_sec_per_writer)
            ),
        )?;
        row(
            f,
            "appends per flush",
            &[count(self.appends_per_flush_per_writer)],
            "",
        )?;
        row(
            f,
            "compactions in one flush, worst case",
            &[count(self.compactions_per_flush_worst)],
            "each ends with an fdatasync",
        )
    }

    /// All writers together: network and disk writes.
    fn fmt_all_writers(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "all writers")?;
        row(
            f,
            "network in",
            &[human_count(self.ip_bits_per_sec_total)],
            "bit/s IP",
        )?;
        row(
            f,
            "disk writes",
            &[human_bytes(self.disk_write_bytes_per_sec)],
            &format!(
                "per second ({} appends/s, {} compactions/s)",
                human_count(self.appends_per_sec),
                human_count(self.compactions_per_sec)
            ),
        )?;
        row(
            f,
            "journal writes",
            &[human_bytes(self.journal_write_bytes_per_sec)],
            "per second at most",
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(apps: u64, addresses_per_app: u64, events_per_sec: f64, days: f64) -> CapacityInput {
        CapacityInput {
            apps,
            addresses_per_app,
            events_per_sec,
            days,
            flush_interval_ms: 1000,
            writers: 1,
        }
    }

    fn close(actual: f64, expected: f64, relative: f64) -> bool {
        (actual - expected).abs() <= expected.abs() * relative
    }

    #[test]
    fn saturated_store_has_every_address_in_every_log() {
        // 1000 events per app per second: every log sees all 14 addresses in every flush.
        let e = estimate(&input(100, 14, 100_000.0, 1.0));
        assert_eq!(e.apps_seen, 100);
        assert_eq!(e.logs, 100);
        assert!(
            close(e.addresses_per_log, 14.0, 1e-9),
            "{}",
            e.addresses_per_log
        );
        assert!(
            close(e.records_per_append, 14.0, 1e-9),
            "{}",
            e.records_per_append
        );
        let block = (BLOCK_HEADER_BYTES + 14 * BLOCK_RECORD_BYTES) as u64; // 256 bytes
        assert_eq!(e.log_bytes_compacted, block);
        let tail = u64::from(COMPACT_AFTER_BLOCKS - 2);
        assert_eq!(e.log_bytes_worst, block + tail * block);
        assert_eq!(e.log_bytes_steady, block + tail / 2 * block);
        assert_eq!(e.data_bytes_worst, 100 * e.log_bytes_worst);
        // 63 blocks of 256 bytes is 16128 bytes: four 4 KiB blocks per log.
        let fixed = (FIXED_INODES + INODES_PER_WRITER) * FS_BLOCK_BYTES + FS_BLOCK_BYTES;
        let dirs = 100 * FS_BLOCK_BYTES + 100 * FS_BLOCK_BYTES;
        assert_eq!(
            e.disk_bytes_worst,
            fixed + dirs + 100 * 4 * FS_BLOCK_BYTES + FS_BLOCK_BYTES
        );
        assert_eq!(e.inodes, FIXED_INODES + INODES_PER_WRITER + 100 + 100 + 100);
        assert_eq!(e.inodes_worst, e.inodes + 1);
        // Each log is written every second; one write in 63 is a compaction.
        assert!(close(
            e.appends_per_sec + e.compactions_per_sec,
            100.0,
            1e-9
        ));
        assert!(close(e.compactions_per_sec, 100.0 / 63.0, 1e-9));
        assert_eq!(e.appends_per_flush_per_writer, 100);
        assert_eq!(e.compactions_per_flush_worst, 100);
        assert_eq!(e.pending_apps_per_writer, 100);
        assert_eq!(e.pending_entries_per_writer, 1400);
    }

    #[test]
    fn network_counts_payload_headers_and_ethernet() {
        let e = estimate(&CapacityInput {
            writers: 4,
            ..input(10, 14, 400_000.0, 1.0)
        });
        assert_eq!(e.packets_per_sec_per_writer, 100_000.0);
        // 72-byte payload + 28 bytes IPv4/UDP = 100 bytes = 800 bits per datagram.
        assert_eq!(e.ip_bits_per_sec_per_writer, 80_000_000.0);
        assert_eq!(e.wire_bits_per_sec_per_writer, 100_000.0 * (138.0 * 8.0));
        assert_eq!(e.ip_bits_per_sec_total, 320_000_000.0);
        // Each of the 100,000 events a writer gets per one-second flush takes 40 journal bytes.
        assert_eq!(
            e.journal_bytes_per_flush_per_writer,
            (journal::JOURNAL_HEADER_BYTES + 100_000 * journal::JOURNAL_RECORD_BYTES) as u64
        );
        assert_eq!(e.journal_write_bytes_per_sec, 400_000.0 * 40.0);
    }

    #[test]
    fn sparse_apps_write_one_record_blocks_and_are_never_compacted() {
        // A million apps at 10 events/s: each app sends once a day on average.
        let e = estimate(&input(1_000_000, 14, 10.0, 1.0));
        assert!(
            close(e.records_per_append, 1.0, 1e-3),
            "{}",
            e.records_per_append
        );
        // 864k events over a million apps: 1 - e^-0.864 of them seen.
        let seen = 1e6 * (1.0 - (-0.864f64).exp());
        assert_eq!(e.apps_seen, seen.ceil() as u64);
        assert_eq!(e.compactions_per_sec, 0.0);
        assert_eq!(e.compactions_per_flush_worst, 0);
        // A log is a block or two of one record: one 4 KiB block on disk.
        assert!(e.log_bytes_worst < 2 * (BLOCK_HEADER_BYTES + BLOCK_RECORD_BYTES) as u64);
        assert!(e.disk_bytes_steady as f64 > e.logs as f64 * 2.0 * FS_BLOCK_BYTES as f64);
        assert_eq!(e.pending_apps_per_writer, 10);
        assert_eq!(e.pending_entries_per_writer, 10);
    }

    #[test]
    fn writers_split_traffic_and_multiply_logs() {
        let one = estimate(&input(1000, 14, 50_000.0, 7.0));
        let four = estimate(&CapacityInput {
            writers: 4,
            ..input(1000, 14, 50_000.0, 7.0)
        });
        assert_eq!(four.logs, 4 * one.logs);
        assert_eq!(four.apps_seen, one.apps_seen);
        assert_eq!(
            four.packets_per_sec_per_writer,
            one.packets_per_sec_per_writer / 4.0
        );
        assert!(four.pending_entries_per_writer <= one.pending_entries_per_writer);
        assert!(four.memory_bytes_per_writer <= one.memory_bytes_per_writer);
        assert!(four.data_bytes_worst > one.data_bytes_worst);
    }

    #[test]
    fn memory_follows_the_hash_table_layout() {
        // 5000 events over 1000 apps of 14 addresses each in one second.
        let e = estimate(&input(1000, 14, 5000.0, 1.0));
        let apps = e.pending_apps_per_writer;
        assert!(
            close(apps as f64, 1000.0 * (1.0 - (-5.0f64).exp()), 1e-2),
            "{apps}"
        );
        let per_app = e.pending_entries_per_writer.div_ceil(apps);
        let expected = table_heap_bytes(apps, 64) + apps * table_heap_bytes(per_app, 24);
        assert!(e.memory_bytes_per_writer >= expected);
        assert!(e.memory_bytes_per_writer < expected + 64 * 1024);
        // hashbrown: 4 slots up to 3 items, 8 up to 7, then a power of two at 7/8 load.
        assert_eq!(table_buckets(3), 4);
        assert_eq!(table_buckets(7), 8);
        assert_eq!(table_buckets(8), 16);
        assert_eq!(table_buckets(14), 16);
        assert_eq!(table_buckets(15), 32);
        assert_eq!(table_heap_bytes(14, 24), 16 * 24 + 16 + 16 + 16);
        assert_eq!(std::mem::size_of::<(u32, AddrStats)>(), 24);
    }

    #[test]
    fn no_traffic_needs_only_the_fixed_tree() {
        let e = estimate(&input(1000, 14, 0.0, 30.0));
        assert_eq!(e.apps_seen, 0);
        assert_eq!(e.logs, 0);
        assert_eq!(e.data_bytes_worst, 0);
        assert_eq!(e.memory_bytes_per_writer, 0);
        assert_eq!(e.inodes, FIXED_INODES + INODES_PER_WRITER);
        assert_eq!(e.appends_per_sec, 0.0);
    }

    #[test]
    fn bad_input_is_rejected_by_validate_and_clamped_by_estimate() {
        let good = input(10, 14, 100.0, 1.0);
        assert_eq!(good.validate(), Ok(()));
        for (bad, message) in [
            (
                CapacityInput {
                    apps: 0,
                    ..good.clone()
                },
                "apps must be at least 1",
            ),
            (
                CapacityInput {
                    writers: 0,
                    ..good.clone()
                },
                "writers must be at least 1",
            ),
            (
                CapacityInput {
                    flush_interval_ms: 0,
                    ..good.clone()
                },
                "flush interval (ms) must be at least 1",
            ),
            (
                CapacityInput {
                    addresses_per_app: 0,
                    ..good.clone()
                },
                "addresses per app must be at least 1",
            ),
            (
                CapacityInput {
                    events_per_sec: f64::NAN,
                    ..good.clone()
                },
                "events per second must be a finite number of at least 0",
            ),
            (
                CapacityInput {
                    days: -1.0,
                    ..good.clone()
                },
                "days must be a finite number of at least 0",
            ),
            (
                CapacityInput {
                    events_per_sec: f64::INFINITY,
                    ..good.clone()
                },
                "events per second must be a finite number of at least 0",
            ),
        ] {
            assert_eq!(bad.validate().unwrap_err().to_string(), message);
            let e = estimate(&bad);
            assert!(e.disk_bytes_worst > 0);
            assert!(e.ip_bits_per_sec_total.is_finite());
            assert!(!e.to_string().contains("NaN"), "{e}");
        }
        let huge = estimate(&input(u64::MAX, u64::MAX, 1e12, 1e6));
        assert!(!huge.to_string().contains("NaN"));
    }

    #[test]
    fn table_and_json_name_every_figure() {
        let e = estimate(&input(10_000, 14, 20_000.0, 30.0));
        let table = e.to_string();
        for want in [
            "disk space",
            "inodes",
            "memory for pending events",
            "journal filled per flush",
            "journal writes",
            "network in",
            "appends per flush",
            "compactions/s",
            "compactions in one flush",
        ] {
            assert!(table.contains(want), "{want} missing from\n{table}");
        }
        let json = serde_json::to_value(&e).unwrap();
        assert_eq!(json["input"]["apps"], 10_000);
        assert_eq!(json["logs"], e.logs);
        assert_eq!(json["disk_bytes_worst"], e.disk_bytes_worst);
    }

    #[test]
    fn human_units() {
        assert_eq!(human_bytes(512.0), "512 B");
        assert_eq!(human_bytes(1536.0), "1.50 KiB");
        assert_eq!(human_bytes(12.3 * 1024.0 * 1024.0 * 1024.0), "12.3 GiB");
        assert_eq!(human_count(950.0), "950");
        assert_eq!(human_count(12_500.0), "12.5 k");
        assert_eq!(human_count(1_200_000.0), "1.20 M");
        assert_eq!(human_count(0.5), "0.50");
    }
}
