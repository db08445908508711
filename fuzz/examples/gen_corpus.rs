//! Writes the seed corpus: `corpus/decode/<vector name>` for every datagram of
//! `testdata/ipevent.json` (in `corpus/differential/` too, with a few datagrams on which
//! protobuf implementations differ), and `corpus/block_reader/<name>` for a few logs built
//! with the store's own `BlockBuilder` (clean, torn, corrupted, with a split count).
//!
//! Run with `cargo run --manifest-path fuzz/Cargo.toml --example gen_corpus`.

#![forbid(unsafe_code)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use ipevent_core::block::{BlockBuilder, BLOCK_HEADER_BYTES};
use ipevent_core::store::AddrStats;
use ipevent_core::testdata;
use ipevent_core::wire::{self, AppSha, IpEvent};

/// Records in the largest seed log: enough for several pages of records, small enough to keep
/// every seed well under libFuzzer's default input length.
const BIG_BLOCK_RECORDS: u32 = 200;

fn main() -> ExitCode {
    match run() {
        Ok(written) => {
            eprintln!("gen_corpus: wrote {written} seed files");
            ExitCode::SUCCESS
        }
        Err(message) => {
            eprintln!("gen_corpus: {message}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<usize, String> {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR"));
    let vectors = fuzz.join("../testdata/ipevent.json");
    let mut written = write_decode_seeds(&vectors, &fuzz.join("corpus/decode"))?;
    written += write_decode_seeds(&vectors, &fuzz.join("corpus/differential"))?;
    written += write_differential_seeds(&fuzz.join("corpus/differential"))?;
    written += write_block_seeds(&fuzz.join("corpus/block_reader"))?;
    Ok(written)
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), String> {
    let path: PathBuf = dir.join(name);
    fs::write(&path, bytes).map_err(|e| format!("writing {}: {e}", path.display()))
}

fn write_decode_seeds(vectors: &Path, dir: &Path) -> Result<usize, String> {
    let list = testdata::wire_vectors_at(vectors).map_err(|e| e.to_string())?;
    fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    for vector in &list {
        let name = &vector.name;
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            return Err(format!("vector name {name:?} is no plain file name"));
        }
        write(dir, name, &vector.bytes)?;
    }
    Ok(list.len())
}

/// Datagrams where protobuf implementations are known to differ: groups, fields of ours with
/// another wire type, long tags, lengths and varints.
fn write_differential_seeds(dir: &Path) -> Result<usize, String> {
    let event = IpEvent {
        app: AppSha([0xa5; 32]),
        ip: 0x0a00_0001,
    };
    let valid = wire::encode_to_vec(&event);
    let with = |tail: &[u8]| [valid.as_slice(), tail].concat();
    let seeds: [(&str, Vec<u8>); 7] = [
        ("unknown_group", with(&[0x1b, 0x20, 0x01, 0x2a, 0x00, 0x1c])),
        ("nested_groups", with(&[0x1b, 0x23, 0x2b, 0x2c, 0x24, 0x1c])),
        ("ip_as_fixed64", with(&[0x11, 1, 2, 3, 4, 5, 6, 7, 8])),
        ("sha_as_varint", with(&[0x08, 0x05])),
        (
            "ten_byte_ip",
            with(&[
                0x10, 0x85, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x7e,
            ]),
        ),
        ("five_byte_tag", with(&[0x98, 0x80, 0x80, 0x80, 0x00, 0x01])),
        (
            "five_byte_length",
            with(&[0x1a, 0x81, 0x80, 0x80, 0x80, 0x00, b'x']),
        ),
    ];
    for (name, bytes) in &seeds {
        write(dir, name, bytes)?;
    }
    Ok(seeds.len())
}

fn stats(count: u64, first_seen: u32, last_seen: u32) -> AddrStats {
    AddrStats {
        count,
        first_seen,
        last_seen,
    }
}

fn write_block_seeds(dir: &Path) -> Result<usize, String> {
    fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let mut builder = BlockBuilder::default();
    let mut block = |epoch: u64, records: &[(u32, AddrStats)]| {
        builder.begin(epoch);
        for (ip, s) in records {
            builder.push(*ip, s);
        }
        builder.finish().to_vec()
    };
    let t = 1_700_000_000;
    let one = block(1, &[(0xc0a8_0101, stats(1, t, t))]);
    let two = block(
        2,
        &[
            (0x0a00_0001, stats(3, t, t + 5)),
            (0x0a00_0002, stats(7, t + 1, t + 9)),
            (0x0808_0808, stats(1, t + 2, t + 2)),
        ],
    );
    // A count above u32::MAX is split over several records of one address.
    let split = block(
        3,
        &[(0x0102_0304, stats(u64::from(u32::MAX) + 10, t, t + 60))],
    );
    let big_records: Vec<(u32, AddrStats)> = (0..BIG_BLOCK_RECORDS)
        .map(|i| {
            (
                0x0a01_0000 + i,
                stats(u64::from(i % 7 + 1), t + i, t + 2 * i),
            )
        })
        .collect();
    let big = block(u64::MAX, &big_records);

    let mut seeds: Vec<(&str, Vec<u8>)> = vec![
        ("one_block", one.clone()),
        ("two_blocks", [one.as_slice(), two.as_slice()].concat()),
        ("split_count", split.clone()),
        ("many_records", big),
        (
            "three_blocks",
            [one.as_slice(), two.as_slice(), split.as_slice()].concat(),
        ),
    ];
    // A write torn inside the second block's records.
    let mut torn = [one.as_slice(), two.as_slice()].concat();
    torn.truncate(one.len() + BLOCK_HEADER_BYTES + 5);
    seeds.push(("torn_in_records", torn));
    // A write torn inside the second block's header.
    let mut torn_header = [one.as_slice(), two.as_slice()].concat();
    torn_header.truncate(one.len() + 10);
    seeds.push(("torn_in_header", torn_header));
    // One flipped bit in the second block's records: the checksum refuses it.
    let mut flipped = [one.as_slice(), two.as_slice()].concat();
    flipped[one.len() + BLOCK_HEADER_BYTES + 4] ^= 0x01;
    seeds.push(("checksum_mismatch", flipped));
    // Garbage after a clean block.
    seeds.push((
        "trailing_garbage",
        [one.as_slice(), b"IPEB\x01\x00garbage".as_slice()].concat(),
    ));
    seeds.push(("empty", Vec::new()));

    for (name, bytes) in &seeds {
        write(dir, name, bytes)?;
    }
    Ok(seeds.len())
}
