//! Any bytes as a log, read by `ipevent_core::block::scan_log` from memory and by
//! `ipevent_core::store::scan_log_file` from a real file (mapped): neither panics, both agree,
//! the summary matches the records delivered, and the verified prefix alone scans clean with
//! the same totals.

#![no_main]
#![forbid(unsafe_code)]

use std::io::Write;

use ipevent_core::block::{self, BlockParse, ScanSummary, Tail};
use ipevent_core::store::{self, AddrStats};
use libfuzzer_sys::fuzz_target;

fn scan(bytes: &[u8]) -> (ScanSummary, Vec<(u32, AddrStats)>) {
    let mut records = Vec::new();
    let summary = block::scan_log(bytes, |ip, stats| records.push((ip, stats)));
    (summary, records)
}

fuzz_target!(|data: &[u8]| {
    let (summary, records) = scan(data);
    let len = data.len() as u64;
    assert!(summary.good_bytes <= len, "{summary:?} of {len} bytes");
    assert_eq!(summary.records, records.len() as u64, "{summary:?}");
    assert_eq!(
        summary.events,
        records.iter().map(|(_, s)| s.count).sum::<u64>(),
        "{summary:?}"
    );
    assert!(summary.blocks <= summary.records, "{summary:?}");
    match &summary.tail {
        Tail::Clean => assert_eq!(summary.good_bytes, len, "{summary:?}"),
        Tail::Torn { offset, .. } => {
            assert_eq!(*offset, summary.good_bytes, "{summary:?}");
            let rest = &data[summary.good_bytes as usize..];
            assert!(!rest.is_empty(), "{summary:?}");
            assert!(
                !matches!(block::parse_block(rest), BlockParse::Ok { .. }),
                "{summary:?} stopped before a valid block"
            );
        }
    }

    let prefix = &data[..summary.good_bytes as usize];
    let (again, again_records) = scan(prefix);
    assert_eq!(
        again,
        ScanSummary {
            tail: Tail::Clean,
            ..summary.clone()
        },
        "verified prefix of {len} bytes"
    );
    assert_eq!(again_records, records);

    // The same bytes as a file, read the way queries read logs.
    let mut file = tempfile::NamedTempFile::new().expect("creating a temp file");
    file.write_all(data).expect("writing the temp file");
    let mut file_records = Vec::new();
    let from_file = store::scan_log_file(file.path(), |ip, stats| file_records.push((ip, stats)))
        .expect("scanning the temp file")
        .expect("the temp file exists");
    assert_eq!(from_file, summary);
    assert_eq!(file_records, records);
});
