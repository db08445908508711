//! The model: from a [`CapacityInput`] to its [`CapacityEstimate`], in named steps (the
//! traffic, one log's sizes, the tree on disk, a writer's memory, the write load).

use super::figures::{
    CapacityEstimate, CapacityInput, ETHERNET_OVERHEAD_BYTES, FANOUT_DIRS, FS_BLOCK_BYTES,
    IPV4_UDP_HEADER_BYTES,
};
use crate::aggregate;
use crate::block::{AddrStats, BLOCK_HEADER_BYTES, BLOCK_RECORD_BYTES, MAX_RECORDS_PER_BLOCK};
use crate::journal;
use crate::store::COMPACT_AFTER_BLOCKS;
use crate::wire::{AppSha, ENCODED_MAX_BYTES};

/// Seconds in a day.
const SECS_PER_DAY: f64 = 86_400.0;

/// Length of an app directory's name (the SHA in hex).
const APP_DIR_NAME_CHARS: u64 = 64;

/// Length assumed for a log's name, `<writer-id>.log`; a host name of about 16 characters.
const LOG_NAME_CHARS: u64 = 20;

/// An ext4 directory block is about this full once entries are spread over it by hash.
const DIR_FILL_RATIO: f64 = 0.75;

/// Inodes of the data dir's fixed part: the root, `LAYOUT`, `events/`, `receivers/`, `trash/`.
pub(super) const FIXED_INODES: u64 = 5;

/// Inodes under `receivers/<writer-id>/` per writer: the directory, `lock`,
/// `control.sock`, `stats.json`, `state.json` and `journal`.
pub(super) const INODES_PER_WRITER: u64 = 6;

/// Control bytes a `hashbrown` table allocates beyond one per bucket (one SIMD group).
const TABLE_GROUP_BYTES: u64 = 16;

/// What the allocator adds to each allocation (glibc: an 8-byte chunk header, 16-byte
/// alignment).
const MALLOC_OVERHEAD_BYTES: u64 = 16;

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
pub(super) fn table_buckets(items: u64) -> u64 {
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
pub(super) fn table_heap_bytes(items: u64, slot_bytes: u64) -> u64 {
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
