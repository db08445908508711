//! What goes into an estimate ([`CapacityInput`]) and what comes out ([`CapacityEstimate`]),
//! each figure documented with the formula [`estimate`] follows.
//!
//! [`estimate`]: super::estimate

use serde::Serialize;

/// Allocation unit of the file system holding the data dir (the ext4 and XFS default): a
/// file or directory takes whole blocks of this size.
pub const FS_BLOCK_BYTES: u64 = 4096;

/// Fan-out directories under `events/`: one per value of the SHA's first two hex digits.
pub const FANOUT_DIRS: u64 = 256;

/// IPv4 header (20 bytes) and UDP header (8 bytes) around each datagram; IPv6 adds 20.
pub const IPV4_UDP_HEADER_BYTES: u64 = 28;

/// What Ethernet adds to each IP packet on the wire: header 14, frame check 4, preamble 8 and
/// the gap between frames 12.
pub const ETHERNET_OVERHEAD_BYTES: u64 = 38;

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
    ///
    /// [`estimate`]: super::estimate
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
    ///
    /// [`estimate`]: super::estimate
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
    ///
    /// [`MAX_RECORDS_PER_BLOCK`]: crate::block::MAX_RECORDS_PER_BLOCK
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
    ///
    /// [`journal::JOURNAL_HEADER_BYTES`]: crate::journal::JOURNAL_HEADER_BYTES
    /// [`journal::JOURNAL_RECORD_BYTES`]: crate::journal::JOURNAL_RECORD_BYTES
    pub journal_bytes_per_flush_per_writer: u64,
    /// Datagrams per second each writer receives: `events_per_sec / writers`.
    pub packets_per_sec_per_writer: f64,
    /// IP traffic into each writer, bits per second: datagrams of at most
    /// [`ENCODED_MAX_BYTES`] payload plus [`IPV4_UDP_HEADER_BYTES`].
    ///
    /// [`ENCODED_MAX_BYTES`]: crate::wire::ENCODED_MAX_BYTES
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
    ///
    /// [`journal::JOURNAL_RECORD_BYTES`]: crate::journal::JOURNAL_RECORD_BYTES
    pub journal_write_bytes_per_sec: f64,
    /// Compactions one flush of one writer may have to do: every log it writes in that
    /// flush, when their apps reached the threshold together (apps that started sending
    /// together, e.g. after a reset, stay in step). Each compaction ends with an
    /// `fdatasync`, so this many syncs delay that flush; the socket buffer must absorb the
    /// traffic meanwhile.
    pub compactions_per_flush_worst: u64,
}
