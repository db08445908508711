//! `wire::decode`, nanoseconds per datagram: a canonical event, the valid variants the
//! receiver must accept, the common ways a datagram is refused, and a batch mixed the way
//! `ipevent-test-client` mixes its traffic (30% corrupted).
//!
//! `cargo bench -p ipevent-core --bench decode`

#![forbid(unsafe_code)]

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ipevent_core::wire::{self, AppSha, IpEvent, Reject, WireType, MAX_DATAGRAM_BYTES};

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

/// The bytes that `write` puts into a buffer with the library's field encoders.
fn fields(write: impl FnOnce(&mut [u8], &mut usize)) -> Vec<u8> {
    let mut out = [0u8; 256];
    let mut pos = 0;
    write(&mut out, &mut pos);
    out[..pos].to_vec()
}

/// The SHA field as bytes (`upper`: in upper case).
fn sha_field(app: &AppSha, upper: bool) -> Vec<u8> {
    let mut hex = app.to_hex();
    if upper {
        hex = hex.to_ascii_uppercase();
    }
    fields(|out, pos| wire::encode_len_field(out, pos, wire::FIELD_APP_SHA256, hex.as_bytes()))
}

fn ip_field(ip: u64) -> Vec<u8> {
    fields(|out, pos| wire::encode_varint_field(out, pos, wire::FIELD_IP, ip))
}

/// Named datagrams and the verdict each must get (checked before timing).
fn cases() -> Vec<(&'static str, Vec<u8>, Result<IpEvent, Reject>)> {
    let ev = event();
    let canonical = wire::encode_to_vec(&ev);
    let upper = [sha_field(&ev.app, true), ip_field(ev.ip.into())].concat();
    // Address first, then an unknown length-delimited field, then the SHA.
    let reordered = [
        ip_field(ev.ip.into()),
        fields(|out, pos| wire::encode_len_field(out, pos, 9, b"xyz")),
        sha_field(&ev.app, false),
    ]
    .concat();
    // An unknown group holding a varint and a fixed32, after the fields.
    let group = [
        canonical.clone(),
        fields(|out, pos| {
            wire::encode_tag(out, pos, 5, WireType::StartGroup);
            wire::encode_varint_field(out, pos, 6, 1);
            wire::encode_fixed32_field(out, pos, 7, 2);
            wire::encode_tag(out, pos, 5, WireType::EndGroup);
        }),
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
        ("valid_unknown_group", group, Ok(ev)),
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
    // The test client sends no groups, so the mix leaves them out.
    let others: Vec<&Vec<u8>> = cases[1..]
        .iter()
        .filter(|(name, _, _)| *name != "valid_unknown_group")
        .map(|(_, bytes, _)| bytes)
        .collect();
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
