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
//!
//! [`BLOCK_HEADER_BYTES`]: crate::block::BLOCK_HEADER_BYTES
//! [`BLOCK_RECORD_BYTES`]: crate::block::BLOCK_RECORD_BYTES
//! [`COMPACT_AFTER_BLOCKS`]: crate::store::COMPACT_AFTER_BLOCKS

mod figures;
mod model;
mod table;

pub use figures::{
    CapacityError, CapacityEstimate, CapacityInput, ETHERNET_OVERHEAD_BYTES, FANOUT_DIRS,
    FS_BLOCK_BYTES, IPV4_UDP_HEADER_BYTES,
};
pub use model::estimate;

#[cfg(test)]
mod tests {
    use super::model::{table_buckets, table_heap_bytes, FIXED_INODES, INODES_PER_WRITER};
    use super::table::{human_bytes, human_count};
    use super::*;
    use crate::block::{AddrStats, BLOCK_HEADER_BYTES, BLOCK_RECORD_BYTES};
    use crate::journal;
    use crate::store::COMPACT_AFTER_BLOCKS;

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
