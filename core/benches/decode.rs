//! `wire::decode`, nanoseconds per datagram: a canonical event, the valid variants the
//! receiver must accept, the common ways a datagram is refused, and a batch mixed the way
//! `ipevent-test-client` mixes its traffic (30% corrupted).
//!
//! `cargo bench -p ipevent-core --bench decode`

#![forbid(unsafe_code)]

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ipevent_core::wire::{self, AppSha, IpEvent, Reject, MAX_DATAGRAM_BYTES};

/// Datagrams in the mixed batch: one receiver hand-off's worth.
const MIXED_BATCH: usize = 1024;

fn event() -> IpEvent {
    let mut sha = [0u8; 32];
    for (i, byte) in sha.iter_mut().enumerate() {
        *byte = (i as u8).wrapping_mul(37).wrapping_add(11);
    }
    IpEvent {
        app: AppSha(sha),
        ip: 0xc0a8_0a07,
    }
}

/// Protobuf key byte of field `field` with wire type `wire_type`.
fn key(field: u8, wire_type: u8) -> u8 {
    (field << 3) | wire_type
}

fn varint(mut value: u64, out: &mut Vec<u8>) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// The SHA field as bytes (`upper`: in upper case).
fn sha_field(app: &AppSha, upper: bool) -> Vec<u8> {
    let mut hex = app.to_hex();
    if upper {
        hex = hex.to_ascii_uppercase();
    }
    let mut out = vec![key(1, 2), 64];
    out.extend_from_slice(hex.as_bytes());
    out
}

fn ip_field(ip: u64) -> Vec<u8> {
    let mut out = vec![key(2, 0)];
    varint(ip, &mut out);
    out
}

/// Named datagrams and the verdict each must get (checked before timing).
fn cases() -> Vec<(&'static str, Vec<u8>, Result<IpEvent, Reject>)> {
    let ev = event();
    let canonical = wire::encode_to_vec(&ev);
    let upper = [sha_field(&ev.app, true), ip_field(ev.ip.into())].concat();
    // Address first, then an unknown length-delimited field, then the SHA.
    let reordered = [
        ip_field(ev.ip.into()),
        vec![key(9, 2), 3, b'x', b'y', b'z'],
        sha_field(&ev.app, false),
    ]
    .concat();
    let mut bad_sha = canonical.clone();
    bad_sha[40] = b'g';
    let truncated = canonical[..canonical.len() / 2].to_vec();
    let missing_ip = sha_field(&ev.app, false);
    let ip_range = [sha_field(&ev.app, false), ip_field(1 << 33)].concat();
    let garbage: Vec<u8> = (0..48u32)
        .map(|i| (i.wrapping_mul(0x9e37_79b9) >> 24) as u8 | 0x80)
        .collect();
    let oversize = vec![0u8; MAX_DATAGRAM_BYTES + 376];
    vec![
        ("valid_canonical", canonical, Ok(ev)),
        ("valid_upper_case", upper, Ok(ev)),
        ("valid_reordered_unknown_field", reordered, Ok(ev)),
        ("invalid_sha_char", bad_sha, Err(Reject::ShaFormat)),
        ("invalid_truncated", truncated, Err(Reject::Truncated)),
        ("invalid_missing_ip", missing_ip, Err(Reject::MissingField)),
        ("invalid_ip_range", ip_range, Err(Reject::IpRange)),
        ("invalid_garbage", garbage, Err(Reject::Malformed)),
        ("invalid_empty", Vec::new(), Err(Reject::Empty)),
        ("invalid_oversize", oversize, Err(Reject::Oversize)),
    ]
}

/// 1024 datagrams: 70% canonical, the rest cycling through the other cases.
fn mixed_batch(cases: &[(&'static str, Vec<u8>, Result<IpEvent, Reject>)]) -> Vec<Vec<u8>> {
    let others: Vec<&Vec<u8>> = cases[1..].iter().map(|(_, bytes, _)| bytes).collect();
    (0..MIXED_BATCH)
        .map(|i| {
            // A fixed pseudo-random pattern, so branches are not trivially predictable.
            let r = (i as u32).wrapping_mul(2_654_435_761) >> 16;
            if r % 100 < 70 {
                cases[0].1.clone()
            } else {
                others[(r as usize / 100) % others.len()].clone()
            }
        })
        .collect()
}

fn bench_decode(c: &mut Criterion) {
    let cases = cases();
    for (name, bytes, expected) in &cases {
        assert_eq!(&wire::decode(bytes), expected, "case {name}");
    }
    let mut group = c.benchmark_group("decode");
    group.throughput(Throughput::Elements(1));
    for (name, bytes, _) in &cases {
        group.bench_function(*name, |b| b.iter(|| wire::decode(black_box(bytes))));
    }
    let batch = mixed_batch(&cases);
    group.throughput(Throughput::Elements(batch.len() as u64));
    group.bench_function("mixed_30pct_corrupt_x1024", |b| {
        b.iter(|| {
            let mut accepted = 0u32;
            for datagram in &batch {
                accepted += u32::from(wire::decode(black_box(datagram)).is_ok());
            }
            accepted
        })
    });
    group.finish();
}

criterion_group!(benches, bench_decode);
criterion_main!(benches);
